"""Memory attention (knn mode): exactness of the one-softmax combination against plain attention,
and one end-to-end pass-key check on the real bundled model."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from memlm.memory_attention import knn_attention, memory_attention, memory_topk


def _sdpa(q, k, v):
    """Plain causal attention, bottom-right aligned (queries are the last Tq of Tk), fp64."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    tq, tk = q.shape[2], k.shape[2]
    mask = torch.arange(tk).view(1, tk) <= torch.arange(tk - tq, tk).view(tq, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _inputs(b, hq, hkv, tq, tk, d, n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen)
    return r(b, hq, tq, d), r(b, hkv, tk, d), r(b, hkv, tk, d), r(hkv, n, d), r(hkv, n, d)


# Tolerance: the memory path computes in fp32; fp32 SDPA of the same inputs differs from the fp64
# reference by ~1e-6, so 2x that error plus 1e-5 absolute (flash-attention's rule) is the bar.
def _close(out, ref, same_dtype_out):
    bound = 2 * (same_dtype_out - ref).abs().max() + 1e-5
    assert (out.double() - ref).abs().max() <= bound, float((out.double() - ref).abs().max())


@pytest.mark.parametrize("hq,hkv", [(3, 3), (9, 3)])  # GQA ratio 1 and 3
@pytest.mark.parametrize("tq,tk", [(1, 1), (1, 83), (7, 7), (13, 40)])
def test_empty_memory_equals_causal_sdpa(hq, hkv, tq, tk):
    q, k, v, _, _ = _inputs(2, hq, hkv, tq, tk, 16, 0)
    empty = torch.zeros(hkv, 0, 16)
    out = memory_attention(q, k, v, empty, empty, top_k=4)
    ref = _sdpa(q.double(), k.double(), v.double())
    _close(out, ref, _sdpa(q, k, v))


@pytest.mark.parametrize("hq,hkv", [(4, 4), (9, 3)])
@pytest.mark.parametrize("shared", [False, True])
def test_memory_of_all_keys_equals_attention_over_concatenation(hq, hkv, shared):
    """Memory = N extra keys, k = N: every query sees all of them, so the output must equal one
    softmax over [memory ∪ causal local], i.e. SDPA over the concatenation with memory unmasked."""
    b, tq, tk, d, n = 1, 5, 11, 32, 29
    q, k, v, mk, mv = _inputs(b, hq, hkv, tq, tk, d, n, seed=1)
    out = memory_attention(q, k, v, mk, mv, top_k=n, shared_per_kv_head=shared)
    cat_k = torch.cat([mk.unsqueeze(0).expand(b, -1, -1, -1), k], dim=2)  # (B, Hkv, N + Tk, D)
    cat_v = torch.cat([mv.unsqueeze(0).expand(b, -1, -1, -1), v], dim=2)
    ref = _sdpa(q.double(), cat_k.double(), cat_v.double())  # memory sits before every query
    _close(out, ref, _sdpa(q, cat_k, cat_v))


def test_memory_of_local_keys_themselves():
    """The brief's case: memory = the local keys, k = N. Then each query sees its causal local keys
    once and ALL local keys once more (memory is not causal): check against that explicit softmax."""
    q, k, v, _, _ = _inputs(1, 9, 3, 6, 6, 16, 0, seed=2)
    out = memory_attention(q, k, v, k[0], v[0], top_k=6)
    g = 3
    kk, vv = k.repeat_interleave(g, 1).double(), v.repeat_interleave(g, 1).double()
    s = q.double() @ kk.transpose(2, 3) / math.sqrt(16)  # (1, 9, 6, 6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    p = torch.softmax(torch.cat([s.masked_fill(~causal, float("-inf")), s], dim=-1), dim=-1)
    ref = p[..., :6] @ vv + p[..., 6:] @ vv
    assert (out.double() - ref).abs().max() < 1e-5


def test_topk_matches_brute_force_and_pads():
    q, _, _, mk, _ = _inputs(1, 9, 3, 4, 4, 8, 50, seed=3)
    scores, idx = memory_topk(q, mk, 5)
    full = torch.einsum("bhtd,hnd->bhtn", q, mk.repeat_interleave(3, 0))  # (1, 9, 4, 50)
    assert torch.equal(idx, full.topk(5, dim=-1).indices)
    s, i = memory_topk(q, mk[:, :3], 5)  # k > N: padded with (-inf, -1)
    assert (i[..., 3:] == -1).all() and torch.isinf(s[..., 3:]).all() and (i[..., :3] >= 0).all()
    _, shared = memory_topk(q, mk, 5, shared_per_kv_head=True)
    assert torch.equal(shared[:, 0], shared[:, 2]) and torch.equal(shared[:, 3], shared[:, 5])


def test_minus_one_indices_are_ignored():
    q, k, v, mk, mv = _inputs(1, 3, 3, 2, 4, 8, 10, seed=4)
    idx = torch.full((1, 3, 2, 3), -1, dtype=torch.int64)
    assert torch.allclose(knn_attention(q, k, v, mk, mv, idx), memory_attention(q, k, v, mk[:, :0], mv[:, :0], 3), atol=1e-6)


# --- end to end on the real model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    from memlm.models.loading import bundled_model_dir, load_causal_lm, load_tokenizer

    d = bundled_model_dir()
    return load_causal_lm(d), load_tokenizer(d)


@pytest.mark.model
def test_knn_mode_restores_the_model_and_empty_memory_is_a_no_op(lm, tmp_path):
    from memlm.index.kv_memory import KVMemory
    from memlm.knn_memory import KNNConfig, knn_mode

    model, tok = lm
    ids = tok("The sky is blue and the grass is", return_tensors="pt").input_ids
    mem = KVMemory.for_model(tmp_path / "kv", model)
    with torch.inference_mode():
        before = model(ids).logits
        with knn_mode(model, mem, KNNConfig(positions="original")) as mems:
            inside = model(ids).logits
        after = model(ids).logits
    assert len(mems) == model.config.num_hidden_layers and all(m.calls == 1 for m in mems.values())
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(l.self_attn, "_memlm_knn") for l in model.model.layers)
    assert torch.equal(before, after)
    # "original" moves the local context to position `window`; RoPE is relative, so logits barely move.
    assert (inside - before).abs().max() < 1e-3


@pytest.mark.model
def test_pass_key_in_kv_memory_is_found_with_a_short_local_prompt(lm, tmp_path):
    """~1k tokens of filler with a key in the middle go into KV memory; the local prompt is only
    the question. The default knn config must generate the key greedily."""
    from memlm.generation import decode_one_token, new_cache, prefill
    from memlm.index.kv_memory import KVMemory
    from memlm.knn_memory import KNNConfig, knn_mode

    model, tok = lm
    key = "48213"
    filler = " ".join(["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 25)
    text = f"{filler} The pass key is {key}. Remember it. {key} is the pass key. {filler}"
    hay = tok(text).input_ids
    assert 900 <= len(hay) <= 1300
    chunks = [hay[i : i + 64] for i in range(0, len(hay), 64)]
    mem = KVMemory.for_model(tmp_path / "kv", model)
    mem.build(model, chunks, list(range(len(chunks))))
    q = tok("What is the pass key? The pass key is", return_tensors="pt").input_ids
    with torch.inference_mode(), knn_mode(model, mem, KNNConfig.from_name("default")):
        cache = new_cache(model)
        logits = prefill(model, q, cache)
        out = []
        for _ in range(6):
            t = logits.argmax(-1, keepdim=True)
            out.append(int(t))
            logits = decode_one_token(model, t, cache)
    assert key in tok.decode(out).replace(" ", ""), tok.decode(out)
