"""merge_attention_states: the Triton kernel (interpreted on CPU) against the reference.

The merge is a handful of fp32 exp/mul/add per element; against an fp64 reference on the same
fp32 inputs it is exact up to fp32 rounding (rtol 1e-5 absorbs exp's ulp error times a few states).
"""
import pytest
import torch

from memlm.kernels import merge_attention_states as dispatched
from memlm.kernels.merge_states_triton import merge_attention_states
from memlm.kernels.reference import merge_attention_states_ref


def _states(n_states, shape, d, empty_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for j in range(n_states):
        m = 3 * torch.randn(*shape, generator=g)  # (B, Hq, Tq)
        l = torch.rand(*shape, generator=g) + 0.5
        acc = torch.randn(*shape, d, generator=g)  # (B, Hq, Tq, D)
        if empty_every and j % empty_every == 0:  # a shard that retrieved nothing for some rows
            gone = torch.rand(*shape, generator=g) < 0.5
            m = m.masked_fill(gone, float("-inf"))
            l = l.masked_fill(gone, 0.0)
            acc = acc.masked_fill(gone.unsqueeze(-1), 0.0)
        out.append((m, l, acc))
    return out


@pytest.mark.parametrize("n_states", [1, 2, 3, 5])
@pytest.mark.parametrize("shape, d", [((1, 3, 1), 64), ((2, 9, 5), 64), ((1, 2, 3), 128), ((3, 1, 7), 80)])
def test_merge_matches_reference(n_states, shape, d):
    states = _states(n_states, shape, d, empty_every=2, seed=n_states)
    out, (m, l, acc) = merge_attention_states(states)
    ref, (rm, rl, racc) = merge_attention_states_ref([tuple(t.double() for t in s) for s in states])
    assert out.shape == (*shape, d) and not out.isnan().any()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.double(), rm, rtol=1e-6, atol=0)
    torch.testing.assert_close(l.double(), rl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc.double(), racc, rtol=1e-5, atol=1e-6)


def test_all_empty_rows_give_zero_not_nan():
    shape, d = (1, 3, 2), 64
    empty = (torch.full(shape, float("-inf")), torch.zeros(shape), torch.zeros(*shape, d))
    out, (m, l, acc) = merge_attention_states([empty, empty, empty])
    assert torch.equal(out, torch.zeros(*shape, d)) and torch.isneginf(m).all() and (l == 0).all()


def test_merge_is_associative():
    states = _states(4, (2, 3, 2), 64, seed=9)
    _, left = merge_attention_states(states[:2])
    _, right = merge_attention_states(states[2:])
    nested, _ = merge_attention_states([left, right])
    flat, _ = merge_attention_states(states)
    torch.testing.assert_close(nested, flat, rtol=1e-5, atol=1e-6)


def test_dispatcher_and_bad_input():
    states = _states(3, (1, 3, 1), 64)
    torch.testing.assert_close(dispatched(states, backend="triton")[0], dispatched(states)[0])
    with pytest.raises(ValueError, match="at least one"):
        dispatched([])
    bad = [states[0], (states[1][0][:, :2], states[1][1], states[1][2])]
    with pytest.raises(ValueError, match="state 1"):
        merge_attention_states(bad)
