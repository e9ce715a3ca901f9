"""RETRO's neighbour states of a collection, on disk: for every stored chunk, the frozen base's
states of it as a neighbour (the chunk and its continuation, r tokens, run alone:
`model.neighbour_states`) at the layers the CCA layers read, computed once at ingest, so that a
retrieval skips its base pass (README, retro: decode speed). Derived data on the lifecycle of
`memlm.modes.derived_memory` (`NeighbourStateManager` below keeps it in step; `StoredFirst` reads it).

Layout (`collections/<name>/retro/`):
    manifest.json        the commit point: layers, r, width, dtype, live segments, deleted chunk ids,
                         the watermark (applied_seq)
    seg-000001/
        chunk_ids.npy    (n,) int64
        tokens.npy       (n, r) int64: the neighbour's token ids as `neighbours.neighbour_rows` lays
                         them out for a search hit (zeros past a short continuation)
        token_keys.npy   (n,) uint64: each row's `token_keys` digest, what `lookup`'s index is
                         built from at open (8 bytes a row read, not tokens.npy's r x 8); a segment
                         written before this file existed is hashed from tokens.npy instead
        states_L14.npy   (n, r, D) fp16: the residual stream entering layer 14, and so on per layer

Segments, durability, tombstones and compaction: `memlm.index.segments.SegmentedRows` (as for
`memlm.index.kv_memory.KVMemory`). A segment is written under a temporary name (files fsynced),
renamed into place, and is part of the memory only once the manifest (tmp + fsync + os.replace +
fsync of the folder) lists it; what the manifest does not list is removed on open. Deletes are
tombstones in the manifest; `compact` rewrites the live rows.

Reads go by content (`lookup`): a neighbour row's token ids find the stored states of exactly those
ids (the digest finds the row, the stored ids are compared), so a read never gets another text's
states whatever changed since (as the in-memory `NeighbourStateCache`, which this sits behind).
Size: layers x r x D x 2 bytes per chunk plus r x 8 for its ids and 16 for its chunk id and digest:
738 KB for the bundled model's 5 CCA layers and r = 128 (`bytes_per_chunk`).
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from memlm.index.segments import DTYPES, SegmentedRows, from_disk, to_disk
from memlm.modes.derived_memory import DerivedMemoryManager
from memlm.modes.retro.model import RetroConfig, neighbour_states
from memlm.modes.retro.neighbours import neighbour_tokens

FOLDER = "retro"
BATCH = 8  # neighbours per base pass while building


def token_keys(tokens: np.ndarray) -> np.ndarray:
    """(n, r) token ids -> (n,) uint64: each row's 8-byte blake2b digest (the same in every process,
    unlike `hash`), the key `NeighbourStateMemory.lookup` finds a row by."""
    rows = np.ascontiguousarray(tokens, dtype="<i8")
    return np.frombuffer(b"".join(hashlib.blake2b(row.tobytes(), digest_size=8).digest() for row in rows),
                         dtype="<u8").astype(np.uint64)


@dataclass
class StateManifest:
    layers: list[int]  # the layers whose input states are stored (the CCA layers)
    length: int  # r: tokens per neighbour row
    dim: int  # D: the model's width
    dtype: str = "float16"
    segments: list[str] = field(default_factory=list)
    deleted_chunks: list[int] = field(default_factory=list)
    next_segment: int = 1
    version: int = 1
    applied_seq: int = -1  # the store's oplog seq up to which every write is held; -1: unknown


class NeighbourStateMemory(SegmentedRows):
    """The stored neighbour states of one collection's chunks; one row per chunk (segments,
    tombstones, compaction: `SegmentedRows`)."""

    what = "neighbour states"
    manifest_type = StateManifest
    manifest: StateManifest

    def __init__(self, path: Path, manifest: StateManifest):
        super().__init__(path, manifest)
        self._index: Optional[dict[int, tuple[str, int]]] = None  # live rows' token_keys -> (segment, row)

    @classmethod
    def create(cls, path: "str | os.PathLike", layers: Sequence[int], length: int, dim: int,
               dtype: str = "float16") -> "NeighbourStateMemory":
        if dtype not in DTYPES:
            raise ValueError(f"neighbour states dtype {dtype!r} is not one of {DTYPES}")
        return cls._create(path, StateManifest(sorted(int(l) for l in set(layers)), int(length), int(dim), dtype))

    def row_files(self) -> dict[str, int]:
        """Every file holds rows along its first axis."""
        return {**{f"states_L{layer:02d}": 0 for layer in self.manifest.layers}, "tokens": 0, "chunk_ids": 0}

    def derived_files(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"token_keys": token_keys(arrays["tokens"])}

    def _live_rows_changed(self) -> None:
        self._index = None

    # --- facts ----------------------------------------------------------------------------

    @property
    def bytes_per_chunk(self) -> int:
        """On-disk bytes per chunk: its states at every stored layer, its token ids, chunk id and digest."""
        m = self.manifest
        return len(m.layers) * m.length * m.dim * 2 + m.length * 8 + 8 + 8

    # --- reading --------------------------------------------------------------------------

    def _segment_keys(self, segment: str) -> np.ndarray:
        """(n,) uint64 `token_keys` of one segment's rows: its token_keys.npy, or, for a segment
        written before that file existed, hashed from its tokens.npy (it goes at the next compaction)."""
        try:
            return np.asarray(self._segment_file(segment, "token_keys"))
        except FileNotFoundError:
            return token_keys(self._segment_file(segment, "tokens"))

    def _lookup_index(self) -> dict[int, tuple[str, int]]:
        """{token_keys digest: (segment, row)} of the live rows; where rows share a digest, the first."""
        if self._index is None:
            index: dict[int, tuple[str, int]] = {}
            for seg in self.manifest.segments:
                live = np.flatnonzero(self.live_mask(self.segment_chunk_ids(seg)))
                for row, key in zip(live.tolist(), self._segment_keys(seg)[live].tolist()):
                    index.setdefault(key, (seg, row))
            self._index = index
        return self._index

    def lookup(self, ids: Tensor) -> dict[int, dict[int, Tensor]]:
        """ids (N, r) int64 neighbour rows -> {i: {layer: (r, D) fp32}} for the rows whose states are
        stored (the others are left out)."""
        m = self.manifest
        if ids.dim() != 2 or ids.shape[1] != m.length or not m.segments:
            return {}
        index = self._lookup_index()
        query = ids.cpu().numpy().astype(np.int64)  # (N, r)
        by_segment: dict[str, list[tuple[int, int]]] = {}
        for i, key in enumerate(token_keys(query).tolist()):
            if key in index:
                seg, row = index[key]
                by_segment.setdefault(seg, []).append((i, row))
        out: dict[int, dict[int, Tensor]] = {}
        for seg, pairs in by_segment.items():
            # A digest can collide: only rows whose stored ids are the asked ones are read.
            stored = np.asarray(self._segment_file(seg, "tokens")[np.asarray([r for _, r in pairs])])
            pairs = [p for p, same in zip(pairs, (stored == query[[i for i, _ in pairs]]).all(axis=1)) if same]
            if not pairs:
                continue
            rows = np.asarray([r for _, r in pairs])
            out.update({i: {} for i, _ in pairs})
            for layer in m.layers:
                block = from_disk(self._segment_file(seg, f"states_L{layer:02d}")[rows], m.dtype).float()
                for j, (i, _) in enumerate(pairs):
                    out[i][layer] = block[j]
        return dict(sorted(out.items()))  # in the order asked

    # --- writing --------------------------------------------------------------------------

    def add(self, chunk_ids: Sequence[int] | np.ndarray, tokens: np.ndarray, states: dict[int, Tensor]) -> int:
        """Append n chunks' rows as one segment (durable when this returns): tokens (n, r) int64,
        states {layer: (n, r, D)} for every stored layer. Returns n."""
        m = self.manifest
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(chunk_ids)
        if tokens.shape != (n, m.length):
            raise ValueError(f"tokens of shape {tokens.shape} for {n} chunks of {m.length} tokens")
        if set(states) != set(m.layers):
            raise ValueError(f"expected states of layers {m.layers}, got {sorted(states)}")
        for layer, t in states.items():
            if tuple(t.shape) != (n, m.length, m.dim):
                raise ValueError(f"states of layer {layer} have shape {tuple(t.shape)}, expected {(n, m.length, m.dim)}")
        if n == 0:
            return 0
        arrays = {f"states_L{layer:02d}": to_disk(states[layer], m.dtype) for layer in m.layers}
        name = self._append_segment({**arrays, "tokens": tokens, "chunk_ids": chunk_ids})
        if self._index is not None:
            for row, key in enumerate(self._segment_keys(name).tolist()):
                self._index.setdefault(key, (name, row))
        return n


class NeighbourStateManager(DerivedMemoryManager):
    """Keeps the neighbour states of every collection with retro memory on in step with the store.
    `retro_config()` is the served adapter's `RetroConfig` (its CCA layers and r shape the memory;
    a memory of other layers or length is rebuilt)."""

    what = "neighbour states"

    def __init__(self, store, model, settings, retro_config: Callable[[], RetroConfig], model_name: str = ""):
        super().__init__(store, model, settings, model_name, mode="retro", folder=FOLDER)
        self.retro_config = retro_config

    def fits(self, mem: NeighbourStateMemory) -> bool:
        rc, m = self.retro_config(), mem.manifest
        return (tuple(m.layers), m.length, m.dim) == (tuple(rc.layers), rc.neighbour_length, self.model.config.dim)

    def open_memory(self, path: Path) -> NeighbourStateMemory:
        mem = NeighbourStateMemory.open(path)
        if not self.fits(mem):
            rc, m = self.retro_config(), mem.manifest
            raise ValueError(f"it holds layers {m.layers}, r {m.length}, width {m.dim}; the served adapter reads layers "
                             f"{list(rc.layers)}, r {rc.neighbour_length}, width {self.model.config.dim}")
        return mem

    def create_memory(self, path: Path, config) -> NeighbourStateMemory:
        from memlm.modes.retro.settings import CollectionOptions

        rc, options = self.retro_config(), CollectionOptions(**config.memory[self.mode])
        mem = NeighbourStateMemory.create(path, rc.layers, rc.neighbour_length, self.model.config.dim, options.dtype)
        mem.set_applied_seq(0)  # empty: every write up to seq 0
        return mem

    def build(self, name: str, config, mem: NeighbourStateMemory, chunk_ids: Sequence[int],
              max_segments: Optional[int]) -> tuple[int, int, bool]:
        """Each chunk as a neighbour (it and its continuation, as a search hit reads it) through the
        base layers, `retro.build_batch_chunks` chunks per segment: (chunks added, documents, done)."""
        rc, store = self.retro_config(), self.store
        records = store.read_chunks(name, list(chunk_ids), missing_ok=True)
        live = [(int(c), rec) for c, rec in zip(chunk_ids, records) if rec is not None]
        documents = len({rec.doc_id for _, rec in live})
        step, added, segments = self.settings.build_batch_chunks, 0, 0
        for first in range(0, len(live), step):
            if getattr(store, "stopping", False) or (max_segments is not None and segments >= max_segments):
                return added, documents, False
            part = live[first : first + step]
            following = [store.following_chunks(name, c, 1) if rc.continuation_tokens else [] for c, _ in part]
            nxt = dict(zip((f[0] for f in following if f), store.read_chunks(name, [f[0] for f in following if f], missing_ok=True)))
            tokens = np.zeros((len(part), rc.neighbour_length), np.int64)
            for j, ((_c, rec), f) in enumerate(zip(part, following)):
                toks = neighbour_tokens(rec, nxt.get(f[0]) if f else None, rc)
                tokens[j, : len(toks)] = toks
            with torch.inference_mode():
                ids = torch.from_numpy(tokens)
                parts = [neighbour_states(self.model, ids[i : i + BATCH], rc.layers) for i in range(0, len(ids), BATCH)]
            states = {layer: torch.cat([p[layer] for p in parts]) for layer in rc.layers}
            added += mem.add([c for c, _ in part], tokens, states)
            segments += 1
        return added, documents, True


class StoredFirst:
    """The state source a generation's `RetroState` reads: the in-memory LRU cache first, then the
    collection's stored states, then the base pass for what neither has (`NeighbourStateCache.states`'s
    contract). What comes from disk enters the cache too."""

    def __init__(self, cache, memory: NeighbourStateMemory):
        self.cache, self.memory = cache, memory
        self.stored_rows = 0  # rows read from the stored states
        self.computed_rows = 0  # rows neither held: run through the base layers

    def states(self, ids: Tensor, compute: Callable[[Tensor], dict[int, Tensor]]) -> dict[int, Tensor]:
        def from_disk_or_compute(some: Tensor) -> dict[int, Tensor]:
            found = self.memory.lookup(some)
            self.stored_rows += len(found)
            rest = [i for i in range(len(some)) if i not in found]
            self.computed_rows += len(rest)
            fresh = compute(some[rest]) if rest else {}
            layers = next(iter(found.values())).keys() if found else fresh.keys()
            out = {}
            for layer in layers:
                rows = [None] * len(some)
                for i, s in found.items():
                    rows[i] = s[layer]
                for j, i in enumerate(rest):
                    rows[i] = fresh[layer][j]
                dtype = fresh[layer].dtype if rest else rows[0].dtype
                out[layer] = torch.stack([r.to(dtype) for r in rows])
            return out

        return self.cache.states(ids, from_disk_or_compute)
