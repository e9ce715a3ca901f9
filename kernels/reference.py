"""Pure-PyTorch references for the memory kernels, one per Triton kernel, with the same signatures.

They are the `forward_native` of the kernels: the dispatcher runs them on CPU, the tests judge the
Triton kernels against them, and they state the semantics plainly. They compute in fp32 whatever
the input dtype (pass fp64 tensors for a tighter ground truth).
- memory_topk_ref materialises all N scores of every query: fine for tests and small memories;
  CPU serving retrieves through FAISS instead (memlm.modes.knn.attention.FaissKV).
- knn_attention_ref IS the CPU serving path of the attention (memlm.modes.knn.attention calls it
  through the dispatcher): local scores by one matmul per KV group, queries in chunks of bounded
  size, the gathered memory rows only K per query.

Conventions shared with the kernels:
- GQA: query head h reads KV head h // (Hq // Hkv).
- Index -1 means "no entry": memory_topk pads with (-inf, -1) when k > N; knn_attention masks it.
- A row with nothing to attend to has state m = -inf, l = 0, acc = 0 and output 0 (not NaN).
- Attention states are in natural-log units: out = acc / l, with acc = sum_j exp(s_j - m) v_j and
  l = sum_j exp(s_j - m), s_j = scale * q.k_j.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch

_SCORE_BLOCK = 1 << 24  # elements of one query chunk's score block in knn_attention_ref (64 MB fp32)


class AttentionState(NamedTuple):
    """Partial softmax state of attention over some subset of keys (one shard, one tile, ...)."""

    m: torch.Tensor  # (B, Hq, Tq) fp32, running max of the scaled scores (-inf: saw nothing)
    l: torch.Tensor  # (B, Hq, Tq) fp32, sum of exp(s - m)
    acc: torch.Tensor  # (B, Hq, Tq, D) fp32, unnormalised output sum exp(s - m) * v


def check_gqa(hq: int, hkv: int) -> int:
    """Query heads per KV head (GQA group size); ValueError unless Hq is a positive multiple of Hkv."""
    if hkv <= 0 or hq % hkv != 0:
        raise ValueError(f"query heads ({hq}) must be a positive multiple of KV heads ({hkv})")
    return hq // hkv


def _valid_n(mem_k: torch.Tensor, valid_n: int | None) -> int:
    n = mem_k.shape[1]
    if valid_n is None:
        return n
    if not 0 <= valid_n <= n:
        raise ValueError(f"valid_n={valid_n} must lie in [0, {n}] (the rows mem_k holds)")
    return int(valid_n)


def group_queries(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """(B, Hq, D) -> (B, Hkv, D): the mean query of each KV group, in q's dtype (fp32 sum).

    Shared retrieval scores a KV group with its mean query: the inner product is linear, so this
    ranks keys by the group's *average* score. (The union of per-head top-k sets would give a
    variable-size set per group; the mean keeps a fixed k and one memory read per group.)
    """
    b, hq, d = q.shape
    g = check_gqa(hq, hkv)
    return q.float().view(b, hkv, g, d).mean(dim=2).to(q.dtype)  # (B, Hkv, D)


def expand_shared_indices(idx: torch.Tensor, hq: int) -> torch.Tensor:
    """(B, Hkv, ...) -> (B, Hq, ...): give every query head its KV group's retrieved set."""
    hkv = idx.shape[1]
    return idx.repeat_interleave(check_gqa(hq, hkv), dim=1)


def memory_topk_ref(
    q: torch.Tensor,  # (B, Hq, D), or (B, Hkv, D) when shared_per_kv_head
    mem_k: torch.Tensor,  # (Hkv, N, D)
    k: int,
    *,
    valid_n: int | None = None,
    shared_per_kv_head: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact maximum-inner-product top-k: scores (B, H, k) fp32 descending, indices (B, H, k) int64.

    H = Hq, or Hkv with shared_per_kv_head (each group scored by its mean query, see
    group_queries). Only the first valid_n rows of mem_k are searched. Slots past the number of
    searched rows hold score -inf and index -1. Ties are broken arbitrarily.
    """
    b, hq, d = q.shape
    hkv, _, dk = mem_k.shape
    if d != dk:
        raise ValueError(f"q head dim {d} != mem_k head dim {dk}")
    if k < 0:
        raise ValueError(f"k={k} must be >= 0")
    n = _valid_n(mem_k, valid_n)
    if shared_per_kv_head:
        q = group_queries(q, hkv)  # (B, Hkv, D)
        hq = hkv
    g = check_gqa(hq, hkv)
    scores = torch.full((b, hq, k), float("-inf"), dtype=torch.float32, device=q.device)
    idx = torch.full((b, hq, k), -1, dtype=torch.int64, device=q.device)
    kk = min(k, n)
    if kk == 0:
        return scores, idx
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    qg = q.to(work).view(b, hkv, g, d)  # (B, Hkv, G, D)
    all_scores = torch.einsum("bhgd,hnd->bhgn", qg, mem_k[:, :n].to(work))  # (B, Hkv, G, n)
    top_s, top_i = all_scores.reshape(b, hq, n).topk(kk, dim=-1)  # (B, H, kk)
    scores[..., :kk] = top_s.float()
    idx[..., :kk] = top_i
    return scores, idx


def knn_attention_ref(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor | None,  # (B, Hkv, Tk, D)
    v_cache: torch.Tensor | None,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    mem_idx: torch.Tensor,  # (B, Hq, Tq, K) int64, -1 = absent
    *,
    scale: float | None = None,
    cache_len: int | torch.Tensor | None = None,
    return_state: bool = False,
    memory_only: bool = False,
    memory_weights: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, AttentionState] | tuple[torch.Tensor, AttentionState, torch.Tensor]:
    """Attention of each query over (its causal local keys) ∪ (its retrieved memory rows), one softmax.

    Local part: query i (of Tq) sits at absolute position L - Tq + i, L = cache_len (default Tk,
    an int or a (B,) tensor of valid lengths) and sees local keys at positions <= its own and < L.
    Memory part: query (b, h, i) sees mem rows mem_idx[b, h, i, :] of KV head h // G, unmasked by
    position; -1 (or any index outside [0, N)) is absent. memory_only drops the local part
    (k_cache/v_cache may then be None): the shard-side computation.
    Returns out (B, Hq, Tq, D) in q's dtype, and with return_state the fp32 AttentionState
    (fp64 for fp64 inputs: the tests' ground truth); memory_weights: (out, state, the softmax
    weight of each mem_idx entry (B, Hq, Tq, K), 0 for absent ones).

    This is also the CPU serving path, so it is written for speed without changing the maths:
    the local part is one matmul per KV group ((B, Hkv, G*tq, D) @ (B, Hkv, D, Tk), the cache is
    never repeated per query head), queries go in chunks that bound the (Hq, tq, Tk) score block
    to ~64 MB, and a chunk only reads the local keys its last query can see.
    """
    b, hq, tq, d = q.shape
    hkv, n, _ = mem_k.shape
    g = check_gqa(hq, hkv)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    kk = mem_idx.shape[-1]
    if not memory_only:
        if k_cache is None or v_cache is None:
            raise ValueError("k_cache and v_cache are required unless memory_only=True")
        tk = k_cache.shape[2]
        lens = _cache_lens(cache_len, b, tk, q.device)  # (B,)
        max_len = int(lens.max()) if b else 0
        kc = k_cache.to(work)  # (B, Hkv, Tk, D)
        vc = v_cache.to(work)
    else:
        tk, max_len = 0, 0

    m = torch.full((b, hq, tq), float("-inf"), dtype=work, device=q.device)
    l = torch.zeros((b, hq, tq), dtype=work, device=q.device)
    acc = torch.zeros((b, hq, tq, d), dtype=work, device=q.device)
    weights = torch.zeros((b, hq, tq, kk), dtype=work, device=q.device) if memory_weights else None
    kv_head = (torch.arange(hq, device=q.device) // g).view(1, hq, 1, 1)  # (1, Hq, 1, 1)
    chunk = max(1, _SCORE_BLOCK // max(1, b * hq * (tk + kk * d)))  # scores + gathered rows
    for t0 in range(0, tq, chunk):
        t1 = min(tq, t0 + chunk)
        tc = t1 - t0
        qc = q[:, :, t0:t1].to(work)  # (B, Hq, tc, D)

        # Memory part: gather the K rows of every query of the chunk. (B, Hq, tc, K, D)
        idx = mem_idx[:, :, t0:t1]
        present = (idx >= 0) & (idx < n)  # (B, Hq, tc, K)
        if n > 0:
            safe = torch.where(present, idx, 0)
            head = kv_head.expand_as(safe)
            mk = mem_k[head, safe].to(work)
            mv = mem_v[head, safe].to(work)
        else:  # empty memory: nothing to gather, every entry is absent
            mk = mv = torch.zeros((*idx.shape, d), dtype=work, device=q.device)
        s_mem = torch.matmul(qc.unsqueeze(-2), mk.transpose(-1, -2)).squeeze(-2) * scale  # (B, Hq, tc, K)
        s_mem = s_mem.masked_fill(~present, float("-inf"))
        m_c = s_mem.amax(dim=-1) if kk else m.new_full((b, hq, tc), float("-inf"))

        # Local part: only keys below the chunk's last visible position are read.
        hi = min(tk, max(0, max_len - tq + t1))
        if hi > 0:
            qg = qc.reshape(b, hkv, g * tc, d)  # (B, Hkv, G*tc, D): query heads of a group stacked
            s_loc = torch.matmul(qg, kc[:, :, :hi].transpose(-1, -2)).view(b, hq, tc, hi) * scale
            pos_q = lens.view(b, 1) - tq + torch.arange(t0, t1, device=q.device).view(1, tc)  # (B, tc)
            pos_k = torch.arange(hi, device=q.device).view(1, 1, hi)
            visible = (pos_k <= pos_q.unsqueeze(-1)) & (pos_k < lens.view(b, 1, 1))  # (B, tc, hi)
            s_loc = s_loc.masked_fill(~visible.unsqueeze(1), float("-inf"))  # (B, Hq, tc, hi)
            m_c = torch.maximum(m_c, s_loc.amax(dim=-1))

        m_safe = torch.where(torch.isneginf(m_c), torch.zeros_like(m_c), m_c).unsqueeze(-1)
        p_mem = torch.exp(s_mem - m_safe)  # exp(-inf) = 0 for absent entries
        l_c = p_mem.sum(dim=-1)  # (B, Hq, tc)
        acc_c = torch.matmul(p_mem.unsqueeze(-2), mv).squeeze(-2)  # (B, Hq, tc, D)
        if hi > 0:
            p_loc = torch.exp(s_loc - m_safe)  # (B, Hq, tc, hi)
            l_c = l_c + p_loc.sum(dim=-1)
            acc_c = acc_c + torch.matmul(p_loc.view(b, hkv, g * tc, hi), vc[:, :, :hi]).view(b, hq, tc, d)
        m[:, :, t0:t1], l[:, :, t0:t1], acc[:, :, t0:t1] = m_c, l_c, acc_c
        if weights is not None:
            weights[:, :, t0:t1] = p_mem / torch.where(l_c > 0, l_c, 1.0).unsqueeze(-1)

    out = _normalise(acc, l).to(q.dtype)
    if memory_weights:
        return out, AttentionState(m, l, acc), weights
    if return_state:
        return out, AttentionState(m, l, acc)  # fp32 (fp64 for fp64 inputs)
    return out


def merge_attention_states_ref(
    states: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, AttentionState]:
    """Exact log-sum-exp merge of partial states over disjoint key sets (shards, tiles).

    states: S >= 1 tuples (m (B, Hq, Tq), l (B, Hq, Tq), acc (B, Hq, Tq, D)). Returns
    (out (B, Hq, Tq, D) fp32, merged AttentionState), fp64 for fp64 inputs. Merging is
    associative and commutative up to rounding, so memory split over devices gives the output
    one memory would. States that saw nothing (m = -inf, l = 0) contribute nothing; if all did,
    out is 0.
    """
    if len(states) == 0:
        raise ValueError("merge_attention_states needs at least one state")
    work = torch.float64 if states[0][0].dtype == torch.float64 else torch.float32
    m = torch.stack([s[0].to(work) for s in states])  # (S, B, Hq, Tq)
    l = torch.stack([s[1].to(work) for s in states])
    acc = torch.stack([s[2].to(work) for s in states])  # (S, B, Hq, Tq, D)
    m_max = m.amax(dim=0)  # (B, Hq, Tq)
    m_safe = torch.where(torch.isinf(m_max) & (m_max < 0), torch.zeros_like(m_max), m_max)
    w = torch.exp(m - m_safe)  # (S, B, Hq, Tq); exp(-inf) = 0 for empty states
    l_out = (w * l).sum(dim=0)
    acc_out = (w.unsqueeze(-1) * acc).sum(dim=0)
    out = _normalise(acc_out, l_out)
    return out, AttentionState(m_max, l_out, acc_out)  # fp32 (fp64 for fp64 inputs)


def _normalise(acc: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """acc / l with 0 (not NaN) where l == 0: rows that attended to nothing."""
    l_safe = torch.where(l > 0, l, torch.ones_like(l))
    return acc / l_safe.unsqueeze(-1)


def _cache_lens(cache_len: int | torch.Tensor | None, b: int, tk: int, device) -> torch.Tensor:
    """(B,) int64 valid local lengths from None (= Tk), an int, or a (B,) tensor."""
    if cache_len is None:
        return torch.full((b,), tk, dtype=torch.int64, device=device)
    if isinstance(cache_len, int):
        if not 0 <= cache_len <= tk:
            raise ValueError(f"cache_len={cache_len} must lie in [0, {tk}] (the cache's Tk)")
        return torch.full((b,), cache_len, dtype=torch.int64, device=device)
    lens = cache_len.to(device=device, dtype=torch.int64).reshape(-1)
    if lens.numel() == 1:
        lens = lens.expand(b)
    if lens.numel() != b:
        raise ValueError(f"cache_len has {lens.numel()} entries, expected 1 or the batch size {b}")
    return lens.contiguous()
