"""Landmark (block-retrieval) attention: each query scores the memory's blocks by their
representative keys, takes its top-k blocks and attends to their rows and its local causal context
in one softmax. The PyTorch reference (the CPU path and the Triton kernel's judge); the fused kernel
is landmark_attention_triton.py.

A block's score is the best score of its representative entries (`rep_rows[b]`, -1 = none):
- rep_low None: q . rep_k[e] (a landmark key, a mean key per group of rows; or, with the default
  rep_k = mem_k and rep_rows = block_rows, every row of the block: its best row, exact);
- rep_low given: Quest's bound sum_d max(q_d rep_low[e]_d, q_d rep_k[e]_d), rep_k the per-dim max
  and rep_low the per-dim min of the block's keys.
Scores are raw inner products (unscaled); blocks with no entry score -inf and are never read.
Conventions of reference.py: GQA query head h reads KV head h // (Hq // Hkv); query i of Tq sits
at local position L - Tq + i (L = cache_len, default Tk) and sees local keys up to it; memory rows
are not masked by position.

Shapes: mem_k, mem_v (Hkv, N, D); block_rows (nB, R) int64 row ids, -1 padded; rep_k (and
rep_low) (Hkv, E, D); rep_rows (nB, S) int64 entry ids, -1 padded.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .reference import AttentionState, check_gqa, knn_attention_ref

_SCORE_BLOCK = 1 << 24  # entry scores one query chunk of block_scores_ref may hold (64 MB fp32)


class BlockReads(NamedTuple):
    """What each query row read: its top-k blocks, best first (K = the top_k asked for)."""

    blocks: torch.Tensor  # (B, Hq, Tq, K) int64 block ids, -1 where fewer blocks could be read
    scores: torch.Tensor  # (B, Hq, Tq, K) fp32 block scores (unscaled q . representation), -inf for none
    mass: torch.Tensor  # (B, Hq, Tq, K) fp32 share of the query's softmax that fell on each block's rows


def check_blocks(q, mem_k, mem_v, block_rows, rep_k, rep_rows, rep_low):
    """Shapes agree -> (rep_k, rep_rows) with the defaults filled in ("max": the rows themselves)."""
    hq, hkv, d = q.shape[1], mem_k.shape[0], q.shape[-1]
    check_gqa(hq, hkv)
    if mem_k.dim() != 3 or mem_k.shape[2] != d or mem_v.shape != mem_k.shape:
        raise ValueError(f"mem_k {tuple(mem_k.shape)} / mem_v {tuple(mem_v.shape)} must be (Hkv, N, {d})")
    if block_rows.dim() != 2:
        raise ValueError(f"block_rows {tuple(block_rows.shape)} must be (blocks, rows per block)")
    if rep_k is None:
        if rep_rows is not None or rep_low is not None:
            raise ValueError("rep_rows and rep_low need rep_k")
        return mem_k, block_rows
    if rep_rows is None or rep_rows.dim() != 2 or rep_rows.shape[0] != block_rows.shape[0]:
        raise ValueError(f"rep_rows must be ({block_rows.shape[0]}, entries per block) beside rep_k")
    if rep_k.dim() != 3 or rep_k.shape[0] != hkv or rep_k.shape[2] != d:
        raise ValueError(f"rep_k {tuple(rep_k.shape)} must be ({hkv}, entries, {d})")
    if rep_low is not None and rep_low.shape != rep_k.shape:
        raise ValueError(f"rep_low {tuple(rep_low.shape)} must have rep_k's shape {tuple(rep_k.shape)}")
    return rep_k, rep_rows


def block_scores_ref(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    rep_k: torch.Tensor,  # (Hkv, E, D)
    rep_rows: torch.Tensor,  # (nB, S) int64, -1 = none
    rep_low: Optional[torch.Tensor] = None,  # (Hkv, E, D): Quest's bound when given
) -> torch.Tensor:
    """Every block's score (B, Hq, Tq, nB), fp32 (fp64 for fp64 q), -inf for blocks with no entry:
    all E entries scored by one matmul per KV group (queries in chunks of bounded size), then each
    block's best entry."""
    b, hq, tq, d = q.shape
    hkv, e, _ = rep_k.shape
    g = check_gqa(hq, hkv)
    nb = rep_rows.shape[0]
    work = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.full((b, hq, tq, nb), float("-inf"), dtype=work, device=q.device)
    if nb == 0 or e == 0 or rep_rows.shape[1] == 0:
        return out
    absent = rep_rows < 0  # (nB, S)
    entries = rep_rows.clamp(min=0)
    high, low = rep_k.to(work).transpose(1, 2), None if rep_low is None else rep_low.to(work).transpose(1, 2)
    chunk = max(1, _SCORE_BLOCK // max(1, b * hq * (e + entries.numel())))
    for t0 in range(0, tq, chunk):
        qg = q[:, :, t0 : t0 + chunk].to(work)
        tc = qg.shape[2]
        qg = qg.reshape(b, hkv, g * tc, d)  # (B, Hkv, G*tc, D)
        s = qg @ high if low is None else qg.clamp(min=0) @ high + qg.clamp(max=0) @ low  # (B, Hkv, G*tc, E)
        s = s[..., entries].masked_fill(absent, float("-inf")).amax(-1)  # (B, Hkv, G*tc, nB)
        out[:, :, t0 : t0 + tc] = s.view(b, hq, tc, nb)
    return out


def landmark_attention_ref(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    v_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    block_rows: torch.Tensor,  # (nB, R) int64, -1 padded
    top_k: int,
    *,
    rep_k: Optional[torch.Tensor] = None,  # (Hkv, E, D); None: the rows themselves (a block's best row)
    rep_rows: Optional[torch.Tensor] = None,  # (nB, S) int64 entry ids, -1 padded
    rep_low: Optional[torch.Tensor] = None,  # (Hkv, E, D): Quest's bound, rep_k the upper keys
    grouped: bool = False,  # trained landmarks: the grouped softmax (grouped_read_ref)
    gate_bias: Optional[torch.Tensor] = None,  # (Hq,) grouped: added to the landmark logits
    score_q: Optional[torch.Tensor] = None,  # (B, Hq, Tq, D) the queries that score the blocks (default q)
    scale: Optional[float] = None,
    cache_len: int | torch.Tensor | None = None,
    return_state: bool = False,
) -> tuple[torch.Tensor, BlockReads] | tuple[torch.Tensor, BlockReads, AttentionState]:
    """Block retrieval then one softmax over the local context and the chosen blocks' rows:
    (out (B, Hq, Tq, D) in q's dtype, BlockReads[, AttentionState]) (see the module docstring).
    grouped: the chosen blocks enter that softmax as one entry each, logit scale * score +
    gate_bias[h], value their rows' own softmax output (grouped_read_ref). score_q: other queries
    score the representations (trained landmarks: q before RoPE against keys before RoPE)."""
    if top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0")
    rep_k, rep_rows = check_blocks(q, mem_k, mem_v, block_rows, rep_k, rep_rows, rep_low)
    if score_q is not None and score_q.shape != q.shape:
        raise ValueError(f"score_q {tuple(score_q.shape)} must have q's shape {tuple(q.shape)}")
    scores = block_scores_ref(q if score_q is None else score_q, rep_k, rep_rows, rep_low)  # (B, Hq, Tq, nB)
    kb = min(top_k, block_rows.shape[0])
    top_s, top = scores.topk(kb, dim=-1) if kb else (scores[..., :0], scores[..., :0].long())
    if grouped:
        scaled = top_s * (q.shape[-1] ** -0.5 if scale is None else scale)
        if gate_bias is not None:
            scaled = scaled + gate_bias.to(scaled).view(1, -1, 1, 1)
        out, reads, state = grouped_read_ref(q, k_cache, v_cache, mem_k, mem_v, block_rows, top, scaled, scale=scale,
                                             cache_len=cache_len)
        reads = reads._replace(scores=top_s.float().masked_fill(reads.blocks < 0, float("-inf")))
    else:
        out, reads, state = read_blocks_ref(q, k_cache, v_cache, mem_k, mem_v, block_rows, top, top_s, scale=scale,
                                            cache_len=cache_len)
    pad = top_k - kb
    if pad:
        reads = BlockReads(
            torch.nn.functional.pad(reads.blocks, (0, pad), value=-1),
            torch.nn.functional.pad(reads.scores, (0, pad), value=float("-inf")),
            torch.nn.functional.pad(reads.mass, (0, pad), value=0.0),
        )
    return (out, reads, state) if return_state else (out, reads)


def read_blocks_ref(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    v_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    block_rows: torch.Tensor,  # (nB, R) int64, -1 padded
    blocks: torch.Tensor,  # (B, Hq, Tq, K) int64 the blocks each query reads, -1 = none
    block_scores: torch.Tensor,  # (B, Hq, Tq, K) their scores (-inf: not read)
    *,
    scale: Optional[float] = None,
    cache_len: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, BlockReads, AttentionState]:
    """The read half of landmark_attention_ref, for blocks chosen elsewhere (FAISS, a shortlist):
    one softmax over the local context and these blocks' rows, and each block's share of it."""
    b, hq, tq, d = q.shape
    r = block_rows.shape[1]
    kb = blocks.shape[-1]
    none = (blocks < 0) | torch.isneginf(block_scores)  # blocks without an entry are never read
    top = blocks.masked_fill(none, -1)
    rows = block_rows[top.clamp(min=0)].masked_fill(none[..., None], -1).flatten(-2)  # (B, Hq, Tq, K*R)
    out, state, weights = knn_attention_ref(q, k_cache, v_cache, mem_k, mem_v, rows, scale=scale, cache_len=cache_len,
                                            memory_weights=True)  # weights (B, Hq, Tq, K*R)
    mass = weights.view(b, hq, tq, kb, r).sum(-1) if kb and r else weights.new_zeros(blocks.shape)
    return out, BlockReads(top, block_scores.float().masked_fill(none, float("-inf")), mass.float()), state


def grouped_read_ref(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    v_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    block_rows: torch.Tensor,  # (nB, R) int64, -1 padded
    blocks: torch.Tensor,  # (B, Hq, Tq, K) int64 the blocks each query reads, -1 = none
    landmark_logits: torch.Tensor,  # (B, Hq, Tq, K) their logits (scale * q . landmark key + bias)
    *,
    scale: Optional[float] = None,
    cache_len: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, BlockReads, AttentionState]:
    """Landmark Attention's grouped softmax over chosen blocks: one softmax over the causal local
    keys and the blocks' landmark logits; each block's share spread over its rows by the query's
    softmax over those rows alone. -> (out, BlockReads(blocks, logits, shares), the state of the
    outer softmax with acc holding the blocks' shares times their inner outputs)."""
    b, hq, tq, d = q.shape
    kb, r = blocks.shape[-1], block_rows.shape[1]
    none = blocks < 0
    logits = landmark_logits.to(torch.float64 if q.dtype == torch.float64 else torch.float32).masked_fill(
        none, float("-inf"))
    _, local = knn_attention_ref(q, k_cache, v_cache, mem_k, mem_v, blocks[..., :0], scale=scale, cache_len=cache_len,
                                 return_state=True)
    work = local.m.dtype
    if kb and r:  # each (query, block) pair one query row of a memory-only attention over the block's rows
        rows = block_rows[blocks.clamp(min=0)].masked_fill(none[..., None], -1)  # (B, Hq, Tq, K, R)
        inner = knn_attention_ref(q.repeat_interleave(kb, dim=2), None, None, mem_k, mem_v,
                                  rows.view(b, hq, tq * kb, r), scale=scale, memory_only=True)
        inner = inner.to(work).view(b, hq, tq, kb, d)
    else:
        inner = torch.zeros(b, hq, tq, kb, d, dtype=work, device=q.device)
    m = torch.maximum(local.m, logits.amax(-1) if kb else local.m)
    m_safe = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    keep = torch.exp(local.m - m_safe)  # 0 where the local part saw nothing
    p = torch.exp(logits.to(work) - m_safe[..., None])  # (B, Hq, Tq, K)
    l = local.l * keep + p.sum(-1)
    acc = local.acc * keep[..., None] + torch.einsum("bhtk,bhtkd->bhtd", p, inner)
    l_safe = torch.where(l > 0, l, torch.ones_like(l))
    out = (acc / l_safe[..., None]).to(q.dtype)
    return out, BlockReads(blocks.masked_fill(none, -1), logits.float(), (p / l_safe[..., None]).float()), \
        AttentionState(m, l, acc)
