"""Triton kernel for the exact merge of partial attention states (merge_attention_states).

Attention over a union of disjoint key sets equals the log-sum-exp combination of the partial
states (m, l, acc) of each set (the associativity flash-decoding and Lean Attention use), so
memory sharded across devices or servers gives the output of one memory. One program merges
BLOCK_R rows across all S states in one pass (an online max, like the softmax itself).

Limits: states are stacked into (S, R[, D]) fp32 tensors first (they are small: one row per
query, not per key). Empty states (m = -inf, l = 0) contribute nothing; an all-empty row gives 0.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .reference import AttentionState, merge_attention_states_ref  # noqa: F401


@triton.jit
def _merge_states_fwd(
    M, L, ACC,  # (S, R), (S, R), (S, R, D) fp32, contiguous
    O, M_OUT, L_OUT, ACC_OUT,  # (R, D), (R,), (R,), (R, D) fp32, contiguous
    S, R,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    rr = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # (BLOCK_R,)
    rd = tl.arange(0, BLOCK_D)
    r_ok = rr < R
    tile_ok = r_ok[:, None] & (rd[None, :] < D)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for s in range(0, S):
        m_s = tl.load(M + s * R + rr, mask=r_ok, other=float("-inf"))
        l_s = tl.load(L + s * R + rr, mask=r_ok, other=0.0)
        acc_s = tl.load(ACC + (s * R + rr[:, None]) * D + rd[None, :], mask=tile_ok, other=0.0)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # both empty: weights exp(-inf) = 0
        w_old = tl.exp(m - m_safe)
        w_s = tl.exp(m_s - m_safe)
        l = l * w_old + l_s * w_s
        acc = acc * w_old[:, None] + acc_s * w_s[:, None]
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(O + rr[:, None] * D + rd[None, :], out, mask=tile_ok)
    tl.store(M_OUT + rr, m, mask=r_ok)
    tl.store(L_OUT + rr, l, mask=r_ok)
    tl.store(ACC_OUT + rr[:, None] * D + rd[None, :], acc, mask=tile_ok)


def merge_attention_states(
    states: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, AttentionState]:
    """states: S >= 1 of (m (B, Hq, Tq), l (B, Hq, Tq), acc (B, Hq, Tq, D)).

    Returns (out (B, Hq, Tq, D) fp32, merged AttentionState), as merge_attention_states_ref.
    """
    if len(states) == 0:
        raise ValueError("merge_attention_states needs at least one state")
    lead = tuple(states[0][0].shape)
    for j, (m_j, l_j, acc_j) in enumerate(states):
        if tuple(m_j.shape) != lead or tuple(l_j.shape) != lead or tuple(acc_j.shape[:-1]) != lead:
            raise ValueError(f"state {j} has shapes m {tuple(m_j.shape)}, l {tuple(l_j.shape)}, "
                             f"acc {tuple(acc_j.shape)}; expected m, l {lead} and acc {lead} + (D,)")
    d = states[0][2].shape[-1]
    n_states = len(states)
    m = torch.stack([s[0].float() for s in states]).reshape(n_states, -1).contiguous()  # (S, R)
    l = torch.stack([s[1].float() for s in states]).reshape(n_states, -1).contiguous()  # (S, R)
    acc = torch.stack([s[2].float() for s in states]).reshape(n_states, -1, d).contiguous()  # (S, R, D)
    rows = m.shape[1]
    out = torch.empty((rows, d), dtype=torch.float32, device=m.device)
    m_out = torch.empty((rows,), dtype=torch.float32, device=m.device)
    l_out = torch.empty_like(m_out)
    acc_out = torch.empty_like(out)
    if rows > 0 and d > 0:
        block_d = triton.next_power_of_2(d)
        block_r = max(1, min(64, 4096 // block_d))
        _merge_states_fwd[(triton.cdiv(rows, block_r),)](
            m, l, acc, out, m_out, l_out, acc_out, n_states, rows,
            D=d, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4,
        )
    return out.view(*lead, d), AttentionState(m_out.view(lead), l_out.view(lead), acc_out.view(*lead, d))
