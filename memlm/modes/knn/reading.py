"""Putting a Llama model into `knn` memory mode for one generation: memlm's own `memlm.model.Llama`
(what the service runs) or transformers' `LlamaForCausalLM` (the reference it was built on).

    with knn_mode(model, kv_memory, ReadConfig.from_name("ungated")):
        ...  # memlm.generation.generate_tokens(model, ...) as usual

    config = ReadConfig.from_name("default")  # chunk-gated: the rows of the prompt's best chunks
    rows = prepare_layer_memories(model, kv_memory, config, chunks=chunk_ids_ranked_for_the_prompt)
    with knn_mode(model, kv_memory, config, layer_memories=rows):
        ...

Inside the block, at each memory layer every query retrieves its top-k rows of that layer's KV
memory and attends to them and to its local context in one softmax (`memlm.modes.knn.attention`);
the other layers run SDPA exactly as before. On exit the model is as it was (attention
implementation, hooks, per-layer state), also after an exception.

How it plugs in. The owned model: each memory layer's `attention.backend` (memlm.model's
per-layer extension point) is replaced by a `KnnBackend` holding that layer's memory, and the
original backend is put back on exit. transformers: 5.x looks the attention function up by
`config._attn_implementation` in `AttentionInterface`; we register "memlm_knn" once (it falls
back to SDPA for layers without memory) and give the same name SDPA's mask builder; the memory of
a layer is attached to its attention module as `_memlm_knn`, so two models never share state. Both
call the same `KVStore.attention`.

Positions (RoPE). The memory holds keys before RoPE with the position each had in its build
window; on entry they are rotated once, by `ReadConfig.positions`:
- "fixed": every memory key at position 0 (RoPE at 0 is the identity: no work); the local context
  is moved to start at `local_offset`, so every memory sits `local_offset` + i tokens before
  query i (Extended Mind likewise gives retrieved memories one fixed position).
- "original": each key at its position in the window it was computed in (0..window-1); the local
  context starts at `window`, as if that window had come right before the prompt.
- "ranked" (chunk-gated reads only, the default preset): the candidate chunks' rows laid out one
  after another, runs of adjacent chunks in text order, runs by rank with the best last, ending
  right before the local context (which starts at max(window, rows)).
The local context is moved by `Llama.rope_offset` on the owned model (its RoPE tables extended
to cover the shifted positions), by a forward pre-hook on the rotary embedding (position ids +
offset) on transformers', so the KV cache slots and masks are untouched.

Where the memory lives while the block runs (`prepare_layer_memories`). Chunk-gated (`chunks`
given): the candidate chunks' rows, memory-mapped from the segment files, as exact tensors
(`TensorKV`) on the model's device. Otherwise, on a CPU model, per layer and KV head a FAISS
index over the rotated keys plus the values, coded by `ReadConfig.codec`:
"fp16" (768 B per token and layer for SmolLM2: 23,040 B/token over 30 layers) or "pq" (product
quantization of keys AND values, 2 x Hkv x pq_m B per token and layer: 2,880 B/token over 30
layers at pq_m = 16). PQ costs accuracy: recall@8 of 0.66 / 0.72 / 0.85 against exact search and
the pass key lost at pq_m = 8 / 16 / 32 (`benchmarks/kv_compression.py`); fp16 is the default. On a
CUDA model, fp16/bf16 tensors on the GPU read by the fused Triton kernels (PQ is CPU-only).
The sizes are `LayerMemories.nbytes` / `.bytes_per_token`.

Where PQ codes come from. With "fixed" positions (preset "fixed"; RoPE at position 0 is the
identity) keys are searched as stored, so the codes live on disk beside the exact fp16 segments
(`KVMemory.ensure_pq`: codebooks trained once, each segment encoded once, durably) and a load
reads only M-byte codes: training took ~8 s per SmolLM2 layer (M = 16, 3.8k rows, one core), and
encoding a million-token memory is tens of GFLOP per layer and head, neither of which can be
redone at every load of a memory meant to hold millions of tokens. With "original" positions
the keys are rotated per row before search, and a code of the un-rotated key cannot be rotated,
so that combination trains and encodes at load (a warning says so). Codes are of the keys and
values as the model produced them; the fp16 segments stay the exact data they are rebuilt from.

Limits: batch size 1 without padding (what memlm.generation runs). An fp16 load reads one layer
(Hkv x N x D fp16) at a time into RAM before indexing it; a PQ load from stored codes reads codes
only.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator, Optional, Sequence, TypeVar, Union

import numpy as np
import torch
from torch import nn

from memlm.index.kv_memory import KVMemory
from memlm.model import Llama
from memlm.model.llama import rope_tables
from memlm.modes.knn.attention import CODECS, PQ_MIN_TRAIN_ROWS, FaissKV, KVStore, TensorKV

log = logging.getLogger(__name__)
T = TypeVar("T")

ATTN_NAME = "memlm_knn"
LAYER_PRESETS = ("all", "all_but_first", "every4", "middle_third", "last_half", "first_half", "upper_two_thirds")
POSITION_STRATEGIES = ("fixed", "original", "ranked")
COMBINE = ("softmax", "gate")
GATE_ATTR = "memory_gate"  # a trained model's per-layer (Hq,) gate logits, on each self_attn module


@dataclass(frozen=True)
class ReadConfig:
    """How one generation reads its KV memory. The field defaults read the WHOLE memory
    (PRESETS["ungated"]); the service's default is PRESETS["default"], chunk-gated (chosen by
    measurement: benchmarks/results/knn_presets.md). Presets: `ReadConfig.from_name`."""

    layers: Union[str, tuple[int, ...]] = "all_but_first"  # a LAYER_PRESETS name or explicit layer indices
    top_k: int = 8  # memory rows retrieved per query (per head, see shared_per_kv_head)
    shared_per_kv_head: bool = False  # True: one retrieved set per KV head (group mean query)
    # A POSITION_STRATEGIES name: "fixed" and "original" see the module docstring; "ranked" (chunk-
    # gated only) lays the candidate chunks out before the prompt in rank order, the best one last
    # (adjacent chunks of a document kept together in text order: `_ranked_positions`).
    positions: str = "original"
    # "softmax": local and retrieved keys in ONE softmax (Extended Mind; no training).
    # "gate": two softmaxes mixed per head by sigmoid(self_attn.memory_gate) (Memorizing
    # Transformer's learned gate: for models trained with it; g * memory + (1 - g) * local).
    combine: str = "softmax"
    local_offset: Optional[int] = None  # first local position; None: 0 for "fixed", window for "original"
    min_memory_position: int = 4  # drop memory rows computed at window positions below this (sinks)
    # Chunk-gated retrieval: 0 searches every memory row; M > 0 searches only the rows of the M
    # chunks the caller ranks first for the prompt (the service: the collection's search, hybrid
    # embedding + BM25 by default, the same as rag's), passed to prepare_layer_memories as `chunks`.
    candidate_chunks: int = 0
    # Gated only: each candidate chunk brings the next `follow_chunks` chunks of its document too
    # (what comes after a match is what a continuation needs; see `with_following`).
    follow_chunks: int = 0
    codec: str = "fp16"  # RAM format on CPU, a CODECS name: "fp16" | "pq" (keys and values product-quantized)
    pq_m: int = 16  # "pq": sub-quantizers = bytes per key and per value, per KV head; must divide head_dim
    pq_train_rows: int = 16384  # "pq": rows per head and layer sampled to train the codebooks (bounds load time)

    def __post_init__(self):
        if self.combine not in COMBINE:
            raise ValueError(f"combine={self.combine!r} is not one of {COMBINE}")
        if self.positions not in POSITION_STRATEGIES:
            raise ValueError(f"positions={self.positions!r} is not one of {POSITION_STRATEGIES}")
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            raise ValueError(f"layers={self.layers!r} is not one of {LAYER_PRESETS} or a tuple of indices")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")
        if self.candidate_chunks < 0:
            raise ValueError(f"candidate_chunks={self.candidate_chunks} must be >= 0 (0: search every row)")
        if self.follow_chunks < 0:
            raise ValueError(f"follow_chunks={self.follow_chunks} must be >= 0")
        if self.follow_chunks and not self.candidate_chunks:
            raise ValueError("follow_chunks extends the candidate chunks: it needs candidate_chunks > 0")
        if self.positions == "ranked" and not self.candidate_chunks:
            raise ValueError("positions='ranked' orders the rows of ranked chunks: it needs candidate_chunks > 0")
        if self.codec not in CODECS:
            raise ValueError(f"codec={self.codec!r} is not one of {CODECS}")
        if self.pq_m < 1:
            raise ValueError(f"pq_m={self.pq_m} must be >= 1 (and divide the head dim)")
        if self.pq_train_rows < PQ_MIN_TRAIN_ROWS:
            raise ValueError(f"pq_train_rows={self.pq_train_rows} must be >= {PQ_MIN_TRAIN_ROWS} (10 rows per centroid)")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "ReadConfig":
        return replace(PRESETS[name], **overrides)


# Chosen by measurement: the history, with the commands, is in benchmarks/results/knn_presets.md;
# the current figures in the README ("knn memory mode").
PRESETS: dict[str, ReadConfig] = {
    # the service's default: the prompt's 8 best chunks by the store's (hybrid) search, each with
    # the 2 chunks after it, laid out by rank, 64 of their ~1,500 rows per query head and layer
    "default": ReadConfig(candidate_chunks=8, follow_chunks=2, positions="ranked", top_k=64),
    # every row searched: layers all_but_first, k 8, per query head, original positions, sinks dropped
    "ungated": ReadConfig(),
    # session 1's default: no rotation at load (the form PQ codes on disk and the GPU kernels read as is)
    "fixed": ReadConfig(layers="all", top_k=8, positions="fixed", local_offset=0, min_memory_position=0),
}


def with_following(ranked: Sequence[T], following: Callable[[T, int], Sequence[T]], n: int) -> list[T]:
    """Chunk-gated knn's read list: each ranked chunk (best first), then up to `n` chunks that follow
    it in its document (`following(chunk, n)`), each chunk once, where it first appears."""
    out: dict[T, None] = {}
    for c in ranked:
        out.setdefault(c, None)
        for f in following(c, n) if n else ():
            out.setdefault(f, None)
    return list(out)


def gated_rows(model, memory: KVMemory, config: "ReadConfig", ranked: Sequence[T],
               following: Callable[[T, int], Sequence[T]], to_id: Callable[[T], int] = int) -> "LayerMemories":
    """Chunk-gated knn's read, the one pipeline the service and the benchmarks share: the ranked
    candidate chunks (best first), each with the `config.follow_chunks` chunks after it in its
    document (`following(chunk, n)`), their rows loaded by `prepare_layer_memories(chunks=...)`.
    to_id: a ranked item's chunk id (benchmarks rank (document, chunk) pairs)."""
    chunks = [to_id(c) for c in with_following(list(ranked), following, config.follow_chunks)]
    return prepare_layer_memories(model, memory, config, chunks=chunks)


def resolve_layers(spec: Union[str, Sequence[int]], num_layers: int) -> tuple[int, ...]:
    """A preset name or explicit indices -> sorted layer indices in [0, num_layers)."""
    if isinstance(spec, str):
        third = num_layers // 3
        table = {
            "all": range(num_layers),
            "all_but_first": range(1, num_layers),  # layer 0's memory reads are positional noise
            "every4": range(0, num_layers, 4),
            "middle_third": range(third, num_layers - third),
            "last_half": range(num_layers // 2, num_layers),
            "first_half": range(0, num_layers // 2),
            "upper_two_thirds": range(third, num_layers),
        }
        if spec not in table:
            raise ValueError(f"layer preset {spec!r} is not one of {sorted(table)}")
        return tuple(table[spec])
    layers = tuple(sorted(set(int(l) for l in spec)))
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside [0, {num_layers})")
    return layers


@dataclass
class LayerMemory:
    """What one attention module reads in knn mode: its layer's rotated memory and how to read it."""

    store: KVStore  # FaissKV on a CPU model (codec fp16 | pq), TensorKV on a CUDA model
    top_k: int
    shared_per_kv_head: bool
    calls: int = field(default=0)
    gate: Optional[torch.Tensor] = None  # combine="gate": (Hq,) gate logits of this layer

    @property
    def nbytes(self) -> int:
        return self.store.nbytes

    @property
    def num_rows(self) -> int:  # not __len__: an empty memory must not make the LayerMemory falsy
        return self.store.num_rows


class LayerMemories(dict):
    """`prepare_layer_memories`' result: {layer index: LayerMemory}, with the RAM they take and
    what they were built from (so that a later call can extend them instead of rebuilding)."""

    def __init__(self, config: "ReadConfig", device: torch.device, segments: Sequence[str] = (),
                 row_chunks: Optional[np.ndarray] = None):
        super().__init__()
        self.config, self.device = config, device
        self.segments: list[str] = list(segments)  # the memory's segments whose rows the stores hold
        self.row_chunks = np.zeros(0, dtype=np.int64) if row_chunks is None else row_chunks  # (rows,) chunk of each row
        self.pq_generation: Optional[int] = None  # the memory's PQ codebooks these codes came from

    @property
    def nbytes(self) -> int:
        """RAM (or GPU memory) of every layer's store: codes, values, codebooks."""
        return sum(m.nbytes for m in self.values())

    @property
    def bytes_per_token(self) -> float:
        """What one more memory token costs over all loaded layers (codebooks excluded: they do not grow)."""
        return sum(m.store.bytes_per_row for m in self.values())

    @property
    def num_rows(self) -> int:
        """Memory rows (tokens) each layer searches."""
        return len(self.row_chunks)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def num_layers(model) -> int:
    """Decoder layers of an owned `Llama` or a transformers model."""
    return model.config.n_layers if isinstance(model, Llama) else model.config.num_hidden_layers


def _model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def rotate_keys(model, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Apply the model's own RoPE to keys (Hkv, N, D) at positions (N,): (Hkv, N, D) fp32.

    The owned model: its precomputed fp32 tables (rows past them computed the same way); transformers':
    its rotary embedding module. Both give the same numbers (the tables are transformers' formula)."""
    k = keys.float()
    if isinstance(model, Llama):
        positions = positions.long()
        n = int(positions.max()) + 1 if positions.numel() else 0
        cos, sin = model.rope_cos, model.rope_sin  # (S, D) each; sin's first half negated
        if n > cos.shape[0]:
            cos, sin = (t.to(cos.device) for t in rope_tables(model.config, n))
        cos, sin = cos[positions.to(cos.device)].to(k.device), sin[positions.to(cos.device)].to(k.device)  # (N, D)
        return k * cos + k.roll(k.shape[-1] // 2, dims=-1) * sin  # memlm.model.llama.apply_rope's form
    rotary = model.model.rotary_emb
    cos, sin = rotary(k, positions.view(1, -1).long())  # (1, N, D) each
    return k * cos + _rotate_half(k) * sin


_ROTATE_BLOCK = 1 << 16  # rows rotated in fp32 at a time


def _rotated(model, keys: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rotate_keys in blocks of rows, into a (Hkv, N, D) tensor of `dtype` (no full fp32 copy)."""
    out = torch.empty(keys.shape, dtype=dtype, device=keys.device)
    for r0 in range(0, keys.shape[1], _ROTATE_BLOCK):
        r1 = r0 + _ROTATE_BLOCK
        out[:, r0:r1] = rotate_keys(model, keys[:, r0:r1], positions[r0:r1]).to(dtype)
    return out


def _knn_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "memlm_knn" attention function: memory attention where a layer has memory, else SDPA.

    query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D) after RoPE and the cache update.
    Returns (B, Tq, Hq, D) and no attention weights, like transformers' SDPA function.
    """
    mem: Optional[LayerMemory] = getattr(module, "_memlm_knn", None)
    if mem is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise NotImplementedError(f"knn memory attention runs batch size 1, got {query.shape[0]}")
    mem.calls += 1
    out = mem.store.attention(
        query, key, value, mem.top_k, shared_per_kv_head=mem.shared_per_kv_head, scale=scaling, gate=mem.gate
    )  # (B, Hq, Tq, D); causal on the local part, the same mask SDPA would apply for batch 1
    return out.transpose(1, 2).contiguous(), None


class KnnBackend(nn.Module):
    """The owned model's attention backend at a memory layer (memlm.model.llama.AttentionBackend):
    what `_knn_attention_forward` does for transformers, on the same `LayerMemory`.

    q (1, Hq, T, hd), k, v (1, Hkv, S, hd) after RoPE and the cache update, the queries at the
    last T positions; the mask (None, or causal for a prefill piece after cached positions) is the
    causal one `KVStore.attention` applies itself. Returns (1, Hq, T, hd).
    """

    def __init__(self, memory: "LayerMemory", head_dim: int):
        super().__init__()
        self.memory, self.scale = memory, head_dim ** -0.5  # transformers' `scaling`

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        if q.shape[0] != 1:
            raise NotImplementedError(f"knn memory attention runs batch size 1, got {q.shape[0]}")
        if mask is not None and mask.shape != (q.shape[2], k.shape[2]):
            raise NotImplementedError(f"knn memory attention reads the filled cache only (eager); got a mask "
                                      f"{tuple(mask.shape)} for {q.shape[2]} queries over {k.shape[2]} keys")
        m = self.memory
        m.calls += 1
        return m.store.attention(q, k, v, m.top_k, shared_per_kv_head=m.shared_per_kv_head, scale=self.scale,
                                 gate=m.gate)  # (1, Hq, T, hd)


_registered = False


def register_attention() -> None:
    """Register "memlm_knn" with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _knn_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def prepare_layer_memories(
    model, memory: KVMemory, config: ReadConfig, previous: Optional[LayerMemories] = None,
    chunks: Optional[Sequence[int]] = None,
) -> LayerMemories:
    """Load, rotate and code the memory of each chosen layer (see the module docstring for where
    it lives). Rows follow the memory's live rows, less those below `min_memory_position`.

    codec "pq" with positions "fixed" reads the memory's PQ codes (`KVMemory.ensure_pq` trains
    and encodes what is missing, durably, so later loads only read codes); with "original" it
    trains and encodes at load (the stored codes are of un-rotated keys). A memory with fewer
    than PQ_MIN_TRAIN_ROWS rows is loaded as fp16 (a log line says so).

    previous: an earlier result for this memory and config. When the memory only gained segments
    and tombstones since (no compaction, no retraining), the stores are extended in place instead
    of rebuilt: new rows are coded with the codebooks already trained, tombstoned rows are removed
    (CPU stores; a GPU memory is reloaded). `previous` is then returned, updated.

    chunks: chunk-gated knn (`ReadConfig.candidate_chunks`): only these chunks' rows, read straight
    from the segment files (memory-mapped: a few hundred rows are read, whatever the memory's
    size) into exact `TensorKV` stores; `codec` and `previous` do not apply.
    """
    layers = resolve_layers(config.layers, num_layers(model))
    missing = [l for l in layers if l not in memory.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the KV memory (it holds {memory.layers})")
    if chunks is not None:
        return _load_rows(model, memory, config, layers, np.asarray(list(chunks), dtype=np.int64))
    if config.positions == "ranked":
        raise ValueError("positions='ranked' orders the rows of ranked chunks: it needs `chunks` (chunk-gated knn)")
    device = next(model.parameters()).device
    codec, stored_codes = config.codec, False
    if codec == "pq" and device.type == "cuda":
        log.warning("KV memory codec 'pq' is CPU-only (the fused kernels read fp16/bf16); "
                    "loading %s as %s on %s", memory.path, memory.manifest.dtype, device)
        codec = "fp16"
    elif codec == "pq" and config.positions == "fixed":
        stored_codes = memory.ensure_pq(config.pq_m, train_rows=config.pq_train_rows)
        if not stored_codes:
            log.info("KV memory %s: %d rows < %d needed to train PQ; loading it as fp16",
                     memory.path, len(memory), PQ_MIN_TRAIN_ROWS)
            codec = "fp16"
    elif codec == "pq":
        log.warning("KV memory %s: PQ with positions=%r trains and encodes the rotated keys at every "
                    "load (stored codes are of un-rotated keys); slow for big memories", memory.path, config.positions)
    generation = memory.pq_generation(config.pq_m) if stored_codes else None
    segments = list(memory.manifest.segments)
    if _can_extend(previous, config, layers, device, segments, codec, generation):
        out, new_segments = previous, segments[len(previous.segments):]
    else:
        out, new_segments = LayerMemories(config, device), segments
        out.pq_generation = generation

    # Rows of the new segments: live and at or after min_memory_position.
    picks, new_chunks, pos, _ = _pick_rows(memory, new_segments, config.min_memory_position)

    for l in layers:
        if stored_codes:  # codes straight from disk: no fp16 row is read
            store = out[l].store if l in out else FaissKV(
                memory.manifest.num_kv_heads, memory.manifest.head_dim, "pq", config.pq_m,
                codebooks=memory.pq_codebooks(l, config.pq_m))
            for seg, keep in picks:
                store.add_codes(*memory.pq_segment_codes(seg, l, config.pq_m, keep))
        else:
            k, v = _read_layer(memory, picks, l)
            if device.type == "cuda":
                dtype = _model_dtype(model) if _model_dtype(model) in (torch.float16, torch.bfloat16) else k.dtype
                if config.positions == "original":
                    k = _rotated(model, k.to(device), pos.to(device), dtype)
                store = TensorKV(k.to(device, dtype), v.to(device, dtype))
            else:
                if config.positions == "original":
                    k = _rotated(model, k, pos, torch.float16)  # "fixed": position 0, RoPE is the identity
                if l in out:
                    store = out[l].store
                    for r0 in range(0, k.shape[1], _ROTATE_BLOCK):
                        store.add(k[:, r0 : r0 + _ROTATE_BLOCK].float(), v[:, r0 : r0 + _ROTATE_BLOCK].float())
                else:
                    store = FaissKV.from_tensors(k, v, codec, pq_m=config.pq_m, train_rows=config.pq_train_rows,
                                                 seed=l, name=f"{memory.path} layer {l}")
        if isinstance(store, FaissKV):
            store.value_codes()  # join the appended blocks now, not in the first generation
        if l not in out:
            out[l] = LayerMemory(store, config.top_k, config.shared_per_kv_head)

    out.segments = segments
    out.row_chunks = np.concatenate([out.row_chunks, new_chunks])
    dead = ~memory.live_mask(out.row_chunks)  # rows of chunks tombstoned since they were loaded
    if dead.any():
        for m in out.values():
            m.store.remove_rows(dead)
        out.row_chunks = out.row_chunks[~dead]
    return out


def _load_rows(model, memory: KVMemory, config: ReadConfig, layers: tuple[int, ...], chunks: np.ndarray) -> LayerMemories:
    """prepare_layer_memories(chunks=...): the live rows of `chunks` at or after min_memory_position."""
    device = next(model.parameters()).device
    dtype = _model_dtype(model) if device.type == "cuda" and _model_dtype(model) in (torch.float16, torch.bfloat16) else torch.float32
    picks, row_chunks, pos, row_ids = _pick_rows(memory, memory.manifest.segments, config.min_memory_position, chunks)
    out = LayerMemories(config, device, memory.manifest.segments, row_chunks)
    if config.positions == "ranked":
        pos = _ranked_positions(row_chunks, row_ids, chunks, local_offset(memory, config, out.num_rows))
    for l in layers:
        k, v = _read_layer(memory, picks, l)
        k, v = k.to(device), v.to(device, dtype)
        k = rotate_keys(model, k, pos.to(device)).to(dtype) if config.positions != "fixed" else k.to(dtype)
        out[l] = LayerMemory(TensorKV(k, v), config.top_k, config.shared_per_kv_head)
    return out


def _pick_rows(memory: KVMemory, segments: Sequence[str], min_position: int, chunks: Optional[np.ndarray] = None
               ) -> tuple[list[tuple[str, np.ndarray]], np.ndarray, torch.Tensor, np.ndarray]:
    """The rows to read of `segments`: live, at or after window position `min_position` and, when
    given, of `chunks`. Returns [(segment, row mask)] for the segments with any, and for the picked
    rows in memory order their chunk ids, positions (int64 tensor) and row ids among `segments`."""
    picks, row_chunks, positions, row_ids = [], [], [], []
    offset = 0  # rows of the segments before this one
    for seg in segments:
        c, p = memory.segment_rows(seg)
        keep = memory.live_mask(c) & (p >= min_position)
        if chunks is not None:
            keep &= np.isin(c, chunks)
        if keep.any():
            picks.append((seg, keep))
            row_chunks.append(c[keep])
            positions.append(p[keep])
            row_ids.append(np.flatnonzero(keep) + offset)
        offset += len(c)
    if not picks:
        empty = np.zeros(0, dtype=np.int64)
        return picks, empty, torch.zeros(0, dtype=torch.int64), empty
    return (picks, np.concatenate(row_chunks), torch.from_numpy(np.concatenate(positions).astype(np.int64)),
            np.concatenate(row_ids))


def _read_layer(memory: KVMemory, picks: list[tuple[str, np.ndarray]], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys (pre-RoPE) and values of the picked rows of one layer: (Hkv, n, D) each, on-disk dtype."""
    parts = [memory.segment_layer(seg, layer, keep) for seg, keep in picks]
    if not parts:
        return _empty_layer(memory), _empty_layer(memory)
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def _ranked_positions(row_chunks: np.ndarray, row_ids: np.ndarray, ranked: np.ndarray, end: int) -> torch.Tensor:
    """positions="ranked": (n,) positions for rows in memory order. Runs of adjacent rows (chunks
    that follow each other in a document: a needle cut by a chunk boundary stays whole) are laid
    out one after another in text order within a run, runs by their best chunk's rank, worst
    first, so that the best run ends at end - 1, right before the prompt (at `end` >= n)."""
    n = len(row_chunks)
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    rank = {int(c): r for r, c in reversed(list(enumerate(ranked.tolist())))}
    run = np.concatenate([[0], np.cumsum(np.diff(row_ids) != 1)])  # (n,) run number of each row
    run_rank = np.full(run[-1] + 1, len(ranked))
    np.minimum.at(run_rank, run, [rank[int(c)] for c in row_chunks])
    order = np.lexsort((np.arange(n), -run_rank[run]))  # worst run first; text order within a run
    pos = torch.empty(n, dtype=torch.int64)
    pos[torch.from_numpy(order)] = torch.arange(end - n, end)
    return pos


def _empty_layer(memory: KVMemory) -> torch.Tensor:
    m = memory.manifest
    return torch.zeros(m.num_kv_heads, 0, m.head_dim, dtype=torch.float16)


def _can_extend(previous: Optional[LayerMemories], config: ReadConfig, layers: tuple[int, ...], device: torch.device,
                segments: list[str], codec: str, generation: Optional[int]) -> bool:
    """Whether `previous` can be extended to the memory's current segments (see prepare_layer_memories)."""
    if not isinstance(previous, LayerMemories) or device.type == "cuda" or previous.device != device:
        return False
    same = replace(previous.config, top_k=config.top_k, candidate_chunks=config.candidate_chunks) == config  # read per call
    if not same or tuple(sorted(previous)) != layers or previous.segments != segments[: len(previous.segments)]:
        return False  # another config, or compacted: segments were rewritten
    if previous.pq_generation != generation:
        return False  # PQ codebooks (re)trained since
    stores = [m.store for m in previous.values()]
    # A "pq" load that fell back to fp16 for want of rows is redone once there are enough.
    return all(isinstance(s, FaissKV) and s.codec == codec for s in stores)


def local_offset(memory: KVMemory, config: ReadConfig, rows: int = 0) -> int:
    """First position of the local context. rows: memory rows loaded ("ranked" lays them all out
    before the prompt, so more than a window of them pushes the prompt further)."""
    if config.local_offset is not None:
        return int(config.local_offset)
    if config.positions == "ranked":
        return max(memory.manifest.window, rows)
    return memory.manifest.window if config.positions == "original" else 0


def _trained_gate(attn, layer: int, num_heads: int) -> torch.Tensor:
    """The (Hq,) gate logits a model trained with Memorizing Transformer's gate keeps on `attn`."""
    gate = getattr(attn, GATE_ATTR, None)
    if gate is None:
        raise ValueError(f"combine='gate' needs a model trained with memory gates: layer {layer}'s attention "
                         f"has no `{GATE_ATTR}` (use combine='softmax' for a pretrained model)")
    gate = gate.detach().reshape(-1)
    if gate.numel() != num_heads:
        raise ValueError(f"layer {layer}'s {GATE_ATTR} has {gate.numel()} values, expected one per query head ({num_heads})")
    return gate


@contextmanager
def knn_mode(
    model, memory: KVMemory, config: ReadConfig = ReadConfig(), layer_memories: Optional[dict[int, LayerMemory]] = None
) -> Iterator[dict[int, LayerMemory]]:
    """Put `model` (an owned `Llama` or a transformers Llama) into knn mode for the block; yields
    the per-layer memories (for inspection). On exit the model is as it was, also after an exception.

    layer_memories: pass what `prepare_layer_memories` returned to reuse it across generations.
    """
    mems = layer_memories if layer_memories is not None else prepare_layer_memories(model, memory, config)
    offset = local_offset(memory, config, mems.num_rows if isinstance(mems, LayerMemories) else 0)
    owned = isinstance(model, Llama)
    heads = model.config.n_heads if owned else model.config.num_attention_heads
    for l, m in mems.items():
        m.gate = _trained_gate(_attention_module(model, l), l, heads) if config.combine == "gate" else None
    with (_owned_knn if owned else _hf_knn)(model, mems, offset):
        yield mems


def _attention_module(model, layer: int) -> nn.Module:
    """Layer `layer`'s attention module (where a trained model keeps its `memory_gate`)."""
    return model.layers[layer].attention if isinstance(model, Llama) else model.model.layers[layer].self_attn


@contextmanager
def _owned_knn(model: Llama, mems: dict[int, LayerMemory], offset: int) -> Iterator[None]:
    """knn on memlm's Llama: `KnnBackend`s at the memory layers, the local context at `offset`."""
    old_backends = {l: model.layers[l].attention.backend for l in mems}
    old_offset, old_rope = model.rope_offset, (model.rope_cos, model.rope_sin)
    try:
        for l, m in mems.items():
            model.layers[l].attention.backend = KnnBackend(m, model.config.head_dim)
        if offset:
            need = offset + model.config.max_position_embeddings  # every cache slot, shifted
            if need > model.rope_cos.shape[0]:
                cos, sin = rope_tables(model.config, need)
                model.rope_cos, model.rope_sin = cos.to(old_rope[0].device), sin.to(old_rope[0].device)
            model.rope_offset = old_offset + offset
        yield
    finally:
        model.rope_offset = old_offset
        model.rope_cos, model.rope_sin = old_rope
        for l, backend in old_backends.items():
            model.layers[l].attention.backend = backend


@contextmanager
def _hf_knn(model, mems: dict[int, LayerMemory], offset: int) -> Iterator[None]:
    """knn on transformers' Llama: the "memlm_knn" attention function, position ids + `offset`."""
    register_attention()
    decoder = model.model.layers
    old_impl = model.config._attn_implementation
    hook = None
    try:
        for l, m in mems.items():
            decoder[l].self_attn._memlm_knn = m
        model.config._attn_implementation = ATTN_NAME
        if offset:
            def shift_positions(_module, args, kwargs):
                if "position_ids" in kwargs and kwargs["position_ids"] is not None:
                    kwargs["position_ids"] = kwargs["position_ids"] + offset
                elif len(args) > 1:
                    args = (args[0], args[1] + offset, *args[2:])
                return args, kwargs

            hook = model.model.rotary_emb.register_forward_pre_hook(shift_positions, with_kwargs=True)
        yield
    finally:
        if hook is not None:
            hook.remove()
        model.config._attn_implementation = old_impl
        for layer in decoder:
            if hasattr(layer.self_attn, "_memlm_knn"):
                del layer.self_attn._memlm_knn
