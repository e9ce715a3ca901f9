"""knn_attention: the Triton kernel (interpreted on CPU) against the fp64 reference.

Output tolerance, flash-attention's rule: the kernel's error against the fp64 reference must be at
most 2x the error of a plain PyTorch implementation run in the input dtype (scores, softmax and
p @ v in that dtype), plus an atol of 1e-5 for fp32 rounding in the online softmax. States
(m, l, acc) are fp32 in the kernel whatever the input dtype, computed from the same rounded inputs
as the reference, so they get fp32-level tolerances (rtol 1e-4).
"""
import math

import pytest
import torch

from memlm.kernels.knn_attention_triton import knn_attention
from memlm.kernels.merge_states_triton import merge_attention_states
from memlm.kernels.reference import knn_attention_ref


def _inputs(b, hq, hkv, tq, tk, n, kk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)  # (B, Hq, Tq, D)
    k_cache = torch.randn(b, hkv, tk, d, generator=g).to(dtype)  # (B, Hkv, Tk, D)
    v_cache = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    mem_k = (2 * torch.randn(hkv, n, d, generator=g)).to(dtype)  # (Hkv, N, D), larger: they matter
    mem_v = torch.randn(hkv, n, d, generator=g).to(dtype)
    mem_idx = torch.randint(-1, max(n, 1), (b, hq, tq, kk), generator=g)  # (B, Hq, Tq, K), some -1
    if n == 0:
        mem_idx.fill_(-1)
    return q, k_cache, v_cache, mem_k, mem_v, mem_idx


def _torch_lowp(q, k_cache, v_cache, mem_k, mem_v, mem_idx, cache_len, memory_only):
    """Plain PyTorch attention in q's dtype over the explicit key set: the error baseline."""
    b, hq, tq, d = q.shape
    hkv, n, _ = mem_k.shape
    g = hq // hkv
    present = (mem_idx >= 0) & (mem_idx < n)
    heads = (torch.arange(hq) // g).view(1, hq, 1, 1).expand_as(mem_idx)
    safe = mem_idx.clamp(0, max(n - 1, 0))
    mk = mem_k[heads, safe] if n else torch.zeros(*mem_idx.shape, d, dtype=q.dtype)  # (B, Hq, Tq, K, D)
    mv = mem_v[heads, safe] if n else torch.zeros(*mem_idx.shape, d, dtype=q.dtype)
    s_mem = torch.einsum("bhtd,bhtkd->bhtk", q, mk).masked_fill(~present, float("-inf"))
    s, vs = [s_mem], [mv]
    if not memory_only:
        tk = k_cache.shape[2]
        L = tk if cache_len is None else cache_len
        kc = k_cache.repeat_interleave(g, dim=1)
        vc = v_cache.repeat_interleave(g, dim=1)
        pos_q = L - tq + torch.arange(tq).view(tq, 1)
        vis = (torch.arange(tk).view(1, tk) <= pos_q) & (torch.arange(tk).view(1, tk) < L)  # (Tq, Tk)
        s.insert(0, (q @ kc.transpose(-1, -2)).masked_fill(~vis, float("-inf")))
        vs.insert(0, vc.unsqueeze(2).expand(b, hq, tq, tk, d))
    p = torch.softmax(torch.cat(s, -1) / math.sqrt(d), dim=-1).nan_to_num(0.0)  # empty rows -> 0
    return torch.einsum("bhtk,bhtkd->bhtd", p, torch.cat(vs, 3))


CASES = [
    # b, hq, hkv, tq, tk, n, K, d, cache_len, memory_only
    (1, 3, 3, 1, 37, 83, 8, 64, None, False),  # decode, GQA 1
    (2, 9, 3, 1, 20, 769, 16, 64, None, False),  # decode, GQA 3, larger memory
    (1, 6, 2, 5, 16, 7, 12, 64, None, False),  # short prefill (causal), K > N with -1 entries
    (2, 3, 1, 5, 24, 83, 5, 128, 13, None),  # fixed-size cache with cache_len < Tk, d 128
    (1, 3, 3, 5, 3, 0, 4, 64, None, False),  # empty memory; Tq > Tk: early queries see nothing
    (2, 6, 2, 1, 0, 83, 7, 64, None, True),  # memory only (shard side)
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b, hq, hkv, tq, tk, n, kk, d, cache_len, memory_only", CASES)
def test_knn_attention_matches_reference(b, hq, hkv, tq, tk, n, kk, d, cache_len, memory_only, dtype):
    memory_only = bool(memory_only)
    args = _inputs(b, hq, hkv, tq, tk, n, kk, d, dtype)
    out, state = knn_attention(*args, cache_len=cache_len, return_state=True, memory_only=memory_only)
    ref, ref_state = knn_attention_ref(*(a.double() if a.is_floating_point() else a for a in args),
                                       cache_len=cache_len, return_state=True, memory_only=memory_only)
    lowp = _torch_lowp(*args, cache_len, memory_only)
    assert out.dtype == dtype and out.shape == (b, hq, tq, d)
    assert not out.isnan().any()
    err = (out.double() - ref).abs().max().item()
    torch_err = (lowp.double() - ref).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, (err, torch_err)
    # fp32 states from the same rounded inputs as the fp64 reference: fp32 accumulation error only.
    assert torch.equal(torch.isneginf(state.m), torch.isneginf(ref_state.m))
    finite = ~torch.isneginf(ref_state.m)
    torch.testing.assert_close(state.m[finite].double(), ref_state.m[finite], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(state.l.double(), ref_state.l, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(state.acc.double(), ref_state.acc, rtol=1e-4, atol=1e-4)


def test_sharded_memory_merges_to_one_memory():
    """Lean Attention associativity: local part + 3 memory shards, merged, = one-shot attention."""
    b, hq, hkv, tq, tk, n, kk, d = 2, 6, 2, 3, 19, 90, 10, 64
    q, kc, vc, mem_k, mem_v, idx = _inputs(b, hq, hkv, tq, tk, n, kk, d, torch.float32, seed=5)
    whole = knn_attention_ref(q.double(), kc.double(), vc.double(), mem_k.double(), mem_v.double(), idx)

    no_mem = torch.full_like(idx, -1)
    states = [knn_attention(q, kc, vc, mem_k, mem_v, no_mem, return_state=True)[1]]  # local only
    bounds = [0, 25, 26, 90]  # uneven shards, one holding a single row
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        local_idx = torch.where((idx >= lo) & (idx < hi), idx - lo, -1)  # shard-local indices
        _, st = knn_attention(q, None, None, mem_k[:, lo:hi], mem_v[:, lo:hi], local_idx,
                              return_state=True, memory_only=True)
        states.append(st)
    states.append(knn_attention(q, None, None, mem_k[:, :0], mem_v[:, :0], no_mem[..., :0],
                                return_state=True, memory_only=True)[1])  # a shard with nothing
    out, _ = merge_attention_states(states)
    # fp32 kernels against an fp64 reference: fp32 rounding over ~30 keys.
    torch.testing.assert_close(out.double(), whole, rtol=1e-5, atol=2e-6)


def test_return_state_is_consistent_with_output():
    args = _inputs(1, 3, 3, 2, 11, 40, 6, 64, torch.float32, seed=6)
    out, (m, l, acc) = knn_attention(*args, return_state=True)
    torch.testing.assert_close(out, acc / l.unsqueeze(-1))
    assert torch.equal(knn_attention(*args), out)


def test_dispatcher_knn_attention():
    from memlm.kernels import knn_attention as dispatched

    args = _inputs(1, 3, 3, 1, 9, 20, 4, 64, torch.float32, seed=7)
    torch.testing.assert_close(dispatched(*args, backend="triton"), dispatched(*args), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("memory_only", [False, True])
def test_reference_query_chunks_do_not_change_the_result(monkeypatch, memory_only):
    """knn_attention_ref splits long prefills into query chunks that read only the local keys
    their last query can see; one query per chunk must give what one chunk for all gives
    (same fp64 arithmetic per row, so equal to fp64 rounding)."""
    import memlm.kernels.reference as ref_mod

    b, hq, hkv, tq, tk, n, kk, d = 2, 6, 2, 9, 14, 40, 5, 16
    q, kc, vc, mk, mv, idx = (a.double() if a.is_floating_point() else a
                              for a in _inputs(b, hq, hkv, tq, tk, n, kk, d, torch.float32, seed=8))
    lens = torch.tensor([14, 11])  # per-row valid lengths; row 1's first queries see fewer keys
    whole, st = knn_attention_ref(q, kc, vc, mk, mv, idx, cache_len=lens, return_state=True, memory_only=memory_only)
    monkeypatch.setattr(ref_mod, "_SCORE_BLOCK", 1)  # -> one query per chunk
    chunked, st_c = knn_attention_ref(q, kc, vc, mk, mv, idx, cache_len=lens, return_state=True,
                                      memory_only=memory_only)
    torch.testing.assert_close(chunked, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st_c.l, st.l, rtol=1e-12, atol=1e-12)
    # And against attention written out by hand for one row: softmax over the visible keys ∪ memory.
    bb, h, i = 1, 4, 3
    pos = int(lens[bb]) - tq + i
    keys = [] if memory_only else [kc[bb, h // 3, j] for j in range(min(pos + 1, int(lens[bb])))]
    vals = [] if memory_only else [vc[bb, h // 3, j] for j in range(min(pos + 1, int(lens[bb])))]
    for r in idx[bb, h, i].tolist():
        if r >= 0:
            keys.append(mk[h // 3, r])
            vals.append(mv[h // 3, r])
    p = torch.softmax(torch.stack(keys) @ q[bb, h, i] / math.sqrt(d), dim=0)
    torch.testing.assert_close(whole[bb, h, i], p @ torch.stack(vals), rtol=1e-10, atol=1e-10)
