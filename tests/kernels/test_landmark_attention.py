"""landmark_attention: the fused Triton kernel (interpreted on CPU) against its fp64 reference, over
the issue's awkward shapes: 0, 1 and odd block counts, k above the block count, GQA 1 and 3, fp32
and bf16, blocks of unequal length, the three representations (best row, one key per group of
rows, Quest's min/max bound), prefill with a causal local part.

The kernel must pick the same blocks, best first, with the same scores; its output and state get
knn_attention's tolerances (fp32 accumulation from the same rounded inputs as the fp64 reference).
The reference itself is checked against first principles: reading every block equals attention
over the whole memory, and the blocks' attention shares are what the softmax put on their rows.
"""
import math

import numpy as np
import pytest
import torch

from memlm.kernels.landmark_reference import block_scores_ref, landmark_attention_ref
from memlm.kernels.landmark_attention_triton import landmark_attention
from memlm.kernels.reference import knn_attention_ref


def _blocks(lengths: list[int]) -> torch.Tensor:
    """(nB, R) row ids of consecutive blocks of these lengths, -1 padded."""
    r = max(lengths, default=0)
    rows = torch.full((len(lengths), r), -1, dtype=torch.int64)
    start = 0
    for i, n in enumerate(lengths):
        rows[i, :n] = torch.arange(start, start + n)
        start += n
    return rows


def _representation(kind: str, mem_k: torch.Tensor, rows: torch.Tensor, group: int = 3) -> dict:
    """The rep_* arguments of one representation, built from the keys as BlockKV builds them."""
    if kind == "max":
        return {}
    nb, r = rows.shape
    s = -(-r // group) if r else 0
    grouped = torch.nn.functional.pad(rows, (0, s * group - r), value=-1).view(nb, s, group)
    present = (grouped >= 0)[None, ..., None]
    keys = mem_k[:, grouped.clamp(min=0)].double()  # (Hkv, nB, S, g, D)
    rep_rows = torch.arange(nb * s).view(nb, s).masked_fill(~(grouped >= 0).any(-1), -1)
    if kind == "mean":
        rep = (keys * present).sum(3) / present.sum(3).clamp(min=1)
        return {"rep_k": rep.flatten(1, 2).to(mem_k.dtype), "rep_rows": rep_rows}
    high = torch.where(present, keys, -math.inf).amax(3).flatten(1, 2)
    low = torch.where(present, keys, math.inf).amin(3).flatten(1, 2)
    high, low = high.nan_to_num(0.0, 0.0, 0.0), low.nan_to_num(0.0, 0.0, 0.0)  # empty groups: never scored
    return {"rep_k": high.to(mem_k.dtype), "rep_rows": rep_rows, "rep_low": low.to(mem_k.dtype)}


def _inputs(b, hq, hkv, tq, tk, lengths, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    kc = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    vc = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    mk = (2 * torch.randn(hkv, n, d, generator=g)).to(dtype)
    mv = torch.randn(hkv, n, d, generator=g).to(dtype)
    return q, kc, vc, mk, mv, _blocks(lengths)


def _double(x):
    return x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x


CASES = [
    # b, hq, hkv, tq, tk, block lengths, k, d, cache_len
    (1, 3, 3, 1, 17, [5, 7, 3], 2, 64, None),  # decode, GQA 1, odd block count
    (1, 9, 3, 1, 20, [64] * 4 + [30, 64, 1], 4, 64, None),  # decode, GQA 3, 64-row blocks, a 1-row block
    (2, 6, 2, 4, 12, [6, 2, 9, 4, 4], 3, 32, None),  # short prefill (causal), batch 2
    (1, 3, 1, 1, 9, [8], 4, 64, None),  # one block, k above the block count
    (1, 6, 2, 1, 5, [3, 1, 2], 9, 16, 3),  # k far above the count; cache_len < Tk
    (1, 3, 3, 2, 6, [], 4, 64, None),  # no blocks: local attention only
]


@pytest.mark.parametrize("representation", ["max", "mean", "minmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, hq, hkv, tq, tk, lengths, k, d, cache_len", CASES)
def test_landmark_attention_matches_reference(b, hq, hkv, tq, tk, lengths, k, d, cache_len, dtype, representation):
    q, kc, vc, mk, mv, rows = _inputs(b, hq, hkv, tq, tk, lengths, d, dtype)
    rep = _representation(representation, mk, rows)
    out, reads, state = landmark_attention(q, kc, vc, mk, mv, rows, k, cache_len=cache_len, return_state=True, **rep)
    ref, ref_reads, ref_state = landmark_attention_ref(
        *map(_double, (q, kc, vc, mk, mv)), rows, k, cache_len=cache_len, return_state=True,
        **{name: _double(t) for name, t in rep.items()})
    assert out.dtype == dtype and out.shape == (b, hq, tq, d) and reads.blocks.shape == (b, hq, tq, k)
    assert torch.equal(reads.blocks, ref_reads.blocks), "the kernel chose other blocks than the reference"
    assert int((reads.blocks >= 0).sum(-1).max()) == min(k, len(lengths))
    torch.testing.assert_close(reads.scores.double(), ref_reads.scores.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reads.mass.double(), ref_reads.mass.double(), rtol=1e-4, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the output is rounded to bf16
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
    assert torch.equal(torch.isneginf(state.m), torch.isneginf(ref_state.m))
    finite = ~torch.isneginf(ref_state.m)
    torch.testing.assert_close(state.m[finite].double(), ref_state.m[finite], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.l.double(), ref_state.l, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.acc.double(), ref_state.acc, rtol=1e-4, atol=1e-4)


def test_blocks_come_best_first_with_their_scores():
    q, kc, vc, mk, mv, rows = _inputs(1, 6, 2, 1, 4, [4, 9, 2, 7, 7, 1, 3], 16, torch.float32, seed=3)
    _, reads = landmark_attention(q, kc, vc, mk, mv, rows, 5)
    every = block_scores_ref(q, mk, rows)  # (1, Hq, 1, nB): each block's best row
    want = every.topk(5, dim=-1)
    assert torch.equal(reads.blocks, want.indices)
    torch.testing.assert_close(reads.scores, want.values, rtol=1e-5, atol=1e-5)
    assert (reads.scores[..., :-1] >= reads.scores[..., 1:]).all()


@pytest.mark.parametrize("hq,hkv", [(3, 3), (6, 2)])
def test_reading_every_block_is_attention_over_the_whole_memory(hq, hkv):
    """The reference with k >= the block count reads every row: plain attention over local ∪ memory,
    and the block shares plus the local share sum to one."""
    q, kc, vc, mk, mv, rows = map(_double, _inputs(1, hq, hkv, 3, 5, [4, 1, 7, 2], 16, torch.float32, seed=4))
    out, reads, state = landmark_attention_ref(q, kc, vc, mk, mv, rows, 10, return_state=True)
    every = torch.arange(mk.shape[1]).expand(1, hq, 3, -1)
    want, want_state = knn_attention_ref(q, kc, vc, mk, mv, every, return_state=True)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    local, local_state = knn_attention_ref(q, kc, vc, mk, mv, every[..., :0], return_state=True)
    local_share = local_state.l * torch.exp(local_state.m - want_state.m) / want_state.l
    torch.testing.assert_close(reads.mass.sum(-1) + local_share, torch.ones_like(local_share), rtol=1e-6, atol=1e-6)  # mass is fp32


def test_quest_bound_is_an_upper_bound_of_every_row():
    q, _, _, mk, _, rows = _inputs(1, 6, 2, 3, 1, [5, 3, 8], 16, torch.float32, seed=5)
    rep = _representation("minmax", mk.double(), rows, group=16)
    bound = block_scores_ref(q.double(), **rep)  # (1, Hq, Tq, nB)
    best = block_scores_ref(q.double(), mk.double(), rows)
    assert (best <= bound + 1e-9).all() and (bound > best + 1e-6).any()


def test_dispatcher_landmark_attention():
    from memlm.kernels import landmark_attention as dispatched

    args = _inputs(1, 6, 2, 1, 7, [5, 4, 6], 32, torch.float32, seed=6)
    out_t, reads_t = dispatched(*args, 2, backend="triton")
    out_r, reads_r = dispatched(*args, 2)  # CPU tensors: the reference
    assert torch.equal(reads_t.blocks, reads_r.blocks)
    torch.testing.assert_close(out_t, out_r, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    q, kc, vc, mk, mv, rows = _inputs(1, 6, 2, 1, 3, [4, 4], 16, torch.float32)
    with pytest.raises(ValueError, match="rep_rows"):
        landmark_attention_ref(q, kc, vc, mk, mv, rows, 2, rep_k=mk)
    with pytest.raises(ValueError, match="multiple"):
        landmark_attention_ref(q[:, :5], kc, vc, mk, mv, rows, 2)
    with pytest.raises(ValueError, match="top_k"):
        landmark_attention(q, kc, vc, mk, mv, rows, 65)
    assert np.isfinite(landmark_attention_ref(q, kc, vc, mk, mv, rows, 0)[0].numpy()).all()


def test_reference_query_chunks_do_not_change_the_result(monkeypatch):
    """block_scores_ref and read_blocks_ref split long prefills into query chunks of bounded size;
    one query per chunk gives what one chunk for all gives."""
    import memlm.kernels.landmark_reference as ref_mod

    args = map(_double, _inputs(2, 6, 2, 7, 9, [5, 3, 8, 2], 16, torch.float32, seed=7))
    q, kc, vc, mk, mv, rows = args
    rep = {name: _double(t) for name, t in _representation("minmax", mk, rows).items()}
    whole = landmark_attention_ref(q, kc, vc, mk, mv, rows, 2, **rep)
    monkeypatch.setattr(ref_mod, "_SCORE_BLOCK", 1)
    chunked = landmark_attention_ref(q, kc, vc, mk, mv, rows, 2, **rep)
    torch.testing.assert_close(chunked[0], whole[0], rtol=1e-12, atol=1e-12)
    for got, want in zip(chunked[1], whole[1]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, hq, hkv, tq, tk, lengths, k, d, cache_len", CASES)
def test_grouped_softmax_matches_reference(b, hq, hkv, tq, tk, lengths, k, d, cache_len, dtype):
    """Trained landmarks' reading (grouped=True): one landmark key per block, a gate bias per head,
    blocks scored by other queries (score_q: the queries before RoPE); each chosen block one entry
    of the outer softmax, its rows a softmax of their own."""
    q, kc, vc, mk, mv, rows = _inputs(b, hq, hkv, tq, tk, lengths, d, dtype, seed=9)
    rep = _representation("mean", mk, rows, group=max(1, rows.shape[1]))  # one key per block
    bias = torch.randn(hq, generator=torch.Generator().manual_seed(10))
    sq = torch.randn(q.shape, generator=torch.Generator().manual_seed(11)).to(dtype)  # other scoring queries
    out, reads, state = landmark_attention(q, kc, vc, mk, mv, rows, k, grouped=True, gate_bias=bias, score_q=sq,
                                           cache_len=cache_len, return_state=True, **rep)
    ref, ref_reads, ref_state = landmark_attention_ref(
        *map(_double, (q, kc, vc, mk, mv)), rows, k, grouped=True, gate_bias=bias.double(), score_q=sq.double(),
        cache_len=cache_len, return_state=True, **{name: _double(t) for name, t in rep.items()})
    assert torch.equal(reads.blocks, ref_reads.blocks)
    torch.testing.assert_close(reads.scores.double(), ref_reads.scores.double(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(reads.mass.double(), ref_reads.mass.double(), rtol=1e-4, atol=1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol)
    finite = ~torch.isneginf(ref_state.m)
    torch.testing.assert_close(state.m[finite].double(), ref_state.m[finite], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.l.double(), ref_state.l, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.acc.double(), ref_state.acc, rtol=1e-4, atol=1e-4)
