"""Triton kernel for exact maximum-inner-product top-k over a GPU-resident memory (memory_topk).

One program scores a tile of memory keys for a block of query rows of one KV head (all the
batch's query heads of a GQA group share the key tile, so mem_k is read once per KV head per
query block, not once per query head), keeps a running top-k per row in registers and writes only
its k best candidates per split; a tiny torch.topk then merges the SPLITS * k candidates.
The N scores are never written to global memory.

Top-k in registers: each score is packed with its index into one int64 whose integer order is
(score, -index) order (see _pack), so one max-reduction finds both. Each row keeps an unsorted
set of its k best and their minimum (the threshold). Per tile, while some row's best remaining
tile entry beats its threshold, that entry replaces the row's minimum (insertion by selection).
After the first k inserts thresholds rise fast, so a typical tile costs its dot product plus one
max-reduction; the worst case (scores increasing along N) costs k reductions per tile. (A bitonic
tl.topk per tile was the first design: a fixed ~log2(k)^2 passes per score, and under the
interpreter its xor-reduction shuffles are ~100x slower than a max-reduction.)

Limits: k <= 256 (K is padded to a power of two <= BLOCK_N); index < 2**32; q and mem_k must
share a dtype (fp16, bf16 or fp32; fp32 scores use IEEE fp32 dots, not TF32, so rankings match
the reference). Ties are broken towards the lower index. The file is named *_triton so that
importing it does not shadow the public memlm.kernels.memory_topk function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import check_gqa, _valid_n, group_queries, memory_topk_ref  # noqa: F401

MAX_K = 256
_EMPTY = -(2**63)  # packed sentinel below every real (score, index) pair: "no entry"
_EMPTY_TL = tl.constexpr(_EMPTY)
_FULL_TL = tl.constexpr(2**63 - 1)  # above every real pair: marks padding slots of the running set


@triton.jit
def _pack(s, idx):
    """fp32 scores, int32 indices -> int64 keys ordered by (score, then lower index first)."""
    bits = s.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip their magnitude bits.
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return key.to(tl.int64) * 4294967296 + (4294967295 - idx.to(tl.int64))


@triton.jit
def _memory_topk_fwd(
    Q,  # (Hkv, R, D): R = B * G query rows per KV head
    MK,  # (Hkv, N, D)
    CAND,  # (Hkv, R, SPLITS, K_PAD) int64 packed candidates
    R, n_valid, keys_per_split, K,
    stride_qh, stride_qr, stride_qd,
    stride_kh, stride_kn, stride_kd,
    stride_ch, stride_cr, stride_cs,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    K_PAD: tl.constexpr,
    IS_FP32: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)  # int64 offsets: Hkv * N * D passes 2**31 at N = 4M

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    rd = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rm < R
    q = tl.load(Q + h * stride_qh + rm[:, None] * stride_qr + rd[None, :] * stride_qd,
                mask=row_ok[:, None] & (rd[None, :] < D), other=0.0)  # (BLOCK_M, BLOCK_D)

    start = split * keys_per_split
    end = tl.minimum(start + keys_per_split, n_valid)
    rk = tl.arange(0, K_PAD)
    # An unsorted set of the k best per row; the K_PAD - K padding slots hold +max so that they
    # are never the row's minimum (the k-th best) and never get replaced.
    running = tl.where(rk[None, :] < K, tl.full((BLOCK_M, K_PAD), _EMPTY_TL, tl.int64), _FULL_TL)
    thr = tl.full((BLOCK_M,), _EMPTY_TL, tl.int64)  # k-th best so far, per row
    for n0 in range(start, end, BLOCK_N):
        rn = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)  # (BLOCK_N,); int64: rn * stride may pass 2**31
        col_ok = rn < end
        kt = tl.load(MK + h * stride_kh + rn[:, None] * stride_kn + rd[None, :] * stride_kd,
                     mask=col_ok[:, None] & (rd[None, :] < D), other=0.0)  # (BLOCK_N, BLOCK_D)
        if UPCAST:  # the interpreter's bf16/fp16 tl.dot is wrong; fp32 products are exact anyway
            q_op, k_op = q.to(tl.float32), kt.to(tl.float32)
        else:
            q_op, k_op = q, kt
        if IS_FP32 or UPCAST:
            s = tl.dot(q_op, tl.trans(k_op), input_precision="ieee")  # (BLOCK_M, BLOCK_N) fp32
        else:
            s = tl.dot(q_op, tl.trans(k_op)).to(tl.float32)  # bf16/fp16 products, fp32 sums
        packed = _pack(s, rn[None, :])
        packed = tl.where(row_ok[:, None] & col_ok[None, :], packed, _EMPTY_TL)
        # Insert the tile's entries that beat a row's k-th best, best first, one per row per
        # step; the loop runs while any row still gains (uniform over the program), so a tile
        # costs one max-reduction when nothing in it makes any row's top-k.
        top = tl.max(packed, axis=1)  # (BLOCK_M,)
        while tl.max((top > thr).to(tl.int32), axis=0) > 0:
            gains = top > thr  # (BLOCK_M,)
            slot = tl.argmin(running, axis=1)  # the row's current k-th best (first if several)
            running = tl.where((rk[None, :] == slot[:, None]) & gains[:, None], top[:, None], running)
            thr = tl.min(running, axis=1)
            packed = tl.where(packed == top[:, None], _EMPTY_TL, packed)  # packed values are unique
            top = tl.max(packed, axis=1)

    tl.store(CAND + h * stride_ch + rm[:, None] * stride_cr + split * stride_cs + rk[None, :],
             tl.where(rk[None, :] < K, running, _EMPTY_TL), mask=row_ok[:, None])


def _unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 packed (..., k) -> (scores fp32, indices int64), sentinel -> (-inf, -1)."""
    empty = packed == _EMPTY
    key = (packed >> 32).to(torch.int32)  # arithmetic shift: the signed score key
    bits = torch.where(key >= 0, key, key ^ 0x7FFFFFFF)
    scores = bits.view(torch.float32).masked_fill(empty, float("-inf"))
    idx = (0xFFFFFFFF - (packed & 0xFFFFFFFF)).masked_fill(empty, -1)
    return scores, idx


def _num_splits(n: int, programs_per_split: int, block_n: int, device: torch.device) -> int:
    """Enough splits to give every SM a few programs, each scanning at least 4 tiles."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4  # the interpreter: a few splits still exercise the candidate merge
    splits = max(1, target // max(1, programs_per_split))
    return max(1, min(splits, triton.cdiv(n, 4 * block_n)))


def memory_topk(
    q: torch.Tensor,  # (B, Hq, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    k: int,
    *,
    valid_n: int | None = None,
    shared_per_kv_head: bool = False,
    num_splits: int | None = None,  # launch tuning only; the result does not depend on it
    block_n: int = 128,  # launch tuning only
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of q . mem_k: scores (B, H, k) fp32 descending, indices (B, H, k) int64.

    H = Hq, or Hkv with shared_per_kv_head (each group scored by its mean query). Only the first
    valid_n rows of mem_k are searched; slots past them hold (-inf, -1).
    """
    b, hq, d = q.shape
    hkv, n_rows, dk = mem_k.shape
    if d != dk:
        raise ValueError(f"q head dim {d} != mem_k head dim {dk}")
    if q.dtype != mem_k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q ({q.dtype}) and mem_k ({mem_k.dtype}) must share one of fp16/bf16/fp32")
    if not 0 <= k <= MAX_K:
        raise ValueError(f"k={k} must lie in [0, {MAX_K}] for the Triton memory_topk")
    n = _valid_n(mem_k, valid_n)
    if shared_per_kv_head:
        q = group_queries(q, hkv)  # (B, Hkv, D)
        hq = hkv
    g = check_gqa(hq, hkv)
    h_out = hq
    scores = torch.full((b, h_out, k), float("-inf"), dtype=torch.float32, device=q.device)
    idx = torch.full((b, h_out, k), -1, dtype=torch.int64, device=q.device)
    if k == 0 or n == 0:
        return scores, idx

    # Rows of one KV head: (B, Hkv, G, D) -> (Hkv, B*G, D); row r = b * G + j is query head h*G + j.
    rows = b * g
    qh = q.view(b, hkv, g, d).permute(1, 0, 2, 3).reshape(hkv, rows, d).contiguous()
    k_pad = max(1, triton.next_power_of_2(k))
    block_n = max(block_n, k_pad, 16)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    m_blocks = triton.cdiv(rows, block_m)
    splits = num_splits or _num_splits(n, m_blocks * hkv, block_n, q.device)
    splits = max(1, min(splits, triton.cdiv(n, block_n)))
    keys_per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, keys_per_split)
    cand = torch.empty((hkv, rows, splits, k_pad), dtype=torch.int64, device=q.device)

    grid = (m_blocks, splits, hkv)
    _memory_topk_fwd[grid](
        qh, mem_k, cand,
        rows, n, keys_per_split, k,
        *qh.stride(), *mem_k.stride(), *cand.stride()[:3],
        D=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_M=block_m, BLOCK_N=block_n, K_PAD=k_pad,
        IS_FP32=q.dtype == torch.float32, UPCAST=q.device.type == "cpu",
        num_warps=8 if block_m >= 64 else 4, num_stages=3,
    )
    # Merge the splits: (Hkv, rows, SPLITS * K_PAD) candidates -> top k. Tiny next to the scan.
    kk = min(k, n)
    best = cand.view(hkv, rows, splits * k_pad).topk(kk, dim=-1).values  # (Hkv, rows, kk)
    best = best.view(hkv, b, g, kk).permute(1, 0, 2, 3).reshape(b, h_out, kk)  # (B, H, kk)
    s, i = _unpack(best)
    scores[..., :kk] = s
    idx[..., :kk] = i
    return scores, idx
