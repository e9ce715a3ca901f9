"""`knn` settings, split by lifetime: `CollectionOptions` are fixed when a collection is created
with knn memory (they shape the KV memory on disk); `Settings` are the server's, read per
generation (how memory is read) or per process (resource limits)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class CollectionOptions(BaseModel):
    """What a collection's KV memory stores (`memlm create-collection NAME --memory knn`)."""

    model_config = ConfigDict(extra="forbid")

    layers: str = Field(
        "all_but_first", description="decoder layers whose keys/values are stored: a preset of "
        "memlm.modes.knn.reading.LAYER_PRESETS or comma-separated indices",
    )
    window: int = Field(1024, gt=1, le=8192, description="tokens per forward pass when building memory")
    overlap: int = Field(128, ge=0, description="left context a build window shares with the one before")
    dtype: Literal["float16", "bfloat16"] = Field("float16", description="on-disk dtype of stored keys and values")

    def model_post_init(self, _context) -> None:
        if self.overlap >= self.window:
            raise ValueError(f"overlap={self.overlap} must be below window={self.window}")


class BuildSettings(BaseModel):
    """When a collection's KV memory is built and what that may cost: shared by every mode that
    reads one (knn; landmark, which builds its own in the same format)."""

    ingest_waits_for_memory: bool = Field(
        False, description="True: an Ingest into a knn collection answers once its KV memory is built; False: "
        "right after LMDB commits, with the build queued on the model worker one segment at a time (a knn "
        "generation of the collection waits for it; Describe's memory_lag shows what is left). See README, "
        "knn memory mode, for the measurement",
    )
    build_batch_tokens: int = Field(4096, gt=0, description="tokens built into one memory segment at a time; also "
                                    "one turn of a queued build on the model worker (a generation waits at most one "
                                    "segment behind a build; see README, Measured: derived memory)")
    max_segments: int = Field(64, gt=0, description="compact a memory once it has more segments than this")
    resident_collections: int = Field(2, gt=0, description="collections whose memory stays loaded between requests "
                                      "(ungated reads; gated reads load per generation)")


class Settings(BuildSettings):
    """How knn generations read memory, and what building it may cost."""

    # --- per generation: how memory is read -----------------------------------------------------
    preset: str = Field("default", description="memlm.modes.knn.reading.PRESETS entry: 'default' (chunk-gated), "
                        "'ungated' (every row of the memory searched), 'fixed'; sets positions, gating, per-head "
                        "retrieval, codec")
    top_k: Optional[int] = Field(None, gt=0, description="memory rows each query head retrieves per layer when a "
                                 "request leaves k at 0; None = the preset's (64 for 'default', 8 for 'ungated')")
    candidate_chunks: Optional[int] = Field(
        None, ge=0, le=1000, description="chunk-gated knn: a generation reads only the rows of the chunks the "
        "store's search (store.search_mode) ranks first for its prompt (as rag does; `filter` applies); None = the "
        "preset's (8 for 'default'), 0 = every row (needs a preset without 'ranked' positions, e.g. 'ungated')",
    )
    follow_chunks: Optional[int] = Field(
        None, ge=0, le=16, description="chunk-gated knn: each candidate chunk also brings the next N chunks "
        "of its document; None = the preset's (2 for 'default')",
    )
