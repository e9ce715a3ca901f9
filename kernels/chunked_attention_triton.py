"""Triton kernel for RETRO's chunked cross-attention over packed neighbour rows (no padding).

One program owns one query row (position t, head h, sequence b). Its chunk is c(p) - first_chunk
with c(p) = (p + 1) // m - 1 (`chunked_attention.chunk_read_by`); it streams that chunk's rows
[offsets[b, g], offsets[b, g + 1]) of the packed K/V (H, R, dh) in BLOCK_N tiles through one
online softmax in fp32 with exp2 and writes the normalised output (0 for a query whose chunk is
outside the range or has no rows). Chunks differ in how many neighbours and how many tokens they
hold; nothing is padded, nothing but the output is written.

Made for decode and short prefill: a query row is a vector-times-tile FMA, not a tensor-core
matmul. Same contract as `chunked_attention.chunked_cross_attention_ref` once the rows are packed
(`chunked_attention.pack_rows`). Named *_triton so importing it does not shadow the public name.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .knn_attention_triton import _online_update  # the one online-softmax step both kernels take


@triton.jit
def _cca_fwd(
    Q, K, V, OFF, O,
    T, start, first_chunk, G, qk_scale,  # qk_scale = scale * log2(e)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kh, stride_kr, stride_kd,
    stride_vh, stride_vr, stride_vd,
    stride_offb,
    stride_ob, stride_oh, stride_ot, stride_od,
    M: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    g = (start + t + 1) // M - 1 - first_chunk
    in_range = (g >= 0) & (g < G)
    gi = tl.where(in_range, g, 0)
    lo = tl.load(OFF + b * stride_offb + gi).to(tl.int64)
    hi = tl.load(OFF + b * stride_offb + gi + 1).to(tl.int64)
    hi = tl.where(in_range, hi, lo)

    q = tl.load(Q + b * stride_qb + h * stride_qh + t * stride_qt + rd * stride_qd, mask=d_ok, other=0.0)
    q = q.to(tl.float32) * qk_scale
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    k_base = K + h * stride_kh
    v_base = V + h * stride_vh
    for n0 in range(lo, hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        ok = rn < hi
        kt = tl.load(k_base + rn[:, None] * stride_kr + rd[None, :] * stride_kd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_N, BLOCK_D)
        s = tl.where(ok, tl.sum(kt * q[None, :], axis=1), float("-inf"))  # (BLOCK_N,)
        vt = tl.load(v_base + rn[:, None] * stride_vr + rd[None, :] * stride_vd,
                     mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        m, l, acc = _online_update(s, vt, m, l, acc)
    out = acc / tl.where(l > 0, l, 1.0)
    tl.store(O + b * stride_ob + h * stride_oh + t * stride_ot + rd * stride_od, out.to(O.dtype.element_ty), mask=d_ok)


def chunked_cross_attention_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, offsets: torch.Tensor,
                                   start: int, chunk_tokens: int, first_chunk: int,
                                   scale: float | None = None) -> torch.Tensor:
    """q (B, H, T, dh); k, v (H, R, dh) packed rows; offsets (B, G + 1) int32 -> (B, H, T, dh) in q's dtype."""
    B, H, T, dh = q.shape
    if k.shape[0] != H or k.shape[2] != dh or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} must be ({H}, R, {dh})")
    if offsets.dim() != 2 or offsets.shape[0] != B:
        raise ValueError(f"offsets {tuple(offsets.shape)} must be ({B}, G + 1)")
    G = offsets.shape[1] - 1
    out = torch.empty_like(q)
    if T == 0:
        return out
    scale = dh ** -0.5 if scale is None else scale
    offsets = offsets.to(torch.int32).contiguous()
    if k.shape[1] == 0:  # no rows at all: keep the pointers valid
        k = v = q.new_zeros(H, 1, dh)
    block_d = triton.next_power_of_2(dh)
    _cca_fwd[(T, H, B)](
        q, k, v, offsets, out, T, start, first_chunk, G, scale * math.log2(math.e),
        *q.stride(), *k.stride(), *v.stride(), offsets.stride(0), *out.stride(),
        M=chunk_tokens, D=dh, BLOCK_D=block_d, BLOCK_N=32,
    )
    return out
