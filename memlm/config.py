"""Settings, one typed model per component, read from `MEMLM_*` environment variables and a
TOML file (pydantic-settings).

Precedence, highest first: keyword arguments (the CLI's options), environment variables
(`MEMLM_PORT=50052`, nested with `__`: `MEMLM_STORE__MAX_K=500`), the TOML file named by
`MEMLM_CONFIG` (else `./memlm.toml` when present), the defaults below.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, Field, create_model, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from memlm import modes as registry
from memlm.index.lmdb_store import MAX_COLLECTIONS as LMDB_MAX_COLLECTIONS


class StoreSettings(BaseModel):
    """The memory store (LMDB + FAISS)."""

    map_size_gib: float = Field(64.0, gt=0, description="LMDB map size; sparse on disk, grows as written")
    max_document_bytes: int = Field(1_000_000, gt=0, description="largest document text accepted, UTF-8 bytes")
    max_ingest_call_bytes: int = Field(64_000_000, gt=0, description="largest total text in one Ingest call")
    max_k: int = Field(1000, gt=0, description="largest k a Search may ask for")
    default_index_factory: str = Field("Flat", description="FAISS factory string for new collections")
    default_chunk_tokens: int = Field(64, gt=0, description="chunk size in language-model tokens (RETRO's 64)")
    embed_batch_size: int = Field(64, gt=0, description="chunks embedded per forward pass")
    embed_bulk_nice: int = Field(
        5, ge=0, le=19, description="how much nicer (lower priority) than the server the thread embedding "
        "documents runs, so that a search's query embedding gets the CPU while an ingest is embedding; 0 treats "
        "them alike (see README, Concurrency)",
    )
    snapshot_every_ops: int = Field(
        1000, gt=0, description="write the FAISS index to disk after this many logged index operations"
    )
    oplog_retention_ops: int = Field(
        100_000, gt=0, description="oplog entries kept for a memory mode's derived memory that has not applied them "
        "yet (its watermark; e.g. a knn collection served by no model for a while); one further behind rebuilds",
    )
    faiss_threads: int = Field(
        1, gt=0, description="FAISS OpenMP threads per search. 1: concurrent searches run on separate "
        "threads instead, and FAISS's pool does not fight torch's (100k-chunk search 38.9 -> 20.5 ms)",
    )
    exact_filter_below: int = Field(
        20_000, gt=0, description="filtered searches matching fewer chunks than this are exact brute force"
    )
    # Limits on what one request may cost or create (INVALID_ARGUMENT / RESOURCE_EXHAUSTED naming them).
    max_collections: int = Field(
        4096, gt=0, le=LMDB_MAX_COLLECTIONS, description="collections one data dir may hold (LMDB opens a fixed "
        f"number of named databases, four per collection: at most {LMDB_MAX_COLLECTIONS})",
    )
    min_chunk_tokens: int = Field(16, gt=0, description="smallest chunk_tokens a collection may be created with")
    max_chunk_tokens: int = Field(
        2048, gt=0, description="largest chunk_tokens a collection may be created with (a chunk is embedded "
        "and scored whole; MiniLM reads its first 256 tokens)",
    )
    max_query_bytes: int = Field(
        16384, gt=0, description="largest text query (UTF-8 bytes) a Search, or a Generate's rag / gated knn "
        "retrieval, may send: the whole query is embedded and BM25-scored",
    )
    max_filter_conditions: int = Field(64, gt=0, description="conditions one filter may hold (must + should + must_not)")
    max_filter_values: int = Field(1024, gt=0, description="values one filter may test (each equals 1, each any_of its length)")
    max_ids_per_call: int = Field(
        1000, gt=0, description="document ids one Get or Delete may name, and documents one ListDocuments page may hold"
    )
    max_ivf_lists: int = Field(
        65536, gt=0, description="inverted lists an index factory may ask for (IVF<n>; IMI2x<b> counts 2^(2b)): "
        "FAISS allocates them at creation, ~150 bytes each before any vector (IVF4000000 ~610 MB)",
    )
    max_graph_degree: int = Field(256, gt=0, description="neighbours per vector an index factory may ask for (HNSW<M>, NSG<R>)")
    max_pq_bits: int = Field(
        10, gt=0, description="bits per code of a PQ-like encoder (PQ<m>x<bits>, RQ, LSQ): training needs ~39 x 2^bits vectors",
    )
    search_mode: Literal["dense", "lexical", "hybrid"] = Field(
        "hybrid", description="how a text search ranks chunks when the request does not say, and how rag and "
        "chunk-gated knn find theirs: dense (embeddings), lexical (BM25) or hybrid (both, fused by `fusion`)",
    )
    fusion: Literal["absolute", "rrf", "relative_score", "dbsf"] = Field(
        "absolute", description="how hybrid search fuses the dense and lexical rankings (memlm.index.fusion): "
        "absolute (every candidate scored by both: 0.4 * max(cosine, 0) + 0.6 * the BM25 coverage of the "
        "query above 0.3, rescaled to [0, 1]; scores in [0, 1]), rrf (reciprocal rank, constant 60), "
        "relative_score (each ranking min-max scaled, then averaged), dbsf (scaled by mean +- 3 std); "
        "README, Search quality",
    )


    @model_validator(mode="after")
    def _chunk_range(self) -> "StoreSettings":
        if not self.min_chunk_tokens <= self.default_chunk_tokens <= self.max_chunk_tokens:
            raise ValueError(
                f"default_chunk_tokens={self.default_chunk_tokens} must lie in [min_chunk_tokens, max_chunk_tokens]"
                f" = [{self.min_chunk_tokens}, {self.max_chunk_tokens}]"
            )
        return self


class ModelSettings(BaseModel):
    """The language model and generation defaults."""

    path: Optional[str] = Field(None, description='a local Hugging Face causal-LM folder; None = the bundled SmolLM2')
    dtype: Optional[str] = Field(None, description="torch dtype name; None = float32 (fastest on CPU)")
    model_impl: Literal["auto", "memlm", "transformers"] = Field(
        "auto", description="'auto': memlm's own Llama (memlm.model) for a Llama-architecture folder, else "
        "transformers; 'memlm': the own model or an error; 'transformers': always transformers (knn then needs "
        "LlamaForCausalLM)")
    max_context_tokens: Optional[int] = Field(None, gt=0, description="cap on prompt + new tokens; None = the model's own")
    max_new_tokens_limit: int = Field(2048, gt=0, description="largest max_new_tokens a request may ask for")
    default_max_new_tokens: int = Field(128, gt=0)
    torch_threads: Optional[int] = Field(None, gt=0, description="torch intra-op threads; None = torch's default")
    weights: Literal["dense", "q4_1", "q8_0", "int8", "int4"] = Field(
        "q4_1", description="weight format of the owned model's linear layers (memlm.model.load_llama(weights=), "
        "memlm.model.quantize): 'dense' = as loaded in dtype; 'q4_1' = llama.cpp's Q4_1 layers and Q8_0 head on "
        "memlm's AVX2 kernel (the bundled GGUF's own codes; activations int8 per block of 32, as llama.cpp); "
        "'q8_0' = Q8_0 everywhere; 'int4'/'int8' = PyTorch's weight-only kernels (bf16 activations). Measured "
        "on the bundled SmolLM2 (README 'The owned model'): q4_1 decodes at 0.71x llama.cpp's tokens/s on 2 "
        "threads, 0.86x on 1 (int4 0.29x/0.38x, dense 0.11x/0.17x), at +0.48% perplexity. Without a C compiler or AVX2 the block formats serve dense",
    )
    kv_cache_dtype: Literal["auto", "float32", "float16"] = Field(
        "auto", description="the owned model's KV caches: 'auto' = float16 with q4_1 weights (as llama.cpp keeps "
        "its cache: half the bytes each decode step reads per cached position; the C decode layers read and write "
        "it), else the model's dtype; 'float32' / 'float16' = that dtype")
    batching: bool = Field(True, description="decode concurrent requests together (memlm.scheduler: continuous "
                           "batching, chunked prefill) where the model is memlm's own and the memory mode allows "
                           "(none, rag); False: one request at a time")
    max_batch_size: int = Field(16, gt=0, description="sequences in the running batch at most")
    max_batched_tokens: int = Field(512, gt=0, description="tokens in one batched forward pass at most (decode tokens, "
                                    "then prompt chunks); >= max_batch_size")
    kv_cache_mb: int = Field(4096, gt=0, description="KV-cache memory the running batch may reserve (each sequence: "
                             "prompt + max_new_tokens positions); a request alone is always admitted")
    prefix_cache_mb: int = Field(512, ge=0, description="memory for prompt KV blocks reused by later requests with the "
                                 "same prefix (memlm.prefix_cache); 0 = off")
    max_concurrent_requests: int = Field(64, gt=0, description="generations in flight (running or waiting) at most; "
                                         "one more is answered RESOURCE_EXHAUSTED")

    @model_validator(mode="after")
    def _batch_fits(self) -> "ModelSettings":
        if self.max_batched_tokens < self.max_batch_size:
            raise ValueError(f"max_batched_tokens={self.max_batched_tokens} is below max_batch_size="
                             f"{self.max_batch_size}; every running sequence needs one token per step")
        return self


class ServerSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535)
    api_key: Optional[str] = Field(None, description="when set, calls need `authorization: Bearer <key>`")
    tls_cert: Optional[Path] = None
    tls_key: Optional[Path] = None
    grace_seconds: float = Field(10.0, ge=0, description="how long in-flight calls may drain on SIGTERM")
    max_message_bytes: int = Field(64 * 1024 * 1024, gt=0)
    metrics_port: Optional[int] = Field(None, ge=0, le=65535, description="Prometheus /metrics port; None = off")
    http_port: Optional[int] = Field(
        None, ge=0, le=65535, description="port of the OpenAI-compatible HTTP API (/v1/chat/completions, "
        "/v1/completions, /v1/embeddings, /v1/models, /health, /metrics) on `host`, beside gRPC in the same process; "
        "behind the same api_key and TLS files; None = off, 0 = a free port (named in the ready line)",
    )

    @model_validator(mode="after")
    def _tls_pair(self) -> "ServerSettings":
        if (self.tls_key is None) != (self.tls_cert is None):
            raise ValueError("tls_cert and tls_key must be given together")
        return self


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "memlm"


class _CommonSettings(BaseSettings):
    """The sections every server has; `Settings` adds one per memory mode (memlm.modes)."""

    model_config = SettingsConfigDict(env_prefix="MEMLM_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(default_factory=_default_data_dir, description="LMDB, FAISS and KV-memory files")
    cache_dir: Optional[Path] = Field(None, description="converted model cache; None = ~/.cache/memlm")
    log_level: str = "INFO"
    server: ServerSettings = ServerSettings()
    store: StoreSettings = StoreSettings()
    model: ModelSettings = ModelSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("MEMLM_CONFIG") or ("memlm.toml" if Path("memlm.toml").is_file() else None)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path:
            if not Path(toml_path).is_file():
                raise FileNotFoundError(f"MEMLM_CONFIG names {toml_path}, which does not exist")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def modes(self) -> dict[str, BaseModel]:
        """{mode name: its settings section} for every registered mode that has one."""
        return {name: getattr(self, name) for name in registry.MODES if registry.settings_class(name) is not None}


def _mode_sections() -> dict[str, Any]:
    """One field per registered memory mode with settings: `[knn]` in memlm.toml, `MEMLM_KNN__PRESET`."""
    sections = {}
    for name in registry.MODES:
        cls = registry.settings_class(name)
        if cls is not None:
            sections[name] = (cls, Field(default_factory=cls, description=f"the {name!r} memory mode"))
    return sections


Settings = create_model("Settings", __base__=_CommonSettings, __doc__="All of memlm's settings: the common "
                        "sections and one per memory mode.", **_mode_sections())
