"""Triton kernel for landmark (block-retrieval) attention: scoring, top-k block selection and the
block-gather attention in one program per query row, no block score written anywhere.

One program owns one query row (b, query head h, query position i):
1. it streams the memory's blocks in BLOCK_B tiles; per tile, each block's score is the best of
   its S representative entries (gathered through rep_rows; q . key, or Quest's bound); the
   scores are packed with their block ids into int64 keys (memory_topk's _pack: integer order =
   (score, lower id first)) and kept as a running top-k set in registers;
2. it attends over its visible local keys (BLOCK_N tiles) and then over the rows of its top-k
   blocks, best first (gathered through block_rows by pointer arithmetic), in one online softmax
   (fp32, exp2), keeping each block's own (max, sum) too;
   With grouped=True (trained landmarks: Landmark Attention's grouped softmax) a block's rows get a
   softmax of their own instead, and the block joins the outer softmax as one entry: its landmark
   logit (scale * score + gate_bias[h]) with that inner output as its value;
3. it writes the output, the k blocks with their scores and attention shares (BlockReads), and on
   request the softmax state (m, l, acc) for merging.
The reference is landmark_reference.landmark_attention_ref; same contract.

Limits: made for decode and short prefill, like knn_attention_triton (elementwise fp32 dots, one
program per query row: at batch 1 a decode step runs Hq programs, each scanning all block
representatives; with one landmark key per 64-row block that is N/64 keys, which is what makes the
cost flat, but the "max" representation scans every row). k <= 64 (held in registers); block
ids < 2**32. Named *_triton so that importing it does not shadow the dispatcher's function.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .landmark_reference import BlockReads, check_blocks
from .memory_topk_triton import _EMPTY_TL, _FULL_TL, _pack
from .knn_attention_triton import _attend_local, _online_update
from .reference import AttentionState, _cache_lens

MAX_K = 64


@triton.jit
def _unpack(packed):
    """int64 packed key -> (fp32 score, int64 block id); the empty sentinel -> (-inf, -1)."""
    empty = packed == _EMPTY_TL
    key = (packed >> 32).to(tl.int32)  # arithmetic shift: the signed score key
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    score = tl.where(empty, float("-inf"), bits.to(tl.float32, bitcast=True))
    block = tl.where(empty, -1, 4294967295 - (packed & 4294967295))
    return score, block


@triton.jit
def _landmark_attention_fwd(
    Q, SQ, KC, VC, MK, MV, BROWS, REPK, REPL, RROWS, LENS, GB,
    O, BLK_OUT, SC_OUT, MASS_OUT, M_OUT, L_OUT, ACC_OUT,
    Tq, Tk, N, NB, R, S, K, qk_scale,  # qk_scale = scale * log2(e)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kcb, stride_kch, stride_kct, stride_kcd,
    stride_vcb, stride_vch, stride_vct, stride_vcd,
    stride_mkh, stride_mkn, stride_mkd,
    stride_mvh, stride_mvn, stride_mvd,
    stride_bb, stride_br,
    stride_rkh, stride_rke, stride_rkd,
    stride_rrb, stride_rrs,
    stride_ob, stride_oh, stride_ot, stride_od,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_R: tl.constexpr,
    K_PAD: tl.constexpr,
    BOUND: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RETURN_STATE: tl.constexpr,
):
    i = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    hk = (h // G).to(tl.int64)  # GQA: the KV head this query head reads
    row = (b * tl.num_programs(1) + h) * Tq + i  # this query row in the contiguous (B, Hq, Tq, ...) outputs

    rd = tl.arange(0, BLOCK_D)
    d_ok = rd < D
    q = tl.load(Q + b * stride_qb + h * stride_qh + i * stride_qt + rd * stride_qd, mask=d_ok, other=0.0)
    q = q.to(tl.float32)  # (BLOCK_D,): times qk_scale for attention
    sq = tl.load(SQ + b * stride_qb + h * stride_qh + i * stride_qt + rd * stride_qd, mask=d_ok, other=0.0)
    sq = sq.to(tl.float32)  # the query that scores the blocks (q itself unless score_q)

    # 1. block scores -> running top-k (an unsorted set of packed keys; K_PAD - K slots hold +max)
    rk = tl.arange(0, K_PAD)
    running = tl.where(rk < K, tl.full((K_PAD,), _EMPTY_TL, tl.int64), _FULL_TL)
    thr = tl.min(running, axis=0)  # the k-th best so far
    rep_base = REPK + hk * stride_rkh
    low_base = REPL + hk * stride_rkh
    for b0 in range(0, NB, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)  # (BLOCK_B,)
        b_ok = rb < NB
        best = tl.full((BLOCK_B,), float("-inf"), tl.float32)
        for s in range(0, S):
            e = tl.load(RROWS + rb * stride_rrb + s * stride_rrs, mask=b_ok, other=-1).to(tl.int64)
            ok = e >= 0
            kt = tl.load(rep_base + e[:, None] * stride_rke + rd[None, :] * stride_rkd,
                         mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_B, BLOCK_D)
            if BOUND:  # Quest: per dim the larger of q * min and q * max
                lo = tl.load(low_base + e[:, None] * stride_rke + rd[None, :] * stride_rkd,
                             mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
                sc = tl.sum(tl.maximum(kt * sq[None, :], lo * sq[None, :]), axis=1)
            else:
                sc = tl.sum(kt * sq[None, :], axis=1)
            best = tl.maximum(best, tl.where(ok, sc, float("-inf")))
        packed = tl.where(b_ok & (best > float("-inf")), _pack(best, rb), _EMPTY_TL)
        top = tl.max(packed, axis=0)
        while top > thr:  # insert the tile's entries that beat the k-th best, best first
            slot = tl.argmin(running, axis=0)
            running = tl.where(rk == slot, top, running)
            thr = tl.min(running, axis=0)
            packed = tl.where(packed == top, _EMPTY_TL, packed)  # packed keys are unique
            top = tl.max(packed, axis=0)
    running = tl.where(rk < K, running, _EMPTY_TL)

    # 2. one online softmax over the local context, then the chosen blocks' rows
    qs = q * qk_scale  # base-2 units
    bias = tl.load(GB + h).to(tl.float32) * 1.4426950408889634 if HAS_BIAS else 0.0  # GROUPED: the head's gate bias
    m = tl.full([], float("-inf"), tl.float32)
    l = tl.full([], 0.0, tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    seq_len = tl.load(LENS + b)
    local_end = tl.minimum(tl.maximum(seq_len - Tq + i + 1, 0), Tk)  # query i sits at L - Tq + i
    kc_base = KC + b * stride_kcb + hk * stride_kch
    vc_base = VC + b * stride_vcb + hk * stride_vch
    m, l, acc = _attend_local(qs, kc_base, vc_base, local_end, stride_kct, stride_kcd, stride_vct, stride_vcd,
                              rd, d_ok, m, l, acc, BLOCK_N)

    mk_base = MK + hk * stride_mkh
    mv_base = MV + hk * stride_mvh
    blk_m = tl.full((K_PAD,), float("-inf"), tl.float32)  # per chosen block: its own max, sum (base 2)
    blk_l = tl.zeros((K_PAD,), tl.float32)
    for j in range(0, K):  # best first
        top = tl.max(running, axis=0)
        running = tl.where(running == top, _EMPTY_TL, running)
        score, blk = _unpack(top)
        tl.store(BLK_OUT + row * K + j, blk)
        tl.store(SC_OUT + row * K + j, score)
        bm = tl.full([], float("-inf"), tl.float32)
        bl = tl.full([], 0.0, tl.float32)
        bacc = tl.zeros([BLOCK_D], dtype=tl.float32)  # GROUPED: the block's own softmax output
        r_end = tl.where(blk >= 0, R, 0)  # no block in this slot: read nothing
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            idx = tl.load(BROWS + blk * stride_bb + rr * stride_br, mask=rr < r_end, other=-1).to(tl.int64)
            ok = (idx >= 0) & (idx < N)
            kt = tl.load(mk_base + idx[:, None] * stride_mkn + rd[None, :] * stride_mkd,
                         mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_D)
            sc = tl.where(ok, tl.sum(kt * qs[None, :], axis=1), float("-inf"))
            vt = tl.load(mv_base + idx[:, None] * stride_mvn + rd[None, :] * stride_mvd,
                         mask=ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
            if GROUPED:  # a softmax over the block's rows alone
                bm, bl, bacc = _online_update(sc, vt, bm, bl, bacc)
            else:  # the rows join the one softmax; the block's own (max, sum) kept for its share
                m, l, acc = _online_update(sc, vt, m, l, acc)
                bm_new = tl.maximum(bm, tl.max(sc, axis=0))
                bm_safe = tl.where(bm_new == float("-inf"), 0.0, bm_new)
                bl = bl * tl.exp2(bm - bm_safe) + tl.sum(tl.exp2(sc - bm_safe), axis=0)
                bm = bm_new
        if GROUPED:  # the block joins the outer softmax as one entry: its landmark logit, its inner output
            logit = tl.where(blk >= 0, score * qk_scale + bias, float("-inf"))  # base 2
            inner = bacc / tl.where(bl > 0, bl, 1.0)
            m, l, acc = _online_update(tl.full([1], 0.0, tl.float32) + logit, inner[None, :], m, l, acc)
            bm = logit
            bl = tl.where(blk >= 0, 1.0, 0.0)
        blk_m = tl.where(rk == j, bm, blk_m)
        blk_l = tl.where(rk == j, bl, blk_l)

    l_safe = tl.where(l > 0, l, 1.0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    mass = tl.where(blk_l > 0, blk_l * tl.exp2(blk_m - m_safe) / l_safe, 0.0)
    tl.store(MASS_OUT + row * K + rk, mass, mask=rk < K)
    o_off = b * stride_ob + h * stride_oh + i * stride_ot
    tl.store(O + o_off + rd * stride_od, (acc / l_safe).to(O.dtype.element_ty), mask=d_ok)
    if RETURN_STATE:
        tl.store(M_OUT + row, m * 0.6931471805599453)  # base-2 -> natural units
        tl.store(L_OUT + row, l)
        tl.store(ACC_OUT + row * D + rd, acc, mask=d_ok)


def landmark_attention(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    v_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    block_rows: torch.Tensor,  # (nB, R) int64, -1 padded
    top_k: int,
    *,
    rep_k: torch.Tensor | None = None,
    rep_rows: torch.Tensor | None = None,
    rep_low: torch.Tensor | None = None,
    grouped: bool = False,
    gate_bias: torch.Tensor | None = None,
    score_q: torch.Tensor | None = None,
    scale: float | None = None,
    cache_len: int | torch.Tensor | None = None,
    return_state: bool = False,
) -> tuple[torch.Tensor, BlockReads] | tuple[torch.Tensor, BlockReads, AttentionState]:
    """Same contract as landmark_reference.landmark_attention_ref."""
    if not 0 <= top_k <= MAX_K:
        raise ValueError(f"top_k={top_k} must lie in [0, {MAX_K}] for the Triton landmark_attention")
    rep_k, rep_rows = check_blocks(q, mem_k, mem_v, block_rows, rep_k, rep_rows, rep_low)
    b, hq, tq, d = q.shape
    hkv, n, _ = mem_k.shape
    if k_cache.shape[:2] != (b, hkv) or k_cache.shape[3] != d or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} / v_cache {tuple(v_cache.shape)} must be ({b}, {hkv}, Tk, {d})")
    tk = k_cache.shape[2]
    nb, r = block_rows.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    lens = _cache_lens(cache_len, b, tk, q.device).to(torch.int32)

    out = torch.empty_like(q)
    blocks = torch.full((b, hq, tq, top_k), -1, dtype=torch.int64, device=q.device)
    scores = torch.full((b, hq, tq, top_k), float("-inf"), dtype=torch.float32, device=q.device)
    mass = torch.zeros((b, hq, tq, top_k), dtype=torch.float32, device=q.device)
    m_out = torch.empty((b, hq, tq), dtype=torch.float32, device=q.device)
    l_out = torch.empty_like(m_out)
    acc_out = torch.empty((b, hq, tq, d), dtype=torch.float32, device=q.device) if return_state else m_out
    if out.numel() == 0:
        out.zero_()
        reads = BlockReads(blocks, scores, mass)
        return (out, reads, AttentionState(m_out, l_out, acc_out)) if return_state else (out, reads)
    block_rows = block_rows.contiguous()
    rep_rows = rep_rows.contiguous()
    if score_q is not None and score_q.shape != q.shape:
        raise ValueError(f"score_q {tuple(score_q.shape)} must have q's shape {tuple(q.shape)}")
    sq = q if score_q is None else score_q.to(q.dtype)
    if sq.stride() != q.stride():  # the kernel reads both with q's strides
        q, sq = q.contiguous(), sq.contiguous()
    if rep_low is not None and rep_low.stride() != rep_k.stride():  # the kernel reads both with rep_k's strides
        rep_k, rep_low = rep_k.contiguous(), rep_low.contiguous()
    low = rep_low if rep_low is not None else rep_k  # unused placeholder when BOUND is off

    block_d = triton.next_power_of_2(d)
    grid = (tq, hq, b)
    _landmark_attention_fwd[grid](
        q, sq, k_cache, v_cache, mem_k, mem_v, block_rows, rep_k, low, rep_rows, lens,
        gate_bias.float().contiguous() if gate_bias is not None else lens,
        out, blocks, scores, mass, m_out, l_out, acc_out,
        tq, tk, n, nb, r, rep_rows.shape[1], top_k, scale * 1.4426950408889634,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *mem_k.stride(), *mem_v.stride(),
        *block_rows.stride(), *rep_k.stride(), *rep_rows.stride(), *out.stride(),
        G=hq // hkv, D=d, BLOCK_D=block_d,
        BLOCK_N=max(16, min(64, 8192 // block_d)),
        BLOCK_B=max(16, min(64, triton.next_power_of_2(max(nb, 1)))),
        BLOCK_R=max(16, min(64, triton.next_power_of_2(max(r, 1)))),
        K_PAD=max(2, triton.next_power_of_2(max(top_k, 1))),
        BOUND=rep_low is not None, GROUPED=grouped, HAS_BIAS=gate_bias is not None, RETURN_STATE=return_state,
        num_warps=4,
    )
    reads = BlockReads(blocks, scores, mass)
    return (out, reads, AttentionState(m_out, l_out, acc_out)) if return_state else (out, reads)
