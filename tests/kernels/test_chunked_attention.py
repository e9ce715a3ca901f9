"""RETRO's chunked cross-attention: the Triton kernel (interpreted on CPU) over packed rows against
the padded PyTorch reference, over awkward shapes: queries before any chunk is complete, queries
starting mid-chunk, one query (decode), chunks with no rows, odd row counts, a query range past
the last chunk, GQA-free multi-head, fp32 and bf16."""
from __future__ import annotations

import pytest
import torch

from memlm.kernels import chunked_cross_attention
from memlm.kernels.chunked_attention import chunked_cross_attention_ref, pack_rows

M = 8
# (B, H, T, start, first_chunk, G, L, dh)
CASES = [
    (1, 2, 1, 15, 1, 1, 5, 16),  # decode, the position that first reads chunk 1
    (1, 3, 1, 6, 0, 1, 7, 16),  # decode before chunk 0 is complete: reads nothing
    (2, 2, 40, 0, 0, 5, 11, 32),  # a whole prefill
    (1, 4, 17, 20, 1, 3, 9, 24),  # starts mid-chunk, dh not a power of two
    (2, 1, 50, 3, 2, 2, 33, 16),  # positions past the last chunk
    (1, 2, 9, 30, 3, 0, 4, 16),  # no chunk at all
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,H,T,start,first_chunk,G,L,dh", CASES)
def test_kernel_matches_reference(B, H, T, start, first_chunk, G, L, dh, dtype):
    g = torch.Generator().manual_seed(T * 31 + start)
    q = torch.randn(B, H, T, dh, generator=g).to(dtype)
    k = torch.randn(B, G, H, L, dh, generator=g).to(dtype)
    v = torch.randn(B, G, H, L, dh, generator=g).to(dtype)
    valid = torch.rand(B, G, L, generator=g) > 0.4
    if G:
        valid[0, -1] = False  # a chunk without rows
    want = chunked_cross_attention_ref(q.float(), k.float(), v.float(), valid, start, M, first_chunk)
    got = chunked_cross_attention(q, k, v, valid, start, M, first_chunk, backend="triton")
    assert got.dtype == dtype and got.shape == want.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)


def test_packing_keeps_only_valid_rows_in_order():
    k = torch.arange(2 * 2 * 1 * 3 * 1, dtype=torch.float32).view(2, 2, 1, 3, 1)  # (B, G, H, L, dh)
    valid = torch.tensor([[[True, False, True], [False, False, False]], [[True, True, True], [False, True, False]]])
    kp, vp, offsets = pack_rows(k, k, valid)
    assert kp.view(-1).tolist() == [0.0, 2.0, 6.0, 7.0, 8.0, 10.0]
    assert offsets.tolist() == [[0, 2, 2], [2, 5, 6]]
