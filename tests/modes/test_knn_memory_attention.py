"""Memory attention (knn mode): exactness of the one-softmax combination against plain attention,
the FAISS stores (fp16: exact; PQ: recall on clustered data), loading a KV memory into them
(sizes, incremental refresh), and one end-to-end pass-key check on the real bundled model, served
as memlm's own Llama (tests/memlm/test_owned_knn.py holds it to the transformers path)."""
from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import memlm.modes.knn.attention as ma
from memlm.modes.knn.attention import FaissKV, TensorKV, knn_attention, memory_attention, memory_topk


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


def test_topk_query_chunks_do_not_change_the_result(monkeypatch):
    q, _, _, mk, _ = _inputs(2, 9, 3, 7, 7, 8, 40, seed=5)
    whole = memory_topk(q, mk, 6)
    monkeypatch.setattr(ma, "_SCORE_BLOCK", 1)  # one query row per retrieval call
    chunked = memory_topk(q, mk, 6)
    assert torch.equal(whole[1], chunked[1])
    torch.testing.assert_close(whole[0], chunked[0], rtol=1e-6, atol=1e-6)  # matmul blocking: fp32 rounding


# --- FAISS stores -------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _faiss_one_thread(faiss_one_thread):
    """Every test here runs FAISS on one thread (see tests/conftest.py)."""


def _fp16_exact(hkv, n, d, seed):
    """Keys and values that fp16 represents exactly: the fp16 store must then match exact search."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(hkv, n, d, generator=g).half().float(), torch.randn(hkv, n, d, generator=g).half().float()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("hq,hkv,tq", [(9, 3, 1), (9, 3, 6), (4, 4, 3)])
def test_faiss_fp16_equals_exact_retrieval_and_attention(shared, hq, hkv, tq):
    d, n = 16, 300
    mk, mv = _fp16_exact(hkv, n, d, seed=hq + tq)
    q, k, v, _, _ = _inputs(1, hq, hkv, tq, tq + 4, d, 0, seed=6)
    store, exact = FaissKV.from_tensors(mk, mv, "fp16"), TensorKV(mk, mv)
    s_f, i_f = store.search(q, 5, shared_per_kv_head=shared)
    s_e, i_e = exact.search(q, 5, shared_per_kv_head=shared)
    assert i_f.shape == (1, hq, tq, 5) and torch.equal(i_f, i_e)  # random data: no ties
    # Scores: faiss sums fp16-decoded products in fp32 in its own order; fp32 rounding only.
    torch.testing.assert_close(s_f, s_e, rtol=1e-5, atol=1e-5)
    if shared:  # every head of a KV group got its group's one set
        g = hq // hkv
        assert all(torch.equal(i_f[:, h], i_f[:, (h // g) * g]) for h in range(hq))
    # The mini memory holds each KV head's distinct retrieved rows, with the indices remapped.
    mini_k, mini_v, local = store.gather(i_f)
    heads = (torch.arange(hq) // (hq // hkv)).view(1, hq, 1, 1).expand_as(i_f)
    assert mini_k.shape[1] <= n and torch.equal(mini_k[heads, local], mk[heads, i_f])
    assert torch.equal(mini_v[heads, local], mv[heads, i_f])
    out = store.attention(q, k, v, 5, shared_per_kv_head=shared)
    ref = memory_attention(q, k, v, mk, mv, 5, shared_per_kv_head=shared)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)  # same rows, same fp32 maths


def test_faiss_empty_memory_is_causal_attention():
    q, k, v, _, _ = _inputs(1, 9, 3, 4, 9, 16, 0, seed=7)
    store = FaissKV(3, 16, "fp16")
    s, i = store.search(q, 4)
    assert (i == -1).all() and torch.isneginf(s).all()
    mini_k, _, _ = store.gather(i)
    assert mini_k.shape == (3, 0, 16)
    ref = _sdpa(q.double(), k.double(), v.double())
    _close(store.attention(q, k, v, 4), ref, _sdpa(q, k, v))


def test_faiss_k_larger_than_memory_pads():
    mk, mv = _fp16_exact(3, 5, 16, seed=8)
    q, _, _, _, _ = _inputs(1, 9, 3, 2, 2, 16, 0, seed=8)
    s, i = FaissKV.from_tensors(mk, mv, "fp16").search(q, 8)
    assert (i[..., 5:] == -1).all() and torch.isneginf(s[..., 5:]).all()
    assert torch.equal(i[..., :5].sort(dim=-1).values, torch.arange(5).expand(1, 9, 2, 5))  # every row, once


@pytest.mark.parametrize("codec", ["fp16", "pq"])
def test_faiss_removed_rows_are_gone_and_the_rest_keep_their_order(codec):
    """remove_rows must leave exactly the store one would build from the remaining rows."""
    keys, values, q = _clustered(3, 2700, 16, 16, 4, seed=9)
    drop = np.arange(2700) % 3 == 0
    store = FaissKV.from_tensors(keys, values, codec, pq_m=4)
    books = _codebooks(store) if codec == "pq" else None
    store.remove_rows(drop)
    assert store.num_rows == 1800
    fresh = FaissKV(3, 16, codec, 4, codebooks=books)
    fresh.add(keys[:, ~torch.from_numpy(drop)].float(), values[:, ~torch.from_numpy(drop)].float())
    s, i = store.search(q, 20)
    s_f, i_f = fresh.search(q, 20)
    assert torch.equal(i, i_f) and torch.equal(s, s_f)
    mk, mv, local = store.gather(i)
    mk_f, mv_f, _ = fresh.gather(i_f)
    assert torch.equal(mk, mk_f) and torch.equal(mv, mv_f)


def _codebooks(store: FaissKV) -> tuple[np.ndarray, np.ndarray]:
    """A PQ store's (key, value) centroids, (Hkv, M, 256, D/M) each."""
    import faiss

    as_array = lambda pq: faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
    return (np.stack([as_array(ix.pq) for ix in store.key_index]), np.stack([as_array(pq) for pq in store.value_pq]))


def _clustered(hkv, n, d, clusters, queries, seed):
    """Keys around `clusters` centres per head, queries near centres (faiss' SyntheticDataset idea)."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(hkv, clusters, d, generator=g)
    which = torch.randint(0, clusters, (hkv, n), generator=g)
    keys = torch.gather(centres, 1, which.unsqueeze(-1).expand(hkv, n, d)) + 0.5 * torch.randn(hkv, n, d, generator=g)
    values = torch.randn(hkv, n, d, generator=g)
    q = centres[:, torch.randint(0, clusters, (queries,), generator=g)] + 0.5 * torch.randn(hkv, queries, d, generator=g)
    return keys, values, q.reshape(1, hkv, queries, d).repeat_interleave(3, dim=1)  # (1, 3*Hkv, Q, D)


def test_pq_recall_on_clustered_data():
    """PQ ranks by ADC scores, so near-ties inside a cluster get reordered: judge recall@10 of the
    exact top-10 (measured 0.76 at M = 16, 0.57 at M = 8 with this seed) and whether the exact
    best row is among the 10 returned (1.0 at M = 16). Random guessing would give 10/3000."""
    keys, values, q = _clustered(2, 3000, 32, 32, 64, seed=0)
    _, want = TensorKV(keys.half().float(), values).search(q, 10)  # (1, 6, 64, 10)
    recall = {}
    for m in (8, 16):
        store = FaissKV.from_tensors(keys, values, "pq", pq_m=m)
        assert store.codec == "pq"
        s, got = store.search(q, 10)
        assert got.shape == (1, 6, 64, 10) and (got >= 0).all() and (s[..., :-1] >= s[..., 1:]).all()
        recall[m] = (got.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).float().mean().item()
        if m == 16:
            assert (got == want[..., :1]).any(-1).float().mean().item() >= 0.9
    assert recall[16] >= 0.6 and recall[8] >= 0.35 and recall[16] > recall[8]


def test_pq_sizes_shapes_and_decoding():
    keys, values, q = _clustered(2, 3000, 32, 16, 4, seed=1)
    store = FaissKV.from_tensors(keys, values, "pq", pq_m=8)
    assert store.num_rows == 3000 and store.bytes_per_row == 2 * (8 + 8)  # Hkv x (key code + value code)
    codebooks = 2 * 2 * 256 * 32 * 4  # (keys, values) x Hkv x 256 centroids x D fp32
    assert store.nbytes == 3000 * 32 + codebooks
    assert FaissKV.from_tensors(keys, values, "fp16").bytes_per_row == 2 * 2 * 32 * 2
    _, idx = store.search(q, 5)
    mini_k, mini_v, local = store.gather(idx)
    assert mini_k.shape == mini_v.shape and mini_k.shape[0] == 2 and mini_k.shape[2] == 32
    assert mini_k.shape[1] == max(idx[:, 3 * h : 3 * h + 3].unique().numel() for h in range(2))
    assert local.shape == idx.shape and (local >= 0).all() and (local < mini_k.shape[1]).all()
    # Decoded rows are PQ reconstructions: close to the originals, not equal.
    heads = (torch.arange(6) // 3).view(1, 6, 1, 1).expand_as(idx)
    err = (mini_v[heads, local] - values[heads, idx]).norm() / values[heads, idx].norm()
    assert 0 < err < 0.8  # random values carry no structure: an 8-byte code keeps part of them


def test_pq_falls_back_to_fp16_below_the_training_minimum(caplog):
    keys, values = _fp16_exact(2, ma.PQ_MIN_TRAIN_ROWS - 1, 16, seed=10)
    with caplog.at_level(logging.INFO, logger="memlm.modes.knn.attention"):
        store = FaissKV.from_tensors(keys, values, "pq", pq_m=4, name="layer 3")
    assert store.codec == "fp16" and store.bytes_per_row == 2 * 2 * 16 * 2
    assert any("layer 3" in r.message and "using fp16" in r.message for r in caplog.records)
    with pytest.raises(ValueError, match="pq_m=5 must divide"):
        FaissKV(2, 16, "pq", pq_m=5)
    with pytest.raises(ValueError, match="codec 'int4'"):
        FaissKV(2, 16, "int4")


# --- loading a KV memory --------------------------------------------------------------------------


def _cpu_model(num_layers):
    """What prepare_layer_memories reads of a model with positions="fixed": its config and device."""
    return SimpleNamespace(config=SimpleNamespace(num_hidden_layers=num_layers), parameters=lambda: iter([torch.zeros(1)]))


def test_prepare_layer_memories_sizes_and_incremental_refresh(tmp_path):
    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import ReadConfig, LayerMemories, prepare_layer_memories

    hkv, d = 3, 16
    mem = KVMemory.create(tmp_path / "kv", layers=[0, 1], num_kv_heads=hkv, head_dim=d)
    g = torch.Generator().manual_seed(11)
    rows = lambda n: ({l: torch.randn(hkv, n, d, generator=g) for l in (0, 1)}, {l: torch.randn(hkv, n, d, generator=g) for l in (0, 1)})
    mem.add(*rows(40), np.repeat([1, 2], 20), np.arange(40))
    model, config = _cpu_model(2), ReadConfig.from_name("fixed", top_k=4)
    mems = prepare_layer_memories(model, mem, config)
    assert isinstance(mems, LayerMemories) and sorted(mems) == [0, 1] and mems.num_rows == 40
    assert mems.bytes_per_token == 2 * hkv * d * 2 * 2  # 2 layers x Hkv x (K + V) x D x fp16
    assert mems.nbytes == 40 * mems.bytes_per_token

    mem.add(*rows(30), np.repeat([3], 30), np.arange(30))
    mem.delete([1])
    again = prepare_layer_memories(model, mem, config, previous=mems)
    assert again is mems and again.num_rows == 50 and again[0].num_rows == 50
    assert again.row_chunks.tolist() == [2] * 20 + [3] * 30
    fresh = prepare_layer_memories(model, mem, config)
    assert fresh.num_rows == 50 and fresh[0].num_rows == 50
    q = torch.randn(1, 9, 5, d, generator=g)
    for l in (0, 1):  # the same rows in the same order: the same answers
        assert all(torch.equal(a, b) for a, b in zip(again[l].store.search(q, 60), fresh[l].store.search(q, 60)))
    mem.compact()  # segments rewritten: a refresh must rebuild
    rebuilt = prepare_layer_memories(model, mem, config, previous=again)
    assert rebuilt is not again and rebuilt[0].num_rows == 50


def test_prepare_layer_memories_pq_reads_stored_codes_and_falls_back_when_small(tmp_path, caplog):
    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import ReadConfig, prepare_layer_memories

    hkv, d, m, n = 3, 16, 4, 2600
    keys, values, q = _clustered(hkv, n, d, 16, 5, seed=12)
    mem = KVMemory.create(tmp_path / "kv", layers=[0, 1], num_kv_heads=hkv, head_dim=d)
    mem.add({0: keys, 1: keys.flip(0)}, {0: values, 1: values.flip(0)}, np.repeat([1, 2], [20, n - 20]), np.arange(n))
    model, config = _cpu_model(2), ReadConfig.from_name("fixed", top_k=5, codec="pq", pq_m=m, pq_train_rows=n)
    mems = prepare_layer_memories(model, mem, config)
    assert mem.pq_generation(m) == 1 and all(x.store.codec == "pq" for x in mems.values())
    assert mems.bytes_per_token == 2 * hkv * 2 * m  # 2 layers x Hkv x (key + value) x M bytes
    # The store reads the stored codes: the same as encoding the fp16 rows with the stored codebooks.
    direct = FaissKV(hkv, d, "pq", m, codebooks=mem.pq_codebooks(0, m))
    direct.add(*(x.float() for x in mem.layer(0)))
    assert torch.equal(mems[0].store.search(q, 5)[1], direct.search(q, 5)[1])

    mem.add({0: keys[:, :30], 1: keys[:, :30]}, {0: values[:, :30], 1: values[:, :30]}, np.full(30, 3), np.arange(30))
    mem.delete([1])
    again = prepare_layer_memories(model, mem, config, previous=mems)
    assert again is mems and again.num_rows == again[0].num_rows == n - 20 + 30 and mem.pq_generation(m) == 1
    fresh = prepare_layer_memories(model, mem, config)
    assert torch.equal(again[0].store.search(q, 20)[1], fresh[0].store.search(q, 20)[1])

    small = KVMemory.create(tmp_path / "small", layers=[0, 1], num_kv_heads=hkv, head_dim=d)
    small.add({0: keys[:, :100], 1: keys[:, :100]}, {0: values[:, :100], 1: values[:, :100]}, np.zeros(100, dtype=np.int64), np.arange(100))
    with caplog.at_level(logging.INFO, logger="memlm.modes.knn.reading"):
        fallback = prepare_layer_memories(model, small, config)
    assert all(x.store.codec == "fp16" for x in fallback.values()) and small.pq_generation(m) is None
    assert any("needed to train PQ" in r.message for r in caplog.records)


def test_prepare_layer_memories_for_chunks_reads_only_their_live_rows(tmp_path):
    """Chunk-gated knn: the rows of the given chunks (live, at or after min_memory_position), read
    from the segment files into exact stores, in memory order."""
    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import ReadConfig, prepare_layer_memories
    from memlm.modes.knn.attention import TensorKV

    hkv, d = 3, 16
    mem = KVMemory.create(tmp_path / "kv", layers=[0, 1, 2], num_kv_heads=hkv, head_dim=d)
    g = torch.Generator().manual_seed(13)
    keys = {l: torch.randn(hkv, 60, d, generator=g).half() for l in (0, 1, 2)}
    values = {l: torch.randn(hkv, 60, d, generator=g).half() for l in (0, 1, 2)}
    chunks, positions = np.repeat([1, 2, 3], 20), np.tile(np.arange(20), 3)
    mem.add({l: keys[l][:, :40] for l in keys}, {l: values[l][:, :40] for l in values}, chunks[:40], positions[:40])
    mem.add({l: keys[l][:, 40:] for l in keys}, {l: values[l][:, 40:] for l in values}, chunks[40:], positions[40:])
    mem.delete([2])
    config = ReadConfig.from_name("fixed", layers=(1, 2), min_memory_position=5)
    mems = prepare_layer_memories(_cpu_model(3), mem, config, chunks=[3, 2, 1, 99])  # 2: deleted, 99: unknown
    want = np.flatnonzero(np.isin(chunks, [1, 3]) & (positions >= 5))
    assert sorted(mems) == [1, 2] and mems.row_chunks.tolist() == chunks[want].tolist()
    for l in (1, 2):
        assert isinstance(mems[l].store, TensorKV) and mems[l].top_k == 8
        assert torch.equal(mems[l].store.keys, keys[l][:, want].float())
        assert torch.equal(mems[l].store.values, values[l][:, want].float())
    none = prepare_layer_memories(_cpu_model(3), mem, config, chunks=[99])
    assert none.num_rows == 0 and none[1].store.keys.shape == (hkv, 0, d)


@pytest.mark.model
def test_ranked_positions_lay_the_chunks_out_before_the_prompt_best_last(lm, tmp_path):
    """positions="ranked": the candidate chunks' rows are placed in rank order, worst first, so the
    best-ranked chunk ends right before the prompt (at window - 1); keys are rotated there."""
    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import ReadConfig, local_offset, prepare_layer_memories, rotate_keys

    from memlm.models.loading import model_facts

    model, _ = lm
    hkv, d = model_facts(model).kv_heads, model_facts(model).head_dim
    mem = kv_memory_for_model(tmp_path / "kv", model, layers=[3], window=64, overlap=16)
    g = torch.Generator().manual_seed(14)
    keys, values = torch.randn(hkv, 30, d, generator=g).half(), torch.randn(hkv, 30, d, generator=g).half()
    mem.add({3: keys}, {3: values}, np.repeat([5, 6, 7], 10), np.tile(np.arange(10), 3))
    config = ReadConfig(layers=(3,), candidate_chunks=2, positions="ranked", min_memory_position=0)
    mems = prepare_layer_memories(model, mem, config, chunks=[7, 5])  # 7 ranked best
    assert mems.row_chunks.tolist() == [5] * 10 + [7] * 10  # memory order
    want_pos = torch.cat([torch.arange(44, 54), torch.arange(54, 64)])  # chunk 5 then chunk 7, ending at 63
    rows = torch.cat([torch.arange(0, 10), torch.arange(20, 30)])
    want = rotate_keys(model, keys[:, rows], want_pos)
    assert torch.allclose(mems[3].store.keys, want, atol=1e-6)
    assert torch.equal(mems[3].store.values, values[:, rows].float())
    assert local_offset(mem, config, mems.num_rows) == 64  # the prompt starts right after
    assert local_offset(mem, config, 100) == 100  # more rows than a window push the prompt further
    # Adjacent chunks (6 follows 5 in the text) stay one run in text order, whatever their ranks:
    # a needle cut by the chunk boundary stays whole.
    run = prepare_layer_memories(model, mem, config, chunks=[6, 5])
    assert torch.allclose(run[3].store.keys, rotate_keys(model, keys[:, :20], torch.arange(44, 64)), atol=1e-6)
    with pytest.raises(ValueError, match="ranked.*candidate_chunks"):
        ReadConfig(positions="ranked")
    with pytest.raises(ValueError, match="needs `chunks`"):
        prepare_layer_memories(model, mem, config)


def test_with_following_adds_each_chunks_successors_after_it_once():
    from memlm.modes.knn.reading import ReadConfig, with_following

    doc = {1: [1, 2, 3], 2: [1, 2, 3], 3: [1, 2, 3], 7: [7, 8]}  # chunk -> its document's chunks

    def following(c, n):
        chunks = doc[c]
        return chunks[chunks.index(c) + 1 : chunks.index(c) + 1 + n]

    assert with_following([2, 7, 1], following, 1) == [2, 3, 7, 8, 1]
    assert with_following([2, 7, 1], following, 2) == [2, 3, 7, 8, 1]  # 2 has only one successor; 2 seen once
    assert with_following([3, 7], following, 0) == [3, 7]
    assert with_following([], following, 1) == []
    with pytest.raises(ValueError, match="follow_chunks extends"):
        ReadConfig(follow_chunks=1)
    with pytest.raises(ValueError, match="follow_chunks=-1"):
        ReadConfig(candidate_chunks=4, follow_chunks=-1)


def test_knn_config_rejects_bad_codec_settings():
    from memlm.modes.knn.reading import ReadConfig

    with pytest.raises(ValueError, match="codec='int4'"):
        ReadConfig(codec="int4")
    with pytest.raises(ValueError, match="pq_train_rows=100"):
        ReadConfig(codec="pq", pq_train_rows=100)


# --- end to end on the real model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def lm():
    from memlm.models.loading import bundled_model_dir, load_model, load_tokenizer

    d = bundled_model_dir()
    return load_model(d), load_tokenizer(d)  # memlm.model.Llama, as the host serves it


@pytest.mark.model
def test_knn_mode_restores_the_model_and_empty_memory_is_a_no_op(lm, tmp_path):
    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import ReadConfig, knn_mode

    from memlm.model import SDPABackend

    model, tok = lm
    ids = tok("The sky is blue and the grass is", return_tensors="pt").input_ids
    pos = torch.arange(ids.shape[1])
    mem = kv_memory_for_model(tmp_path / "kv", model)
    with torch.inference_mode():
        before = model(ids, pos)
        with knn_mode(model, mem, ReadConfig(layers="all", positions="original")) as mems:
            inside = model(ids, pos)
        after = model(ids, pos)
    assert len(mems) == model.config.n_layers and all(m.calls == 1 for m in mems.values())
    assert all(type(l.attention.backend) is SDPABackend for l in model.layers) and model.rope_offset == 0
    assert torch.equal(before, after)
    # "original" moves the local context to position `window`; RoPE is relative, so logits barely move.
    assert (inside - before).abs().max() < 1e-3


@pytest.mark.model
def test_pass_key_in_kv_memory_is_found_with_a_short_local_prompt(lm, tmp_path):
    """~1k tokens of filler with a key in the middle go into KV memory; the local prompt is only
    the question. The default knn config must generate the key greedily."""
    import threading

    from memlm.engine import SamplingParams
    from memlm.generation import generate_tokens
    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import ReadConfig, knn_mode

    model, tok = lm
    key = "48213"
    filler = " ".join(["The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."] * 25)
    text = f"{filler} The pass key is {key}. Remember it. {key} is the pass key. {filler}"
    hay = tok(text).input_ids
    assert 900 <= len(hay) <= 1300
    chunks = [hay[i : i + 64] for i in range(0, len(hay), 64)]
    mem = kv_memory_for_model(tmp_path / "kv", model)
    build_kv_memory(mem, model, chunks, list(range(len(chunks))))
    q = tok("What is the pass key? The pass key is", return_tensors="pt").input_ids
    with knn_mode(model, mem, ReadConfig.from_name("ungated")):
        *_, outcome = generate_tokens(model, tok, q, SamplingParams(max_new_tokens=6), threading.Event(), eos_ids=())
    out = list(outcome.token_ids)
    assert key in tok.decode(out).replace(" ", ""), tok.decode(out)


def test_learned_gate_mixes_local_and_memory_attention_per_head():
    """combine="gate" (Memorizing Transformer): g * attention over the retrieved rows alone +
    (1 - g) * causal local attention, g = sigmoid(gate) per query head."""
    from memlm.kernels import knn_attention
    from memlm.modes.knn.attention import TensorKV

    q, k, v, mk, mv = _inputs(1, 6, 3, 4, 9, 16, 50, seed=5)
    store = TensorKV(mk, mv)
    local = _sdpa(q.double(), k.double(), v.double()).float()
    _, idx = store.search(q, 5)
    memory_only = knn_attention(q, None, None, mk, mv, idx, memory_only=True)
    gate = torch.tensor([-30.0, 30.0, 0.0, 1.0, -2.0, 0.5])
    out = store.attention(q, k, v, 5, gate=gate)
    g = torch.sigmoid(gate).view(1, -1, 1, 1)
    expected = g * memory_only + (1 - g) * local
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.allclose(out[:, 0], local[:, 0], atol=1e-5)  # gate closed: local attention only
    assert torch.allclose(out[:, 1], memory_only[:, 1], atol=1e-5)  # gate open: memory only
    one_softmax = store.attention(q, k, v, 5)
    assert not torch.allclose(one_softmax, out, atol=1e-3)


@pytest.mark.model
def test_gate_combine_needs_a_model_trained_with_gates(lm, tmp_path):
    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import ReadConfig, knn_mode

    model, _ = lm
    mem = kv_memory_for_model(tmp_path / "kv", model)
    with pytest.raises(ValueError, match="memory_gate"):
        with knn_mode(model, mem, ReadConfig(combine="gate")):
            pass
    with pytest.raises(ValueError, match="combine"):
        ReadConfig(combine="average")
