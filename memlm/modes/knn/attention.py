"""Memory attention for the `knn` mode: each query attends to its local causal context and to its
top-k keys retrieved from a KV memory, in ONE softmax (Memorizing / Extended Mind Transformers).

Two steps: retrieval, then `memlm.kernels.knn_attention` (the dispatcher: the fused Triton kernel
on CUDA, `kernels/reference.py`'s PyTorch reference on CPU; one implementation of the maths).
A layer's memory is a `KVStore`, which knows how to search itself and how to hand the attention
the rows it retrieved:
- `TensorKV`: keys/values as (Hkv, N, D) tensors, exact retrieval (`memory_topk`, through
  `memlm.kernels.memory_topk`: the Triton scan on CUDA). The GPU path, and the exact baseline.
- `FaissKV`: the CPU path. Per KV head one FAISS index over the (rotated) keys and the values as
  codes; codec "fp16" (IndexScalarQuantizer QT_fp16, values fp16: 4*D bytes per row and head) or
  "pq" (IndexPQ with ADC search over keys, a ProductQuantizer over values: 2*M bytes per row and
  head). Only the rows a step retrieved are decoded, into a small (Hkv, U, D) fp32 "mini memory"
  with the indices remapped to it, and the kernel signature is called on that: the big memory is
  never converted to fp32.
`KVStore.attention` chains search, gather and knn_attention; `memory_attention` is that over two
tensors.

Conventions (those of kernels/reference.py): GQA query head h reads KV head h // (Hq // Hkv);
index -1 = no entry; query i of Tq sits at local position Tk - Tq + i and sees local keys at
positions <= its own; memory rows are not masked by position (their position is baked into the
keys when they were rotated, see `memlm.modes.knn.reading`).

Retrieval per layer call (ms; 1 thread, Hkv = 3, G = 3, D = 64, k = 8, per query head; the old
CPU path kept fp32 copies and ran torch matmul + topk; `benchmarks/kv_compression.py --timing`):
    N = 65,536:  Tq = 1: fp32 matmul 8.95, faiss fp16 4.58, faiss PQ16 6.00;  Tq = 32: 118, 115, 186
    N = 262,144: Tq = 1: 38.7, 19.7, 23.9;  Tq = 32: 464, 604, 743
FAISS fp16 halves the RAM of the fp32 copies and is ~2x faster at decode; for prefill-sized query
batches BLAS is faster than faiss' per-query scan (up to 1.3x at Tq = 32). What PQ costs in
accuracy is in that script's docstring.
"""
from __future__ import annotations

import logging
from typing import Optional

import numpy as np
import torch

from memlm.index.kv_memory import PQ_BITS, PQ_MIN_TRAIN_ROWS, product_quantizer, train_pq
from memlm.kernels import check_gqa, expand_shared_indices, knn_attention, memory_topk as kernel_memory_topk

log = logging.getLogger(__name__)

CODECS = ("fp16", "pq")
_SCORE_BLOCK = 1 << 24  # scores (elements) one exact-retrieval call may hold: 64 MB fp32
_ADD_BLOCK = 1 << 16  # rows converted to fp32 at a time while filling a FaissKV

__all__ = ["CODECS", "PQ_MIN_TRAIN_ROWS", "FaissKV", "KVStore", "TensorKV", "knn_attention", "memory_attention", "memory_topk"]


def memory_topk(
    q: torch.Tensor,  # (B, Hq, Tq, D), already rotated like the local queries
    mem_k: torch.Tensor,  # (Hkv, N, D), rotated to the memory's positions (see knn_memory)
    k: int,
    *,
    shared_per_kv_head: bool = False,
    backend: Optional[str] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k memory rows by inner product: (scores (B, Hq, Tq, k) fp32, idx (B, Hq, Tq, k) int64).

    Runs `memlm.kernels.memory_topk` (Triton on CUDA, the reference on CPU) on the queries as
    (B*Tq, Hq, D) rows, in chunks that bound the reference's score block. shared_per_kv_head: each
    KV group retrieves one set, ranked by the group's mean query, and every head of the group gets
    it. Slots past N hold (-inf, -1).
    """
    b, hq, tq, d = q.shape
    hkv, n, dk = mem_k.shape
    if d != dk:
        raise ValueError(f"query head dim {d} != memory head dim {dk}")
    check_gqa(hq, hkv)
    rows = q.transpose(1, 2).reshape(b * tq, hq, d)  # (B*Tq, Hq, D); row r = b * Tq + t
    if rows.is_cuda and rows.dtype != mem_k.dtype:
        rows = rows.to(mem_k.dtype)  # the Triton scan reads both in one dtype (the reference: fp32)
    chunk = max(1, _SCORE_BLOCK // max(1, hq * n))
    parts = [kernel_memory_topk(rows[r0 : r0 + chunk], mem_k, k, shared_per_kv_head=shared_per_kv_head, backend=backend)
             for r0 in range(0, b * tq, chunk)]
    if not parts:  # Tq = 0
        empty = torch.zeros(b, hq, 0, k, device=q.device)
        return empty, empty.long()
    scores = torch.cat([p[0] for p in parts])  # (B*Tq, H, k), H = Hkv when shared
    idx = torch.cat([p[1] for p in parts])
    if shared_per_kv_head:
        scores, idx = expand_shared_indices(scores, hq), expand_shared_indices(idx, hq)  # (B*Tq, Hq, k)
    return scores.view(b, tq, hq, k).transpose(1, 2), idx.view(b, tq, hq, k).transpose(1, 2)


class KVStore:
    """One layer's memory, Hkv heads x N rows of (key, value): searchable, and gatherable for
    `knn_attention`. Subclasses: `TensorKV` (exact, any device), `FaissKV` (CPU, coded)."""

    num_kv_heads: int
    head_dim: int

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        """Bytes this store holds (codes, codebooks, values)."""
        raise NotImplementedError

    @property
    def bytes_per_row(self) -> float:
        """Bytes each further memory row costs (all KV heads; codebooks excluded: they do not grow)."""
        raise NotImplementedError

    def search(self, q: torch.Tensor, k: int, *, shared_per_kv_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, Hq, Tq, D) -> (scores (B, Hq, Tq, k) fp32, row ids (B, Hq, Tq, k) int64, -1 padded)."""
        raise NotImplementedError

    def gather(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row ids (B, Hq, Tq, K) -> (mem_k (Hkv, U, D), mem_v (Hkv, U, D), idx (B, Hq, Tq, K) into them)."""
        raise NotImplementedError

    def attention(
        self,
        q: torch.Tensor,  # (B, Hq, Tq, D)
        k_cache: torch.Tensor,  # (B, Hkv, Tk, D)
        v_cache: torch.Tensor,  # (B, Hkv, Tk, D)
        top_k: int,
        *,
        shared_per_kv_head: bool = False,
        scale: Optional[float] = None,
        gate: Optional[torch.Tensor] = None,  # (Hq,) logits: Memorizing Transformer's learned gate
    ) -> torch.Tensor:
        """Retrieve each query's top_k rows and attend over them and the local context: (B, Hq, Tq, D).

        Without `gate`: one softmax over both (Extended Mind). With it: local attention and
        attention over the retrieved rows alone, mixed per head: g * memory + (1 - g) * local,
        g = sigmoid(gate) (Memorizing Transformers; the gate is learned in training).
        """
        _, idx = self.search(q, top_k, shared_per_kv_head=shared_per_kv_head)
        mem_k, mem_v, idx = self.gather(idx)
        if gate is None:
            return knn_attention(q, k_cache, v_cache, mem_k, mem_v, idx, scale=scale)
        memory = knn_attention(q, None, None, mem_k, mem_v, idx, scale=scale, memory_only=True)
        local = knn_attention(q, k_cache, v_cache, mem_k, mem_v, idx[..., :0], scale=scale)
        g = torch.sigmoid(gate.float()).view(1, -1, 1, 1)  # (1, Hq, 1, 1)
        return (g * memory.float() + (1 - g) * local.float()).to(q.dtype)


class TensorKV(KVStore):
    """Keys and values as (Hkv, N, D) tensors (on the model's device); exact retrieval. The fused
    kernel gathers retrieved rows itself, so `gather` hands over the whole memory."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        if keys.dim() != 3 or keys.shape != values.shape:
            raise ValueError(f"keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be (Hkv, N, D)")
        self.keys, self.values = keys, values
        self.num_kv_heads, _, self.head_dim = keys.shape

    @property
    def num_rows(self) -> int:
        return self.keys.shape[1]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    @property
    def bytes_per_row(self) -> float:
        return float(self.num_kv_heads * self.head_dim * (self.keys.element_size() + self.values.element_size()))

    def search(self, q, k, *, shared_per_kv_head=False):
        return memory_topk(q, self.keys, k, shared_per_kv_head=shared_per_kv_head)

    def gather(self, idx):
        return self.keys, self.values, idx


class FaissKV(KVStore):
    """One layer's memory on CPU: per KV head a FAISS index over the keys, and coded values.

    codec "fp16": keys in IndexScalarQuantizer(QT_fp16) (exact inner products of the fp16 keys),
    values as an fp16 array; 2 * 2 * D bytes per row and head.
    codec "pq": keys in IndexPQ(D, M, 8) searched by ADC (the query against the codebooks: no
    key is decoded to rank), values as ProductQuantizer codes; 2 * M bytes per row and head, plus
    2 * 256 * D * 4 bytes of codebooks per head. Built from trained codebooks (Hkv, M, 256, D/M).
    Build with `from_tensors` (trains PQ on the rows, with the fp16 fallback for small memories),
    or from stored codes: `FaissKV(..., codebooks=...)` then `add_codes`.
    """

    def __init__(self, num_kv_heads: int, head_dim: int, codec: str = "fp16", pq_m: int = 16,
                 codebooks: Optional[tuple[np.ndarray, np.ndarray]] = None):
        import faiss

        if codec not in CODECS:
            raise ValueError(f"codec {codec!r} is not one of {CODECS}")
        if codec == "pq" and (pq_m < 1 or head_dim % pq_m):
            raise ValueError(f"pq_m={pq_m} must divide the head dim {head_dim}")
        self.num_kv_heads, self.head_dim, self.codec, self.pq_m = num_kv_heads, head_dim, codec, pq_m
        if codec == "fp16":
            self.key_index = [faiss.IndexScalarQuantizer(head_dim, faiss.ScalarQuantizer.QT_fp16,
                                                         faiss.METRIC_INNER_PRODUCT) for _ in range(num_kv_heads)]
            self.value_pq = None
        else:
            if codebooks is None:
                raise ValueError("codec 'pq' needs trained codebooks (key and value centroids, (Hkv, M, 256, D/M))")
            key_books, value_books = codebooks
            want = (num_kv_heads, pq_m, 1 << PQ_BITS, head_dim // pq_m)
            if key_books.shape != want or value_books.shape != want:
                raise ValueError(f"codebooks {key_books.shape} / {value_books.shape}, expected {want}")
            self.key_index = []
            for h in range(num_kv_heads):
                ix = faiss.IndexPQ(head_dim, pq_m, PQ_BITS, faiss.METRIC_INNER_PRODUCT)
                faiss.copy_array_to_vector(np.ascontiguousarray(key_books[h], dtype=np.float32).ravel(), ix.pq.centroids)
                ix.is_trained = True
                self.key_index.append(ix)
            self.value_pq = [product_quantizer(head_dim, pq_m, value_books[h]) for h in range(num_kv_heads)]
        self._value_blocks: list[np.ndarray] = []  # (Hkv, n, C) fp16 rows or uint8 codes, in row order
        self._values: Optional[np.ndarray] = None  # the blocks concatenated, on first use

    @classmethod
    def from_tensors(
        cls,
        keys: torch.Tensor,  # (Hkv, N, D), any float dtype; rotated as they will be searched
        values: torch.Tensor,  # (Hkv, N, D)
        codec: str = "fp16",
        *,
        pq_m: int = 16,
        train_rows: int = 65536,
        seed: int = 0,
        name: str = "",
    ) -> "FaissKV":
        """Build (and for "pq" train, on <= train_rows rows per head sampled uniformly) a store.

        With fewer than PQ_MIN_TRAIN_ROWS rows "pq" falls back to "fp16" (a log line says so):
        256 centroids per sub-quantizer need ~10 rows each to mean anything.
        """
        hkv, n, d = keys.shape
        if codec == "pq" and min(n, train_rows) < PQ_MIN_TRAIN_ROWS:
            log.info("KV memory %s: %d rows (training on %d) < %d needed to train PQ; using fp16",
                     name or "layer", n, min(n, train_rows), PQ_MIN_TRAIN_ROWS)
            codec = "fp16"
        books = None
        if codec == "pq":
            if pq_m < 1 or d % pq_m:
                raise ValueError(f"pq_m={pq_m} must divide the head dim {d}")
            g = torch.Generator().manual_seed(seed)
            rows = torch.randperm(n, generator=g)[:train_rows].sort().values
            books = tuple(np.stack([train_pq(x[h, rows].float().numpy(), pq_m, seed) for h in range(hkv)])
                          for x in (keys, values))
        store = cls(hkv, d, codec, pq_m, codebooks=books)
        for r0 in range(0, n, _ADD_BLOCK):
            store.add(keys[:, r0 : r0 + _ADD_BLOCK].float(), values[:, r0 : r0 + _ADD_BLOCK].float())
        return store

    # --- filling ------------------------------------------------------------------------------

    def add(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append rows, encoding them: keys, values (Hkv, n, D) fp32. Row ids continue from num_rows."""
        hkv, n, d = keys.shape
        if (hkv, d) != (self.num_kv_heads, self.head_dim) or values.shape != keys.shape:
            raise ValueError(f"keys {tuple(keys.shape)} / values {tuple(values.shape)} must be "
                             f"({self.num_kv_heads}, n, {self.head_dim})")
        if n == 0:
            return
        codes = []
        for h in range(hkv):
            self.key_index[h].add(np.ascontiguousarray(keys[h].numpy(), dtype=np.float32))
            if self.codec == "fp16":
                codes.append(values[h].to(torch.float16).numpy())  # (n, D)
            else:
                codes.append(self.value_pq[h].compute_codes(np.ascontiguousarray(values[h].numpy(), dtype=np.float32)))
        self._value_blocks.append(np.stack(codes))  # (Hkv, n, C)
        self._values = None

    def add_codes(self, key_codes: np.ndarray, value_codes: np.ndarray) -> None:
        """Append rows already encoded with this store's codebooks: (Hkv, n, M) uint8 each ("pq")."""
        want = (self.num_kv_heads, key_codes.shape[1], self.pq_m)
        if self.codec != "pq" or key_codes.shape != want or value_codes.shape != want or key_codes.dtype != np.uint8:
            raise ValueError(f"add_codes needs a 'pq' store and uint8 codes of shape {want}; got codec "
                             f"{self.codec!r}, {key_codes.shape} {key_codes.dtype} / {value_codes.shape}")
        if key_codes.shape[1] == 0:
            return
        for h in range(self.num_kv_heads):
            self.key_index[h].add_sa_codes(np.ascontiguousarray(key_codes[h]))
        self._value_blocks.append(np.ascontiguousarray(value_codes))
        self._values = None

    def remove_rows(self, drop: np.ndarray) -> None:
        """Remove the rows where drop (num_rows,) is True (tombstones); later rows move up, keeping order."""
        import faiss

        drop = np.asarray(drop, dtype=bool)
        if len(drop) != self.num_rows:
            raise ValueError(f"drop mask has {len(drop)} entries, the store {self.num_rows} rows")
        if not drop.any():
            return
        bits = np.packbits(drop, bitorder="little")  # bit i = row i
        for ix in self.key_index:
            ix.remove_ids(faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits)))  # compacts, order kept
        self._values = np.ascontiguousarray(self.value_codes()[:, ~drop])
        self._value_blocks = [self._values]

    def value_codes(self) -> np.ndarray:
        """(Hkv, N, C): fp16 values (C = D) or PQ codes (C = M)."""
        if self._values is None:
            if self._value_blocks:
                self._values = np.concatenate(self._value_blocks, axis=1) if len(self._value_blocks) > 1 else self._value_blocks[0]
            else:
                self._values = np.zeros((self.num_kv_heads, 0, self.head_dim if self.codec == "fp16" else self.pq_m),
                                        dtype=np.float16 if self.codec == "fp16" else np.uint8)
            self._value_blocks = [self._values]
        return self._values

    # --- facts --------------------------------------------------------------------------------

    @property
    def num_rows(self) -> int:
        return int(self.key_index[0].ntotal)

    @property
    def bytes_per_row(self) -> float:
        code = self.key_index[0].sa_code_size()
        value = 2 * self.head_dim if self.codec == "fp16" else self.value_pq[0].code_size
        return float(self.num_kv_heads * (code + value))

    @property
    def nbytes(self) -> int:
        codebooks = 0
        if self.codec == "pq":
            codebooks = sum(ix.pq.centroids.size() * 4 for ix in self.key_index) + sum(pq.centroids.size() * 4 for pq in self.value_pq)
        return int(self.bytes_per_row * self.num_rows) + codebooks

    # --- reading ------------------------------------------------------------------------------

    def search(self, q, k, *, shared_per_kv_head=False):
        """Per KV head one FAISS search of its G*B*Tq query rows (B*Tq group-mean rows when shared)."""
        b, hq, tq, d = q.shape
        hkv = self.num_kv_heads
        g = check_gqa(hq, hkv)
        if d != self.head_dim:
            raise ValueError(f"query head dim {d} != memory head dim {self.head_dim}")
        qg = q.detach().float().reshape(b, hkv, g, tq, d)  # (B, Hkv, G, Tq, D)
        if shared_per_kv_head:
            qg = qg.mean(dim=2, keepdim=True)  # (B, Hkv, 1, Tq, D): ranks by the group's mean score
        gq = qg.shape[2]
        rows = qg.permute(1, 0, 2, 3, 4).reshape(hkv, b * gq * tq, d)  # (Hkv, R, D)
        scores = torch.full((hkv, rows.shape[1], k), float("-inf"))
        idx = torch.full((hkv, rows.shape[1], k), -1, dtype=torch.int64)
        if self.num_rows and rows.shape[1] and k:
            for h in range(hkv):
                s, i = self.key_index[h].search(np.ascontiguousarray(rows[h].numpy()), k)  # (R, k) each
                scores[h], idx[h] = torch.from_numpy(s), torch.from_numpy(i)
            scores = scores.masked_fill(idx < 0, float("-inf"))  # faiss pads with (-FLT_MAX, -1)
        # (Hkv, B*G'*Tq, k) -> (B, Hq, Tq, k)
        scores = scores.view(hkv, b, gq, tq, k).permute(1, 0, 2, 3, 4).expand(b, hkv, g, tq, k).reshape(b, hq, tq, k)
        idx = idx.view(hkv, b, gq, tq, k).permute(1, 0, 2, 3, 4).expand(b, hkv, g, tq, k).reshape(b, hq, tq, k)
        return scores.to(q.device), idx.to(q.device)

    def gather(self, idx):
        """Decode each KV head's distinct retrieved rows into (Hkv, U, D) fp32, U = the most any head has."""
        b, hq, tq, kk = idx.shape
        hkv, d = self.num_kv_heads, self.head_dim
        g = check_gqa(hq, hkv)
        per_head = idx.cpu().reshape(b, hkv, g * tq * kk).transpose(0, 1).reshape(hkv, -1)  # (Hkv, B*G*Tq*K)
        local = torch.full_like(per_head, -1)
        uniq = []
        for h in range(hkv):
            ids = per_head[h]
            present = ids >= 0
            u, inv = torch.unique(ids[present], return_inverse=True)  # sorted distinct row ids
            local[h, present] = inv
            uniq.append(u)
        width = max((len(u) for u in uniq), default=0)
        mem_k = torch.zeros(hkv, width, d)
        mem_v = torch.zeros(hkv, width, d)
        values = self.value_codes()
        for h, u in enumerate(uniq):
            if len(u) == 0:
                continue
            rows = u.numpy()
            mem_k[h, : len(u)] = torch.from_numpy(self.key_index[h].reconstruct_batch(rows))
            if self.codec == "fp16":
                mem_v[h, : len(u)] = torch.from_numpy(values[h, rows].astype(np.float32))
            else:
                mem_v[h, : len(u)] = torch.from_numpy(self.value_pq[h].decode(np.ascontiguousarray(values[h, rows])))
        local = local.view(hkv, b, g, tq, kk).transpose(0, 1).reshape(b, hq, tq, kk)
        return mem_k.to(idx.device), mem_v.to(idx.device), local.to(idx.device)


def memory_attention(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    v_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    top_k: int,
    *,
    shared_per_kv_head: bool = False,
    scale: Optional[float] = None,
) -> torch.Tensor:
    """Exact retrieval of each query's top_k rows of (mem_k, mem_v), then one softmax over them and
    the local context: (B, Hq, Tq, D)."""
    return TensorKV(mem_k, mem_v).attention(q, k_cache, v_cache, top_k, shared_per_kv_head=shared_per_kv_head, scale=scale)

