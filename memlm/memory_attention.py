"""Memory attention for the `knn` mode: each query attends to its local causal context and to its
top-k keys retrieved from a KV memory, in ONE softmax (Memorizing / Extended Mind Transformers).

Two steps, each one function with the signature of the Triton kernel that will replace it on GPU
(`memlm.kernels.memory_topk`, `memlm.kernels.knn_attention`; same conventions as
`kernels/reference.py`):
- `memory_topk(q, mem_k, k, shared_per_kv_head=...)`: exact maximum-inner-product top-k;
- `knn_attention(q, k_cache, v_cache, mem_k, mem_v, mem_idx, scale=None)`: the one softmax.
`memory_attention` chains them; `knn_attention` below is THE seam: point it at the fused kernel
(or a dispatcher) and nothing else changes.

Conventions: GQA query head h reads KV head h // (Hq // Hkv); mem_idx -1 = no entry; query i of
Tq sits at local position Tk - Tq + i and sees local keys at positions <= its own (bottom-right
causal, as a KV cache gives); memory rows are not masked by position (their position is baked into
mem_k when it was rotated, see `memlm.knn_memory`).

Unlike kernels/reference.py (which materialises (B, Hq, Tq, Tk, D) for clarity), this is the CPU
serving path: local scores by one matmul per KV group, memory rows gathered (B, Hq, Tq, K, D).
Retrieval is exact torch matmul + topk. Against faiss IndexFlatIP (one index per KV head) at
N = 65,536 rows the two are within 2x of each other and which wins depended on machine load:
see `_timing_note` at the end of this file. torch is kept: no extra index to keep in sync, and the
same semantics as the GPU kernel (faiss is not installed on the GPU machines).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

QUERY_CHUNK = 256  # queries scored against the memory at a time: bounds the (Hq, chunk, N) score block


def _check_gqa(hq: int, hkv: int) -> int:
    if hkv <= 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of KV heads ({hkv})")
    return hq // hkv


def memory_topk(
    q: torch.Tensor,  # (B, Hq, Tq, D), already rotated like the local queries
    mem_k: torch.Tensor,  # (Hkv, N, D), rotated to the memory's positions (see knn_memory)
    k: int,
    *,
    shared_per_kv_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k memory rows by inner product: (scores (B, Hq, Tq, K) fp32, idx (B, Hq, Tq, K) int64).

    shared_per_kv_head: each KV group retrieves one set, ranked by the group's mean query (inner
    products are linear, so that is the group's mean score), and every head of the group gets it.
    Otherwise each query head retrieves its own rows. Slots past N hold (-inf, -1).
    """
    b, hq, tq, d = q.shape
    hkv, n, dk = mem_k.shape
    if d != dk:
        raise ValueError(f"query head dim {d} != memory head dim {dk}")
    g = _check_gqa(hq, hkv)
    scores = torch.full((b, hq, tq, k), float("-inf"), dtype=torch.float32, device=q.device)
    idx = torch.full((b, hq, tq, k), -1, dtype=torch.int64, device=q.device)
    kk = min(k, n)
    if kk == 0 or tq == 0:
        return scores, idx
    mk = mem_k if mem_k.dtype == torch.float32 else mem_k.float()  # fp16 matmul on CPU is slow
    for t0 in range(0, tq, QUERY_CHUNK):
        qc = q[:, :, t0 : t0 + QUERY_CHUNK].float()  # (B, Hq, tc, D)
        tc = qc.shape[2]
        qg = qc.reshape(b, hkv, g, tc, d)  # (B, Hkv, G, tc, D)
        if shared_per_kv_head:
            qg = qg.mean(dim=2, keepdim=True)  # (B, Hkv, 1, tc, D)
        # (B, Hkv, G', tc*..., D) @ (Hkv, D, N): one batched matmul per KV head.
        s = torch.matmul(qg.flatten(2, 3), mk.transpose(1, 2).unsqueeze(0))  # (B, Hkv, G'*tc, N)
        top_s, top_i = s.topk(kk, dim=-1)  # (B, Hkv, G'*tc, kk)
        top_s = top_s.view(b, hkv, -1, tc, kk)
        top_i = top_i.view(b, hkv, -1, tc, kk)
        if shared_per_kv_head:
            top_s, top_i = top_s.expand(b, hkv, g, tc, kk), top_i.expand(b, hkv, g, tc, kk)
        scores[:, :, t0 : t0 + tc, :kk] = top_s.reshape(b, hq, tc, kk)
        idx[:, :, t0 : t0 + tc, :kk] = top_i.reshape(b, hq, tc, kk)
    return scores, idx


def knn_attention_torch(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor,  # (B, Hkv, Tk, D), local keys (Tk >= Tq; the last Tq are the queries' own)
    v_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    mem_idx: torch.Tensor,  # (B, Hq, Tq, K) int64, -1 = no entry
    scale: Optional[float] = None,
) -> torch.Tensor:
    """softmax over [causal local keys ∪ the query's retrieved memory rows], one normalisation.

    Returns (B, Hq, Tq, D) in q's dtype. Computes in fp32.
    """
    b, hq, tq, d = q.shape
    _, hkv, tk, _ = k_cache.shape
    n = mem_k.shape[1]
    g = _check_gqa(hq, hkv)
    if mem_k.shape[0] != hkv:
        raise ValueError(f"memory has {mem_k.shape[0]} KV heads, the local cache {hkv}")
    if tk < tq:
        raise ValueError(f"local cache holds {tk} keys, fewer than the {tq} queries it must contain")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qf = q.float()

    # Local part, GQA without repeating the cache: (B, Hkv, G*Tq, D) @ (B, Hkv, D, Tk).
    qg = qf.reshape(b, hkv, g * tq, d)
    s_loc = torch.matmul(qg, k_cache.float().transpose(2, 3)).view(b, hq, tq, tk) * scale  # (B, Hq, Tq, Tk)
    pos_q = torch.arange(tk - tq, tk, device=q.device).view(tq, 1)
    causal = torch.arange(tk, device=q.device).view(1, tk) <= pos_q  # (Tq, Tk)
    s_loc = s_loc.masked_fill(~causal, float("-inf"))

    # Memory part: gather each query's K rows from its KV head. (B, Hq, Tq, K, D)
    present = (mem_idx >= 0) & (mem_idx < n)
    safe = torch.where(present, mem_idx, torch.zeros_like(mem_idx))
    head = (torch.arange(hq, device=q.device) // g).view(1, hq, 1, 1).expand_as(safe)
    if n == 0:  # an empty memory: one zero row to gather from, masked out below
        mem_k = mem_v = mem_k.new_zeros(hkv, 1, d)
    mk = mem_k[head, safe].float()  # (B, Hq, Tq, K, D)
    mv = mem_v[head, safe].float()
    s_mem = torch.einsum("bhtd,bhtkd->bhtk", qf, mk) * scale  # (B, Hq, Tq, K)
    s_mem = s_mem.masked_fill(~present, float("-inf"))

    # One softmax over both: the local keys always include the query itself, so no row is empty.
    p = torch.softmax(torch.cat([s_loc, s_mem], dim=-1), dim=-1)  # (B, Hq, Tq, Tk + K)
    p_loc, p_mem = p[..., :tk], p[..., tk:]
    out = torch.matmul(p_loc.reshape(b, hkv, g * tq, tk), v_cache.float()).view(b, hq, tq, d)
    out = out + torch.einsum("bhtk,bhtkd->bhtd", p_mem, mv)
    return out.to(q.dtype)


# THE SEAM: the fused Triton kernel `memlm.kernels.knn_attention` has this exact signature.
# When it lands, route through its dispatcher here (GPU: kernel; CPU/tests: this reference).
knn_attention = knn_attention_torch


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
    """Retrieve each query's top_k memory rows and attend over them and the local context: (B, Hq, Tq, D)."""
    _, idx = memory_topk(q, mem_k, top_k, shared_per_kv_head=shared_per_kv_head)
    return knn_attention(q, k_cache, v_cache, mem_k, mem_v, idx, scale=scale)


_timing_note = """
Retrieval timing, exact torch vs faiss IndexFlatIP (one index per KV head), N = 65,536 rows,
Hkv = 3, G = 3 (per-query-head), D = 64, k = 8, fp32, 2 CPU cores shared with other jobs
(load average 4-5, so absolute figures are ~3-5x worse than an idle machine):
  .venv/bin/python benchmarks/passkey.py --time-retrieval
  run 1: Tq=1 torch 23.5 ms, faiss 11.4 ms;   Tq=32 torch 139 ms, faiss 166 ms
  run 2: Tq=1 torch 39.2 ms, faiss 68.8 ms;   Tq=32 torch 260 ms, faiss 378 ms
Per decode step that is x (memory layers): at 64k memory and 30 layers, ~1 s/token on CPU.
"""
