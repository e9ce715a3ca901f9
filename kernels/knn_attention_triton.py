"""Triton kernel for kNN-augmented decode attention (knn_attention): local KV ∪ retrieved memory.

One program owns one query row (b, query head h, query position i): it streams its visible local
keys in BLOCK_N tiles, then its K retrieved memory rows in BLOCK_K tiles (gathered by pointer
arithmetic from mem_idx, never written anywhere), through one online softmax in fp32 with exp2.
It writes the normalised output and, on request, the partial state (m, l, acc) for merging with
other shards (merge_attention_states).

Limits: made for decode and short prefill (Tq up to ~16): each query row re-reads its KV head's
local tiles (from L2 across the G heads of a group), and the dot products are elementwise fp32
FMAs rather than tensor-core matmuls, which is right for memory-bound decode but not for long
prefill (use flash attention there). The local cache is not split across programs, so at batch 1
with a long local cache few programs run; memory shards are the unit of splitting. Named
*_triton so that importing it does not shadow the public memlm.kernels.knn_attention.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .reference import AttentionState, _cache_lens, check_gqa, knn_attention_ref  # noqa: F401


@triton.jit
def _online_update(s, v, m, l, acc):
    """One online-softmax step. s (BN,) base-2 scores, -inf where masked; v (BN, BD); m, l scalars."""
    m_new = tl.maximum(m, tl.max(s, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing seen yet: avoid -inf - -inf
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe)  # (BN,), 0 where masked
    l = l * alpha + tl.sum(p, axis=0)
    acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)  # (BD,)
    return m_new, l, acc


@triton.jit
def _attend_local(q, kc_base, vc_base, local_end, stride_kct, stride_kcd, stride_vct, stride_vcd, rd, d_ok, m, l, acc,
                  BLOCK_N: tl.constexpr):
    """One query row's local keys 0 .. local_end - 1 (and their values) into its online softmax
    (m, l, acc); q (BLOCK_D,) fp32 already scaled to base-2 units."""
    for n0 in range(0, local_end, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        ok = rn < local_end
        kt = tl.load(kc_base + rn[:, None] * stride_kct + rd[None, :] * stride_kcd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        s = tl.where(ok, tl.sum(kt * q[None, :], axis=1), float("-inf"))  # (BLOCK_N,)
        vt = tl.load(vc_base + rn[:, None] * stride_vct + rd[None, :] * stride_vcd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        m, l, acc = _online_update(s, vt, m, l, acc)
    return m, l, acc


@triton.jit
def _knn_attention_fwd(
    Q, KC, VC, MK, MV, IDX, LENS,
    O, M_OUT, L_OUT, ACC_OUT,
    Tq, Tk, N, K, qk_scale,  # qk_scale = scale * log2(e)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kcb, stride_kch, stride_kct, stride_kcd,
    stride_vcb, stride_vch, stride_vct, stride_vcd,
    stride_mkh, stride_mkn, stride_mkd,
    stride_mvh, stride_mvn, stride_mvd,
    stride_ib, stride_ih, stride_it, stride_ik,
    stride_ob, stride_oh, stride_ot, stride_od,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MEMORY_ONLY: tl.constexpr,
    RETURN_STATE: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # int64 offsets: memory and caches can pass 2**31 elements
    hk = (h // G).to(tl.int64)  # GQA: the KV head this query head reads

    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + i * stride_qt + rd * stride_qd, mask=d_ok, other=0.0)
    q = q.to(tl.float32) * qk_scale  # (BLOCK_D,), scores come out in base-2 units

    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)

    if not MEMORY_ONLY:
        # Query i sits at position L - Tq + i and sees local keys 0 .. that position.
        seq_len = tl.load(LENS + b)
        local_end = tl.minimum(tl.maximum(seq_len - Tq + i + 1, 0), Tk)
        kc_base = KC + b * stride_kcb + hk * stride_kch
        vc_base = VC + b * stride_vcb + hk * stride_vch
        m, l, acc = _attend_local(q, kc_base, vc_base, local_end, stride_kct, stride_kcd, stride_vct, stride_vcd,
                                  rd, d_ok, m, l, acc, BLOCK_N)

    # Retrieved memory rows: gathered straight from mem_k / mem_v by index.
    idx_base = IDX + b * stride_ib + h * stride_ih + i * stride_it
    mk_base = MK + hk * stride_mkh
    mv_base = MV + hk * stride_mvh
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        idx = tl.load(idx_base + rk * stride_ik, mask=rk < K, other=-1).to(tl.int64)  # (BLOCK_K,)
        ok = (idx >= 0) & (idx < N)
        kt = tl.load(mk_base + idx[:, None] * stride_mkn + rd[None, :] * stride_mkd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_K, BLOCK_D)
        s = tl.where(ok, tl.sum(kt * q[None, :], axis=1), float("-inf"))
        vt = tl.load(mv_base + idx[:, None] * stride_mvn + rd[None, :] * stride_mvd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        m, l, acc = _online_update(s, vt, m, l, acc)

    out = acc / tl.where(l > 0, l, 1.0)  # rows that saw nothing get 0, not NaN
    o_off = b * stride_ob + h * stride_oh + i * stride_ot
    tl.store(O + o_off + rd * stride_od, out.to(O.dtype.element_ty), mask=d_ok)
    if RETURN_STATE:  # state tensors are contiguous (B, Hq, Tq[, D]) fp32
        row = (b * tl.num_programs(1) + h) * Tq + i
        tl.store(M_OUT + row, m * 0.6931471805599453)  # base-2 -> natural units
        tl.store(L_OUT + row, l)
        tl.store(ACC_OUT + row * D + rd, acc, mask=d_ok)


def knn_attention(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor | None,  # (B, Hkv, Tk, D)
    v_cache: torch.Tensor | None,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    mem_idx: torch.Tensor,  # (B, Hq, Tq, K) int64 (or int32), -1 = absent
    *,
    scale: float | None = None,
    cache_len: int | torch.Tensor | None = None,
    return_state: bool = False,
    memory_only: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, AttentionState]:
    """Same contract as reference.knn_attention_ref: out (B, Hq, Tq, D) in q's dtype [, state]."""
    b, hq, tq, d = q.shape
    hkv, n, dk = mem_k.shape
    g = check_gqa(hq, hkv)
    if dk != d or mem_v.shape != mem_k.shape:
        raise ValueError(f"mem_k {tuple(mem_k.shape)} / mem_v {tuple(mem_v.shape)} must be (Hkv, N, {d})")
    if mem_idx.shape[:3] != (b, hq, tq):
        raise ValueError(f"mem_idx {tuple(mem_idx.shape)} must be ({b}, {hq}, {tq}, K)")
    if memory_only:
        k_cache = v_cache = None
        tk = 0
    else:
        if k_cache is None or v_cache is None:
            raise ValueError("k_cache and v_cache are required unless memory_only=True")
        if k_cache.shape[:2] != (b, hkv) or k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
            raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} must be ({b}, {hkv}, Tk, {d})")
        tk = k_cache.shape[2]
    kk = mem_idx.shape[3]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lens = _cache_lens(cache_len, b, tk, q.device).to(torch.int32)  # (B,)
    kc = k_cache if k_cache is not None else mem_k.new_empty((1, 1, 1, d))  # unused placeholders
    vc = v_cache if v_cache is not None else mem_v.new_empty((1, 1, 1, d))

    out = torch.empty_like(q)  # (B, Hq, Tq, D)
    if return_state:
        m_out = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
        l_out = torch.empty_like(m_out)
        acc_out = torch.empty((b, hq, tq, d), dtype=torch.float32, device=q.device)
    else:
        m_out = l_out = acc_out = out  # never written: RETURN_STATE is off
    if out.numel() == 0:
        return (out, AttentionState(m_out, l_out, acc_out)) if return_state else out

    block_d = triton.next_power_of_2(d)
    grid = (tq, hq, b)
    _knn_attention_fwd[grid](
        q, kc, vc, mem_k, mem_v, mem_idx, lens,
        out, m_out, l_out, acc_out,
        tq, tk, n, kk, scale * 1.4426950408889634,
        *q.stride(), *kc.stride(), *vc.stride(), *mem_k.stride(), *mem_v.stride(),
        *mem_idx.stride(), *out.stride(),
        G=g, D=d, BLOCK_D=block_d,
        BLOCK_N=max(16, min(64, 8192 // block_d)),  # a (BLOCK_N, D) fp32 tile of ~8k elements
        BLOCK_K=max(16, min(64, triton.next_power_of_2(max(kk, 1)))),
        MEMORY_ONLY=memory_only, RETURN_STATE=return_state,
        num_warps=4,
    )
    if return_state:
        return out, AttentionState(m_out, l_out, acc_out)
    return out
