"""KVMemory: on-disk roundtrip, deletion by chunk id, compaction, crash leftovers, and capture of
pre-RoPE keys from a real model."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memlm.index.kv_memory import KVMemory


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
    mem = KVMemory.for_model(tmp_path / "kv", model, layers=[0, 5], window=64, overlap=16)
    chunks = [ids[i : i + 64] for i in range(0, 150, 64)]
    assert mem.build(model, chunks, [7, 8, 9]) == 150
    assert mem.chunk_ids().tolist() == [7] * 64 + [8] * 64 + [9] * 22
    assert mem.positions().tolist() == list(range(64)) + list(range(16, 64)) + list(range(16, 54))
    # Layer 0's keys depend only on the token (k_proj of the embedding's norm): compare to a direct pass.
    with torch.inference_mode():
        x = model.model.layers[0].input_layernorm(model.model.embed_tokens(torch.tensor([ids])))
        ref = model.model.layers[0].self_attn.k_proj(x)[0].view(150, 3, 64).transpose(0, 1)  # (Hkv, T, D)
    k0, _ = mem.layer(0)
    assert (k0.float() - ref).abs().max() < 2e-2 * ref.abs().max()  # fp16 storage rounding
    assert mem.layer(5)[0].shape == (3, 150, 64)
