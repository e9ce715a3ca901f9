"""landmark's block memory (`memlm.modes.landmark.blocks`): the block table, block scoring
(Quest's min/max bound really bounds every row's score; "max" through FAISS picks the blocks that
scoring every row picks), the top-k blocks' rows as what is read,
and attention over every block equal to attention over every memory row, over awkward shapes
(no blocks, one, an odd count, k above the block count, GQA 1 and 3, blocks of unequal length)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memlm.kernels.reference import knn_attention_ref
from memlm.modes.landmark.blocks import BlockKV, block_layout


def test_block_layout_groups_contiguous_rows():
    ids, rows, offsets = block_layout(np.array([7, 7, 7, 3, 9, 9]))
    assert ids.tolist() == [7, 3, 9]
    assert rows.tolist() == [[0, 1, 2], [3, -1, -1], [4, 5, -1]]
    assert offsets.tolist() == [0, 1, 2, 0, 0, 1]
    ids, rows, offsets = block_layout(np.zeros(0, np.int64))
    assert ids.shape == (0,) and rows.shape == (0, 0) and offsets.shape == (0,)


def memory(hkv: int, blocks: list[int], d: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n = sum(blocks)
    keys, values = torch.randn(hkv, n, d, generator=g).half().float(), torch.randn(hkv, n, d, generator=g)  # fp16 keys, as stored
    row_blocks = np.repeat(np.arange(len(blocks)) * 10 + 5, blocks)
    _, rows, _ = block_layout(row_blocks)
    return keys, values, torch.from_numpy(rows)


@pytest.mark.parametrize("hq,hkv", [(3, 3), (6, 2)])  # GQA 1 and 3
@pytest.mark.parametrize("blocks", [[5], [4, 1, 7], [3, 3, 3, 2, 6]])
@pytest.mark.parametrize("k", [1, 2, 9])
@pytest.mark.parametrize("representation", ["mean", "minmax", "max"])  # "max": FAISS on CPU, checked against scoring every row
def test_each_head_reads_every_row_of_its_top_blocks(hq, hkv, blocks, k, representation):
    keys, values, rows = memory(hkv, blocks)
    store = BlockKV(keys, values, rows, representation, faiss_from_rows=0)  # "max": the FAISS path at any size
    assert (store._key_index is not None) == (representation == "max")
    q = torch.randn(1, hq, 4, keys.shape[-1], generator=torch.Generator().manual_seed(1))
    scores = store.block_scores(q)  # (1, Hq, Tq, nB)
    _, idx = store.search(q, k)
    kb = min(k, len(blocks))
    assert idx.shape == (1, hq, 4, kb * rows.shape[1])
    for h in range(hq):
        for t in range(4):
            want = scores[0, h, t].topk(kb).indices
            got = idx[0, h, t]
            expect = rows[want].flatten()
            assert torch.equal(got, expect)
    assert int(store.reads.sum()) == hq * 4 * kb
    if representation == "minmax":  # an upper bound of every row's q . k in the block
        g = hq // hkv
        row_scores = torch.einsum("bhtd,hnd->bhtn", q, keys.repeat_interleave(g, 0))
        for b, r in enumerate(rows):
            r = r[r >= 0]
            assert (row_scores[..., r].amax(-1) <= scores[..., b] + 1e-5).all()


@pytest.mark.parametrize("hq,hkv", [(3, 3), (6, 2)])
def test_reading_every_block_is_attention_over_the_whole_memory(hq, hkv):
    keys, values, rows = memory(hkv, [4, 1, 7, 2])
    store = BlockKV(keys, values, rows)
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, hq, 3, 16, generator=g)
    kc, vc = torch.randn(1, hkv, 5, 16, generator=g), torch.randn(1, hkv, 5, 16, generator=g)
    got = store.attention(q, kc, vc, top_k=10)
    every = torch.arange(keys.shape[1]).expand(1, hq, 3, -1)
    want = knn_attention_ref(q, kc, vc, keys, values, every)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_an_empty_memory_reads_nothing():
    keys, values = torch.zeros(2, 0, 16), torch.zeros(2, 0, 16)
    store = BlockKV(keys, values, torch.zeros(0, 0, dtype=torch.int64))
    q = torch.randn(1, 4, 2, 16)
    scores, idx = store.search(q, 4)
    assert idx.shape == (1, 4, 2, 0)
    kc, vc = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    torch.testing.assert_close(store.attention(q, kc, vc, top_k=4), knn_attention_ref(q, kc, vc, keys, values, idx))


def test_bf16_memory_is_read_like_fp32():
    keys, values, rows = memory(2, [3, 5, 2])
    q = torch.randn(1, 4, 2, 16, generator=torch.Generator().manual_seed(3))
    kc, vc = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    exact = BlockKV(keys, values, rows).attention(q, kc, vc, top_k=2)
    half = BlockKV(keys.bfloat16(), values.bfloat16(), rows).attention(q, kc, vc, top_k=2)
    torch.testing.assert_close(half, exact, rtol=0.05, atol=0.05)
