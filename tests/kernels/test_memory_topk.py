"""memory_topk: the Triton kernel (interpreted on CPU) against the exact fp64 reference.

Scores: the kernel's fp32 scores may differ from the fp64 reference by accumulation order only;
they are judged against what a plain PyTorch matmul in the input dtype gets (flash-attention's
rule). Indices: ties and near-ties make the exact set ambiguous, so the returned set is judged by
the true (fp64) scores of its members, and compared as a set only where the k-th and (k+1)-th
true scores are separated by more than the score error.
"""
import pytest
import torch

from memlm.kernels import memory_topk as dispatched_memory_topk
from memlm.kernels.memory_topk_triton import memory_topk
from memlm.kernels.reference import memory_topk_ref

DTYPES = [torch.float32, torch.bfloat16]


def _inputs(b, hq, hkv, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, d, generator=g).to(dtype)  # (B, Hq, D)
    mem_k = torch.randn(hkv, n, d, generator=g).to(dtype)  # (Hkv, N, D)
    return q, mem_k


def _true_scores(q, mem_k, idx, shared=False):
    """fp64 scores of the returned indices (B, H, k); -inf where idx == -1."""
    from memlm.kernels.reference import group_queries

    hkv = mem_k.shape[0]
    if shared:
        q = group_queries(q, hkv)
    b, h, _ = q.shape
    g = h // hkv
    heads = (torch.arange(h) // g).view(1, h, 1).expand_as(idx)
    rows = mem_k[heads, idx.clamp(min=0)].double()  # (B, H, k, D)
    s = torch.einsum("bhd,bhkd->bhk", q.double(), rows)
    return s.masked_fill(idx < 0, float("-inf"))


def _check(q, mem_k, k, scores, idx, *, valid_n=None, shared=False):
    n = mem_k.shape[1] if valid_n is None else valid_n
    ref_s, ref_i = memory_topk_ref(q.double(), mem_k.double(), k, valid_n=valid_n, shared_per_kv_head=shared)
    assert scores.shape == ref_s.shape and idx.shape == ref_i.shape
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64
    # Padding: exactly the slots past min(k, n) hold (-inf, -1).
    kk = min(k, n)
    assert (idx[..., kk:] == -1).all() and torch.isneginf(scores[..., kk:]).all()
    assert (idx[..., :kk] >= 0).all() and (idx[..., :kk] < n).all()
    if kk == 0:
        return
    top = idx[..., :kk]
    assert (top.sort(dim=-1).values.diff(dim=-1) > 0).all(), "an index was returned twice"
    # Score error allowed: 2x a plain PyTorch matmul in the input dtype (output rounded to that
    # dtype, which is the dominant error for bf16), plus 1e-4 for fp32 accumulation-order noise.
    from memlm.kernels.reference import group_queries
    qq = group_queries(q, mem_k.shape[0]) if shared else q
    g = qq.shape[1] // mem_k.shape[0]
    torch_s = torch.einsum("bhgd,hnd->bhgn", qq.view(qq.shape[0], mem_k.shape[0], g, -1), mem_k[:, :n])
    torch_s = torch_s.reshape(qq.shape[0], qq.shape[1], n)
    exact = torch.einsum("bhgd,hnd->bhgn", qq.double().view(qq.shape[0], mem_k.shape[0], g, -1),
                         mem_k[:, :n].double()).reshape_as(torch_s)
    tol = 2 * (torch_s.double() - exact).abs().max().item() + 1e-4
    # The returned scores are the kernel's own scores of the returned indices ...
    true_s = _true_scores(q, mem_k, top, shared)
    assert (scores[..., :kk].double() - true_s).abs().max().item() <= tol
    # ... sorted descending, and the set is as good as the exact top-k up to the score error.
    assert (scores[..., :kk].diff(dim=-1) <= 0).all()
    assert (true_s.sort(dim=-1, descending=True).values - ref_s[..., :kk].double()).abs().max().item() <= 2 * tol
    # Where the k-th best is clearly separated from the (k+1)-th, the set itself must match.
    if kk < n:
        kth_gap = exact.topk(kk + 1, dim=-1).values.diff(dim=-1)[..., -1].abs()  # (B, H)
        clear = kth_gap > 2 * tol
        got = top.sort(dim=-1).values[clear]
        want = ref_i[..., :kk].sort(dim=-1).values[clear]
        assert torch.equal(got, want)
    else:
        assert torch.equal(top.sort(dim=-1).values, ref_i[..., :kk].sort(dim=-1).values)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "b, hq, hkv, n, k, d",
    [
        (1, 3, 3, 0, 4, 64),  # empty memory: all (-inf, -1)
        (2, 3, 3, 1, 4, 64),  # k > N = 1
        (1, 6, 2, 7, 8, 64),  # k > N, GQA 3
        (2, 9, 3, 83, 5, 64),  # odd N, odd k, GQA 3 (the bundled model's head layout)
        (1, 3, 3, 769, 16, 64),  # several tiles and splits, GQA 1
        (3, 6, 2, 300, 1, 128),  # k = 1, head dim 128
        (1, 2, 1, 129, 33, 128),  # k just past a power of two
    ],
)
def test_memory_topk_matches_reference(b, hq, hkv, n, k, d, dtype):
    q, mem_k = _inputs(b, hq, hkv, n, d, dtype)
    scores, idx = memory_topk(q, mem_k, k)
    _check(q, mem_k, k, scores, idx)


@pytest.mark.parametrize("num_splits, block_n", [(1, 16), (3, 32), (7, 16)])
def test_memory_topk_independent_of_splits(num_splits, block_n):
    q, mem_k = _inputs(2, 6, 2, 401, 64, torch.float32, seed=1)
    scores, idx = memory_topk(q, mem_k, 12, num_splits=num_splits, block_n=block_n)
    _check(q, mem_k, 12, scores, idx)


def test_memory_topk_valid_n_ignores_rows_past_it():
    q, mem_k = _inputs(1, 3, 3, 200, 64, torch.float32, seed=2)
    mem_k[:, 150:] = 100.0  # garbage past valid_n that would win every score
    scores, idx = memory_topk(q, mem_k, 8, valid_n=150)
    assert (idx < 150).all()
    _check(q, mem_k, 8, scores, idx, valid_n=150)


@pytest.mark.parametrize("dtype", DTYPES)
def test_memory_topk_shared_per_kv_head(dtype):
    q, mem_k = _inputs(2, 9, 3, 83, 64, dtype, seed=3)
    scores, idx = memory_topk(q, mem_k, 6, shared_per_kv_head=True)
    assert idx.shape == (2, 3, 6)
    _check(q, mem_k, 6, scores, idx, shared=True)


def test_memory_topk_worst_case_and_ties():
    """Scores rising along N (every tile displaces the whole top-k) and exact duplicates (ties)."""
    d = 64
    q = torch.ones(1, 2, d)
    ramp = torch.linspace(-1, 1, 300).view(1, 300, 1).expand(2, 300, d).contiguous()  # (2, 300, D)
    scores, idx = memory_topk(q, ramp, 10, num_splits=2, block_n=16)
    assert torch.equal(idx[0, 0], torch.arange(299, 289, -1))
    dup = torch.zeros(1, 50, d)  # every score 0: any 10 distinct indices are a correct answer
    scores, idx = memory_topk(q[:, :1], dup, 10)
    assert (scores == 0).all() and idx.unique().numel() == 10


def test_dispatcher_runs_the_kernel_or_the_reference(monkeypatch):
    q, mem_k = _inputs(1, 3, 3, 50, 64, torch.float32, seed=4)
    s_ref, i_ref = dispatched_memory_topk(q, mem_k, 4)  # auto on CPU: the reference
    s_tri, i_tri = dispatched_memory_topk(q, mem_k, 4, backend="triton")  # the interpreter
    assert torch.equal(i_ref, i_tri) and torch.allclose(s_ref, s_tri, atol=1e-4)
    monkeypatch.setenv("MEMLM_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="cuda-please"):
        dispatched_memory_topk(q, mem_k, 4)
