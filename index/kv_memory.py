"""`KVMemory`: the keys and values a language model computed over a collection's text, on disk,
for the `knn` memory mode (Memorizing / Extended Mind Transformers).

Layout of one collection's folder:
    manifest.json            the commit point: shape facts, live segments, deleted chunk ids
    seg-000001/              one immutable segment per `build`/`add` call
        k_L07.npy            (Hkv, n, D) keys of layer 7, BEFORE RoPE, fp16 (or bf16 bits as uint16)
        v_L07.npy            (Hkv, n, D) values of layer 7
        chunk_ids.npy        (n,) int64: the chunk each row (token) belongs to
        positions.npy        (n,) int32: the position the token had when its K/V were computed

Keys are kept un-rotated with their positions so that the position strategy (see
`memlm.modes.knn.reading`) is chosen at read time: "original" re-rotates each key to its stored position,
"fixed" gives all of them one position, without rebuilding the memory.

Segments, durability, tombstones and compaction: `memlm.index.segments.SegmentedRows` (shared with
RETRO's neighbour states). A segment is written under a temporary folder (files fsynced), renamed into
place, and part of the memory only once manifest.json (tmp + fsync + os.replace + fsync of the
folder) lists it; deleting chunks writes their ids into the manifest (tombstones); `compact()`
rewrites live rows into one segment. The store (LMDB) stays the source of truth: this folder can
be rebuilt from its token ids at any time.

Size: 2 (K, V) x Hkv x D x 2 bytes per stored layer and token, plus 12 bytes of row metadata;
`bytes_per_token`. For SmolLM2-135M with all 30 layers: 23,052 bytes/token (a 16k-token memory is
~378 MB); with 8 layers 6,156 bytes/token.

Product quantization (`ensure_pq(m)`), a derived cache beside the exact segments:
    pq-m16/pq.json                     commit point: generation, rows trained on, coded segments
    pq-m16/gen-000001/codebooks_L07.npy  (2, Hkv, M, 256, D/M) fp32: keys' and values' centroids
    pq-m16/gen-000001/seg-000001/k_L07.npy, v_L07.npy  (Hkv, n, M) uint8 codes of EVERY row
Why on disk and not only in RAM at load: k-means of 2 x Hkv codebooks per layer takes seconds
(~8 s per SmolLM2 layer at M = 16, 18 s at M = 32, on 3.8k rows, one core) and encoding a
million rows per layer and head is tens of GFLOP: neither can be redone at every load, and
loading codes reads M bytes per key instead of 2 x D. The fp16/bf16 segments stay the exact data: codes are rebuilt
from them (another M, after compaction, or a retrain once the memory has grown 4x past the
rows its codebooks saw, up to `train_rows`). Codes are of the PRE-RoPE keys: valid for readers
that search keys at one fixed position (memlm.modes.knn.reading's "fixed"), where RoPE is the identity.
Writes follow the segment rules: files fsynced under a temporary name, renamed, then pq.json
(tmp + fsync + os.replace + fsync of the folder); what pq.json does not list is removed.

Limits: rows of all segments are concatenated into RAM by `layer()`; fine up to a few hundred
thousand tokens per layer on CPU, not beyond (readers that go segment by segment:
`segment_layer`, `pq_segment_codes`).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from memlm.index.segments import DTYPES, SegmentedRows, from_disk, fsync_dir, save_npy_durably, to_disk, write_manifest

PQ_MANIFEST = "pq.json"
PQ_BITS = 8  # bits per PQ sub-code: 256 centroids per sub-quantizer, one byte
PQ_MIN_TRAIN_ROWS = 10 * (1 << PQ_BITS)  # fewer rows per head: k-means of 256 centroids is noise
_ENCODE_BLOCK = 1 << 16  # rows converted to fp32 at a time while encoding


@dataclass
class KVMemoryManifest:
    layers: list[int]  # which decoder layers are stored
    num_kv_heads: int
    head_dim: int
    dtype: str = "float16"  # on-disk dtype of K and V: "float16" | "bfloat16" (stored as uint16 bits)
    window: int = 1024  # tokens per forward pass when building (positions lie in [0, window))
    overlap: int = 128  # tokens of left context a window shares with the one before
    segments: list[str] = field(default_factory=list)
    deleted_chunks: list[int] = field(default_factory=list)
    next_segment: int = 1
    version: int = 1
    # The store's oplog seq up to which this memory holds every acknowledged write (its durable
    # watermark); -1: unknown (a memory written before watermarks, or one a build left behind).
    applied_seq: int = -1


class KVMemory(SegmentedRows):
    """Per-layer keys (pre-RoPE) and values of every memory token of one collection, on disk; one
    row per token (segments, tombstones, compaction: `SegmentedRows`)."""

    what = "KV memory"
    manifest_type = KVMemoryManifest
    manifest: KVMemoryManifest

    # --- opening --------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path: "str | os.PathLike",
        layers: Sequence[int],
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: str = "float16",
        window: int = 1024,
        overlap: int = 128,
    ) -> "KVMemory":
        if dtype not in DTYPES:
            raise ValueError(f"KV memory dtype {dtype!r} is not one of {DTYPES}")
        if not 0 <= overlap < window:
            raise ValueError(f"overlap={overlap} must lie in [0, window={window})")
        return cls._create(path, KVMemoryManifest(sorted(set(int(l) for l in layers)), num_kv_heads, head_dim, dtype, window, overlap))

    def row_files(self) -> dict[str, int]:
        """K and V (Hkv, n, D) of every stored layer hold rows along axis 1; the row metadata along 0."""
        kv = {f"{kind}_L{l:02d}": 1 for l in self.manifest.layers for kind in ("k", "v")}
        return {**kv, "chunk_ids": 0, "positions": 0}

    # --- facts ----------------------------------------------------------------------------

    @property
    def layers(self) -> list[int]:
        return list(self.manifest.layers)

    @property
    def bytes_per_token(self) -> int:
        """On-disk bytes per memory token: K and V of every stored layer, plus chunk id and position."""
        m = self.manifest
        return 2 * len(m.layers) * m.num_kv_heads * m.head_dim * 2 + 8 + 4

    def positions(self) -> np.ndarray:
        """(N,) int32 position each live row had when its K/V were computed."""
        parts = []
        for s in self.manifest.segments:
            c, p = self.segment_rows(s)
            parts.append(p[self.live_mask(c)])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)

    def segment_rows(self, segment: str) -> tuple[np.ndarray, np.ndarray]:
        """(chunk_ids (n,) int64, positions (n,) int32) of EVERY row of one live segment, tombstoned
        rows included (mask them with `live_mask`): for readers that load segment by segment."""
        self._check_live(segment)
        return self.segment_chunk_ids(segment), np.asarray(self._segment_file(segment, "positions"))

    def segment_layer(self, segment: str, layer: int, rows: Optional[np.ndarray] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keys, values) (Hkv, n, D) of one segment and layer in the on-disk dtype; rows: an
        optional (n_segment,) bool mask (e.g. `live_mask`), applied before anything is copied."""
        if layer not in self.manifest.layers:
            raise KeyError(f"layer {layer} is not in this KV memory (stored layers: {self.manifest.layers})")
        self._check_live(segment)
        k = self._segment_file(segment, f"k_L{layer:02d}")
        v = self._segment_file(segment, f"v_L{layer:02d}")
        if rows is not None and not rows.all():
            k, v = k[:, rows], v[:, rows]
        return from_disk(k, self.manifest.dtype), from_disk(v, self.manifest.dtype)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Live (keys, values) of one stored layer: two (Hkv, N, D) tensors in the on-disk dtype.

        Keys are pre-RoPE; rows follow `chunk_ids()` / `positions()`.
        """
        if layer not in self.manifest.layers:
            raise KeyError(f"layer {layer} is not in this KV memory (stored layers: {self.manifest.layers})")
        m = self.manifest
        ks, vs = [], []
        for s in m.segments:
            k, v = self.segment_layer(s, layer, self.live_mask(self.segment_chunk_ids(s)))
            ks.append(k)
            vs.append(v)
        if not ks:
            empty = torch.zeros(m.num_kv_heads, 0, m.head_dim, dtype=torch.float16 if m.dtype == "float16" else torch.bfloat16)
            return empty, empty.clone()
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1)

    # --- writing --------------------------------------------------------------------------

    def add(
        self,
        keys: dict[int, torch.Tensor],  # layer -> (Hkv, n, D) pre-RoPE keys
        values: dict[int, torch.Tensor],  # layer -> (Hkv, n, D)
        chunk_ids: Sequence[int] | np.ndarray,  # (n,)
        positions: Sequence[int] | np.ndarray,  # (n,)
    ) -> int:
        """Append n rows as one new segment (durable when this returns). Returns n."""
        m = self.manifest
        chunk_ids = np.asarray(chunk_ids, dtype=np.int64)
        positions = np.asarray(positions, dtype=np.int32)
        n = len(chunk_ids)
        if len(positions) != n:
            raise ValueError(f"{len(positions)} positions for {n} rows")
        if set(keys) != set(m.layers) or set(values) != set(m.layers):
            raise ValueError(f"expected keys and values for layers {m.layers}, got {sorted(keys)} / {sorted(values)}")
        for l in m.layers:
            for name, t in (("keys", keys[l]), ("values", values[l])):
                if tuple(t.shape) != (m.num_kv_heads, n, m.head_dim):
                    raise ValueError(f"{name} of layer {l} have shape {tuple(t.shape)}, expected {(m.num_kv_heads, n, m.head_dim)}")
        if n == 0:
            return 0
        arrays = {}
        for l in m.layers:
            arrays[f"k_L{l:02d}"], arrays[f"v_L{l:02d}"] = to_disk(keys[l], m.dtype), to_disk(values[l], m.dtype)
        self._append_segment({**arrays, "chunk_ids": chunk_ids, "positions": positions})
        return n

    # --- product quantization (a derived cache, see the module docstring) -------------------

    def _pq_dir(self, m: int) -> Path:
        return self.path / f"pq-m{m:02d}"

    def _pq_state(self, m: int) -> Optional[dict]:
        try:
            return json.loads((self._pq_dir(m) / PQ_MANIFEST).read_text())
        except FileNotFoundError:
            return None

    def pq_generation(self, m: int) -> Optional[int]:
        """The current codebooks' generation (changes on retraining), None if there are none."""
        state = self._pq_state(m)
        return None if state is None else int(state["generation"])

    def ensure_pq(self, m: int, *, train_rows: int = 16384, seed: int = 0) -> bool:
        """Make PQ codes (m bytes per key and per value, per KV head) exist for every live segment
        and every stored layer: train codebooks if there are none (or retrain, see the module
        docstring), encode the segments that lack codes. Durable when it returns.

        Returns False, writing nothing, when the memory has fewer than PQ_MIN_TRAIN_ROWS live rows.
        """
        mf = self.manifest
        if m < 1 or mf.head_dim % m:
            raise ValueError(f"pq m={m} must divide the head dim {mf.head_dim}")
        if train_rows < PQ_MIN_TRAIN_ROWS:
            raise ValueError(f"train_rows={train_rows} must be >= {PQ_MIN_TRAIN_ROWS}")
        n = len(self)
        state = self._pq_state(m)
        stale = state is not None and int(state["trained_rows"]) < train_rows and n >= 4 * int(state["trained_rows"])
        if state is None or stale:
            if n < PQ_MIN_TRAIN_ROWS:
                return False
            gen = 1 if state is None else int(state["generation"]) + 1
            state = {"m": m, "generation": gen, "trained_rows": min(n, train_rows), "segments": []}
            gen_dir = self._pq_dir(m) / f"gen-{gen:06d}"
            shutil.rmtree(gen_dir, ignore_errors=True)
            tmp = self._pq_dir(m) / f".tmp-gen-{gen:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            sample = self._sample_live_rows(min(n, train_rows), seed)
            for layer in mf.layers:
                save_npy_durably(tmp / f"codebooks_L{layer:02d}.npy", self._train_layer_pq(layer, m, sample, seed))
            fsync_dir(tmp)
            os.replace(tmp, gen_dir)
            fsync_dir(gen_dir.parent)
        gen_dir = self._pq_dir(m) / f"gen-{int(state['generation']):06d}"
        coded = [s for s in state["segments"] if s in mf.segments]
        todo = [s for s in mf.segments if s not in coded]
        if todo or coded != state["segments"] or stale:
            books = {layer: np.load(gen_dir / f"codebooks_L{layer:02d}.npy") for layer in mf.layers}
            for seg in todo:
                self._encode_segment(seg, gen_dir, books)
            state["segments"] = coded + todo
            self._write_pq_state(m, state)
        # Leftovers: older generations, codes of segments compacted away, crashed writes.
        for p in self._pq_dir(m).iterdir():
            if p.is_dir() and p != gen_dir:
                shutil.rmtree(p, ignore_errors=True)
        for p in gen_dir.iterdir():
            if p.is_dir() and p.name not in state["segments"]:
                shutil.rmtree(p, ignore_errors=True)
        return True

    def pq_codebooks(self, layer: int, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(key centroids, value centroids) of one layer, each (Hkv, M, 256, D/M) fp32 (after `ensure_pq`)."""
        state = self._require_pq(m)
        books = np.load(self._pq_dir(m) / f"gen-{int(state['generation']):06d}" / f"codebooks_L{layer:02d}.npy")
        return books[0], books[1]

    def pq_segment_codes(self, segment: str, layer: int, m: int, rows: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """(key codes, value codes) (Hkv, n, M) uint8 of one segment and layer; rows: optional bool mask."""
        state = self._require_pq(m)
        if segment not in state["segments"]:
            raise KeyError(f"segment {segment!r} has no PQ m={m} codes: call ensure_pq({m}) first")
        d = self._pq_dir(m) / f"gen-{int(state['generation']):06d}" / segment
        k = np.load(d / f"k_L{layer:02d}.npy", mmap_mode="r")
        v = np.load(d / f"v_L{layer:02d}.npy", mmap_mode="r")
        if rows is not None and not rows.all():
            return np.ascontiguousarray(k[:, rows]), np.ascontiguousarray(v[:, rows])
        return np.array(k), np.array(v)

    def _require_pq(self, m: int) -> dict:
        state = self._pq_state(m)
        if state is None:
            raise FileNotFoundError(f"no PQ m={m} codes in {self.path}: call ensure_pq({m}) first")
        return state

    def _sample_live_rows(self, size: int, seed: int) -> dict[str, np.ndarray]:
        """`size` live rows drawn uniformly without replacement: {segment: (n_segment,) bool mask}."""
        masks = [self.live_mask(self.segment_rows(s)[0]) for s in self.manifest.segments]
        live_at = np.flatnonzero(np.concatenate(masks))  # global row ids of live rows
        pick = np.zeros(sum(len(mk) for mk in masks), dtype=bool)
        pick[np.random.default_rng(seed).choice(live_at, size=size, replace=False)] = True
        out, start = {}, 0
        for s, mk in zip(self.manifest.segments, masks):
            out[s] = pick[start : start + len(mk)]
            start += len(mk)
        return out

    def _train_layer_pq(self, layer: int, m: int, sample: dict[str, np.ndarray], seed: int) -> np.ndarray:
        """(2, Hkv, M, 256, D/M) fp32 centroids trained per head on the sampled rows of one layer."""
        parts = [self.segment_layer(s, layer, mask) for s, mask in sample.items() if mask.any()]
        keys = torch.cat([p[0] for p in parts], dim=1).float().numpy()  # (Hkv, S, D)
        values = torch.cat([p[1] for p in parts], dim=1).float().numpy()
        return np.stack([np.stack([train_pq(x[h], m, seed) for h in range(len(x))]) for x in (keys, values)])

    def _encode_segment(self, segment: str, gen_dir: Path, books: dict[int, np.ndarray]) -> None:
        tmp = gen_dir / f".tmp-{segment}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        for layer, book in books.items():
            k, v = self.segment_layer(segment, layer)  # (Hkv, n, D), every row (tombstones masked at read)
            for name, x, cent in (("k", k, book[0]), ("v", v, book[1])):
                codes = np.stack([encode_pq(x[h], cent[h]) for h in range(x.shape[0])])  # (Hkv, n, M)
                save_npy_durably(tmp / f"{name}_L{layer:02d}.npy", codes)
        fsync_dir(tmp)
        os.replace(tmp, gen_dir / segment)
        fsync_dir(gen_dir)

    def _write_pq_state(self, m: int, state: dict) -> None:
        """pq.json, the PQ cache's commit point, durably as the manifest (old or new, never torn)."""
        write_manifest(self._pq_dir(m), state, PQ_MANIFEST)

def product_quantizer(d: int, m: int, centroids: Optional[np.ndarray] = None, seed: int = 0):
    """A faiss.ProductQuantizer(d, m, 8), with centroids (M, 256, D/M) set when given."""
    import faiss

    pq = faiss.ProductQuantizer(d, m, PQ_BITS)
    pq.cp.min_points_per_centroid = 1  # callers enforce PQ_MIN_TRAIN_ROWS; no faiss warning spam
    pq.cp.seed = seed
    if centroids is not None:
        faiss.copy_array_to_vector(np.ascontiguousarray(centroids, dtype=np.float32).ravel(), pq.centroids)
    return pq


def train_pq(x: np.ndarray, m: int, seed: int = 0) -> np.ndarray:
    """k-means codebooks of a product quantizer on rows x (S, D): (M, 256, D/M) fp32."""
    import faiss

    pq = product_quantizer(x.shape[1], m, seed=seed)
    pq.train(np.ascontiguousarray(x, dtype=np.float32))
    return faiss.vector_to_array(pq.centroids).reshape(m, 1 << PQ_BITS, x.shape[1] // m)


def encode_pq(x: "np.ndarray | torch.Tensor", centroids: np.ndarray) -> np.ndarray:
    """Rows x (n, D) -> (n, M) uint8 codes under centroids (M, 256, D/M); fp32 in blocks."""
    m = centroids.shape[0]
    pq = product_quantizer(centroids.shape[0] * centroids.shape[2], m, centroids)
    x = torch.as_tensor(x)
    out = np.empty((x.shape[0], m), dtype=np.uint8)
    for r0 in range(0, x.shape[0], _ENCODE_BLOCK):
        out[r0 : r0 + _ENCODE_BLOCK] = pq.compute_codes(np.ascontiguousarray(x[r0 : r0 + _ENCODE_BLOCK].float().numpy()))
    return out


def decode_pq(codes: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(n, M) uint8 codes -> (n, D) fp32 reconstructions."""
    pq = product_quantizer(centroids.shape[0] * centroids.shape[2], centroids.shape[0], centroids)
    return pq.decode(np.ascontiguousarray(codes))
