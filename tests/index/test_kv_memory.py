"""KVMemory: on-disk roundtrip, deletion by chunk id, compaction, crash leftovers, and capture of
pre-RoPE keys from a real model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memlm.index.kv_memory import KVMemory
from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model


def _rows(layers, hkv, n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return ({l: torch.randn(hkv, n, d, generator=g) for l in layers}, {l: torch.randn(hkv, n, d, generator=g) for l in layers})


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_write_reload_roundtrip(tmp_path, dtype, torch_dtype):
    mem = KVMemory.create(tmp_path / "kv", layers=[3, 1], num_kv_heads=2, head_dim=8, dtype=dtype)
    k1, v1 = _rows([1, 3], 2, 5, 8, 0)
    k2, v2 = _rows([1, 3], 2, 4, 8, 1)
    assert mem.add(k1, v1, [10, 10, 10, 11, 11], [0, 1, 2, 3, 4]) == 5
    assert mem.add(k2, v2, [12] * 4, [0, 1, 2, 3]) == 4
    again = KVMemory.open(tmp_path / "kv")
    assert again.layers == [1, 3] and len(again) == 9
    k, v = again.layer(3)
    assert k.dtype == torch_dtype and k.shape == (2, 9, 8)
    assert torch.equal(k, torch.cat([k1[3], k2[3]], dim=1).to(torch_dtype))
    assert torch.equal(v, torch.cat([v1[3], v2[3]], dim=1).to(torch_dtype))
    assert again.chunk_ids().tolist() == [10, 10, 10, 11, 11, 12, 12, 12, 12]
    assert again.positions().tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    assert again.bytes_per_token == 2 * 2 * 2 * 8 * 2 + 12
    with pytest.raises(KeyError, match="layer 2"):
        again.layer(2)


def test_delete_then_compact(tmp_path):
    mem = KVMemory.create(tmp_path / "kv", layers=[0], num_kv_heads=1, head_dim=4)
    k, v = _rows([0], 1, 6, 4, 2)
    mem.add(k, v, [1, 1, 2, 2, 3, 3], range(6))
    assert mem.delete([2, 99]) == 2
    assert mem.delete([2]) == 0
    reopened = KVMemory.open(tmp_path / "kv")  # tombstones are durable
    assert reopened.chunk_ids().tolist() == [1, 1, 3, 3]
    keep = torch.tensor([0, 1, 4, 5])
    assert torch.equal(reopened.layer(0)[0], k[0][:, keep].half())
    reopened.compact()
    assert len(reopened.manifest.segments) == 1 and reopened.manifest.deleted_chunks == []
    assert len(list((tmp_path / "kv").glob("seg-*"))) == 1
    final = KVMemory.open(tmp_path / "kv")
    assert torch.equal(final.layer(0)[1], v[0][:, keep].half()) and final.positions().tolist() == [0, 1, 4, 5]
    final.delete([1, 3])
    final.compact()
    assert len(KVMemory.open(tmp_path / "kv")) == 0


def test_uncommitted_segment_is_removed_on_open(tmp_path):
    mem = KVMemory.create(tmp_path / "kv", layers=[0], num_kv_heads=1, head_dim=4)
    k, v = _rows([0], 1, 2, 4, 3)
    mem.add(k, v, [1, 1], [0, 1])
    (tmp_path / "kv" / "seg-000009").mkdir()  # a crash after the rename, before the manifest
    (tmp_path / "kv" / ".tmp-seg-000010").mkdir()  # a crash mid-write
    again = KVMemory.open(tmp_path / "kv")
    assert len(again) == 2 and sorted(p.name for p in (tmp_path / "kv").iterdir() if p.is_dir()) == ["seg-000001"]
    assert json.loads((tmp_path / "kv" / "manifest.json").read_text())["segments"] == ["seg-000001"]


def test_bad_shapes_are_named(tmp_path):
    mem = KVMemory.create(tmp_path / "kv", layers=[0], num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match=r"expected \(2, 3, 4\)"):
        mem.add({0: torch.zeros(2, 3, 5)}, {0: torch.zeros(2, 3, 4)}, [0, 0, 0], [0, 1, 2])
    with pytest.raises(FileExistsError):
        KVMemory.create(tmp_path / "kv", layers=[0], num_kv_heads=2, head_dim=4)


@pytest.mark.model
def test_build_captures_pre_rope_keys_in_overlapping_windows(tmp_path):
    from memlm.models.loading import bundled_model_dir, load_causal_lm

    model = load_causal_lm(bundled_model_dir())
    ids = list(range(1000, 1150))  # 150 tokens: windows of 64 overlapping by 16 -> starts 0, 48, 96
    mem = kv_memory_for_model(tmp_path / "kv", model, layers=[0, 5], window=64, overlap=16)
    chunks = [ids[i : i + 64] for i in range(0, 150, 64)]
    assert build_kv_memory(mem, model, chunks, [7, 8, 9]) == 150
    assert mem.chunk_ids().tolist() == [7] * 64 + [8] * 64 + [9] * 22
    assert mem.positions().tolist() == list(range(64)) + list(range(16, 64)) + list(range(16, 54))
    # Layer 0's keys depend only on the token (k_proj of the embedding's norm): compare to a direct pass.
    with torch.inference_mode():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([ids])))
        ref = model.model.layers[0].self_attn.k_proj(x)[0].view(150, 3, 64).transpose(0, 1)  # (Hkv, T, D)
    k0, _ = mem.layer(0)
    assert (k0.float() - ref).abs().max() < 2e-2 * ref.abs().max()  # fp16 storage rounding
    assert mem.layer(5)[0].shape == (3, 150, 64)


def test_segment_readers_include_tombstoned_rows_unless_masked(tmp_path):
    mem = KVMemory.create(tmp_path / "kv", layers=[0], num_kv_heads=2, head_dim=4)
    k1, v1 = _rows([0], 2, 3, 4, 4)
    k2, v2 = _rows([0], 2, 2, 4, 5)
    mem.add(k1, v1, [1, 1, 2], [0, 1, 2])
    mem.add(k2, v2, [3, 3], [5, 6])
    mem.delete([2])
    seg1, seg2 = mem.manifest.segments
    c, p = mem.segment_rows(seg1)
    assert c.tolist() == [1, 1, 2] and p.tolist() == [0, 1, 2] and mem.live_mask(c).tolist() == [True, True, False]
    k, v = mem.segment_layer(seg1, 0)
    assert torch.equal(k, k1[0].half()) and torch.equal(v, v1[0].half())
    k, _ = mem.segment_layer(seg1, 0, mem.live_mask(c))
    assert torch.equal(k, k1[0][:, :2].half())
    assert torch.equal(mem.layer(0)[0], torch.cat([k1[0][:, :2], k2[0]], dim=1).half())
    with pytest.raises(KeyError, match="seg-000009"):
        mem.segment_rows("seg-000009")


# --- product quantization ------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _faiss_one_thread(faiss_one_thread):
    """Every test here runs FAISS on one thread (see tests/conftest.py)."""


def _clustered_rows(n, hkv, d, seed):
    """Rows around 16 centres per head: structure PQ can capture (random noise it cannot)."""
    g = torch.Generator().manual_seed(seed)
    centres = 2 * torch.randn(hkv, 16, d, generator=g)
    pick = lambda: torch.gather(centres, 1, torch.randint(0, 16, (hkv, n, 1), generator=g).expand(hkv, n, d))
    return ({0: pick() + 0.2 * torch.randn(hkv, n, d, generator=g)}, {0: pick() + 0.2 * torch.randn(hkv, n, d, generator=g)})


def test_pq_below_training_minimum_writes_nothing(tmp_path):
    from memlm.index.kv_memory import PQ_MIN_TRAIN_ROWS

    mem = KVMemory.create(tmp_path / "kv", layers=[0], num_kv_heads=2, head_dim=16)
    k, v = _clustered_rows(PQ_MIN_TRAIN_ROWS - 1, 2, 16, 0)
    mem.add(k, v, np.zeros(PQ_MIN_TRAIN_ROWS - 1, dtype=np.int64), np.arange(PQ_MIN_TRAIN_ROWS - 1))
    assert mem.ensure_pq(4) is False and mem.pq_generation(4) is None
    assert not (tmp_path / "kv" / "pq-m04").exists()
    with pytest.raises(ValueError, match="m=5 must divide"):
        mem.ensure_pq(5)


def test_pq_codes_are_trained_once_encoded_per_segment_and_durable(tmp_path):
    from memlm.index.kv_memory import decode_pq

    n, hkv, d, m = 2600, 2, 16, 4
    mem = KVMemory.create(tmp_path / "kv", layers=[0], num_kv_heads=hkv, head_dim=d)
    k1, v1 = _clustered_rows(n, hkv, d, 1)
    mem.add(k1, v1, np.repeat([1, 2], n // 2), np.arange(n))
    assert mem.ensure_pq(m, train_rows=n) is True and mem.pq_generation(m) == 1
    books_k, books_v = mem.pq_codebooks(0, m)
    assert books_k.shape == books_v.shape == (hkv, m, 256, d // m)
    seg1 = mem.manifest.segments[0]
    ck, cv = mem.pq_segment_codes(seg1, 0, m)
    assert ck.shape == cv.shape == (hkv, n, m) and ck.dtype == np.uint8
    # Decoded codes are close to the fp16 rows: clustered data, 4 bytes for 16 dims.
    for h in range(hkv):
        for codes, books, x in ((ck, books_k, k1[0]), (cv, books_v, v1[0])):
            rec = torch.from_numpy(decode_pq(codes[h], books[h]))
            assert ((rec - x[h]).norm() / x[h].norm()).item() < 0.15

    # A new segment is encoded with the same codebooks; nothing is retrained.
    k2, v2 = _clustered_rows(50, hkv, d, 2)
    mem.add(k2, v2, np.full(50, 3), np.arange(50))
    (tmp_path / "kv" / "pq-m04" / "gen-000001" / ".tmp-seg-000099").mkdir()  # a crashed encode
    again = KVMemory.open(tmp_path / "kv")
    assert again.ensure_pq(m, train_rows=n) and again.pq_generation(m) == 1
    assert np.array_equal(again.pq_codebooks(0, m)[0], books_k)
    seg2 = again.manifest.segments[1]
    assert again.pq_segment_codes(seg2, 0, m)[0].shape == (hkv, 50, m)
    assert sorted(p.name for p in (tmp_path / "kv" / "pq-m04" / "gen-000001").iterdir() if p.is_dir()) == [seg1, seg2]
    again.delete([2])
    live = again.live_mask(again.segment_rows(seg1)[0])
    assert np.array_equal(again.pq_segment_codes(seg1, 0, m, live)[0], ck[:, live])

    # Compaction rewrites the segments: the next ensure encodes the new one, drops the old codes.
    again.compact()
    assert again.ensure_pq(m, train_rows=n) and again.pq_generation(m) == 1
    (seg,) = again.manifest.segments
    assert sorted(p.name for p in (tmp_path / "kv" / "pq-m04" / "gen-000001").iterdir()) == ["codebooks_L00.npy", seg]
    assert again.pq_segment_codes(seg, 0, m)[0].shape == (hkv, n // 2 + 50, m)
    with pytest.raises(KeyError, match="no PQ m=4 codes"):
        again.pq_segment_codes(seg1, 0, m)


def test_pq_retrains_once_the_memory_outgrows_its_sample(tmp_path):
    n, hkv, d, m = 2600, 1, 16, 4
    mem = KVMemory.create(tmp_path / "kv", layers=[0], num_kv_heads=hkv, head_dim=d)
    mem.add(*_clustered_rows(n, hkv, d, 3), np.zeros(n, dtype=np.int64), np.arange(n))
    assert mem.ensure_pq(m, train_rows=4 * n) and mem.pq_generation(m) == 1
    mem.add(*_clustered_rows(3 * n, hkv, d, 4), np.ones(3 * n, dtype=np.int64), np.arange(3 * n))
    assert mem.ensure_pq(m, train_rows=4 * n) and mem.pq_generation(m) == 2  # 4x the 2600 rows it saw
    assert [p.name for p in (tmp_path / "kv" / "pq-m04").iterdir() if p.is_dir()] == ["gen-000002"]
    assert all(mem.pq_segment_codes(s, 0, m)[0].shape[1] == n * (1 if i == 0 else 3)
               for i, s in enumerate(mem.manifest.segments))


@pytest.mark.model
def test_build_packs_short_documents_without_changing_their_keys(tmp_path):
    """Short documents share forward passes (positions restart per document); the stored rows are
    those of building each document alone (memlm's own Llama, as served: a block-diagonal mask)."""
    from memlm.models.loading import bundled_model_dir, load_model

    model = load_model(bundled_model_dir())
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(100, 40000, (n,), generator=g).tolist() for n in (50, 70, 30, 300)]
    chunk_ids = list(range(len(docs)))
    packed = kv_memory_for_model(tmp_path / "packed", model, layers=[1, 5])
    alone = kv_memory_for_model(tmp_path / "alone", model, layers=[1, 5])
    assert build_kv_memory(packed, model, docs, chunk_ids, documents=chunk_ids, pack_tokens=512) == 450
    assert build_kv_memory(alone, model, docs, chunk_ids, documents=chunk_ids, pack_tokens=1) == 450
    assert np.array_equal(packed.chunk_ids(), alone.chunk_ids())
    assert np.array_equal(packed.positions(), alone.positions())
    assert packed.positions()[:50].tolist() == list(range(50))  # each document starts at 0
    for layer in (1, 5):
        for a, b in zip(packed.layer(layer), alone.layer(layer)):
            # the same fp32 keys up to ~1e-6, stored as fp16: at most a one-ulp flip (rel. 2^-10)
            assert torch.allclose(a.float(), b.float(), rtol=2e-3, atol=1e-3)
