"""Trained landmarks (memlm.modes.landmark.adapter): the grouped softmax's maths, the training
memory being what the KV memory stores, a landmark key depending on its own block alone, detaching
giving back the base model exactly, and a tiny run of `memlm train landmark`'s trainer lowering the
loss, on the bundled model."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memlm.model.llama import load_llama
from memlm.modes.landmark.adapter import LandmarkAdapter, LandmarkConfig, grouped_attention, window_memory


def _random(b=1, hq=6, hkv=2, t=3, s=5, nb=3, r=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=g, dtype=torch.float64)
    k, v = torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64), torch.randn(b, hkv, s, d, generator=g, dtype=torch.float64)
    lm = torch.randn(b, hkv, nb, d, generator=g, dtype=torch.float64)
    bk = torch.randn(b, hkv, nb, r, d, generator=g, dtype=torch.float64)
    bv = torch.randn(b, hkv, nb, r, d, generator=g, dtype=torch.float64)
    return q, k, v, lm, bk, bv


def test_without_valid_blocks_it_is_causal_attention():
    q, k, v, lm, bk, bv = _random()
    valid = torch.zeros(1, 3, 4, dtype=torch.bool)
    got = grouped_attention(q.float(), k.float(), v.float(), lm.float(), bk.float(), bv.float(), valid, 8 ** -0.5)
    want = F.scaled_dot_product_attention(q.float(), k.float().repeat_interleave(3, 1), v.float().repeat_interleave(3, 1),
                                          attn_mask=torch.ones(3, 5, dtype=torch.bool).tril(2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_landmark_worth_its_blocks_mass_gives_full_attention():
    """If exp(landmark logit) equals the sum of exp(row scores) of its block, the grouped softmax
    is exactly one softmax over the local keys and every block row (one query, one head)."""
    q, k, v, _, bk, bv = _random(hq=1, hkv=1, t=1)
    scale = 8 ** -0.5
    rows = torch.einsum("d,nrd->nr", q[0, 0, 0], bk[0, 0]) * scale  # (nB, R)
    lse = torch.logsumexp(rows, -1)  # (nB,)
    lm = (q[0, 0, 0] * (lse / (scale * q[0, 0, 0].dot(q[0, 0, 0])))[:, None]).view(1, 1, 3, 8)  # scale q . lm = lse
    errors = []
    got = grouped_attention(q, k, v, lm, bk, bv, torch.ones(1, 3, 4, dtype=torch.bool), scale, mass_error=errors)
    assert abs(float(errors[0])) < 1e-9  # the distillation loss is zero exactly there
    off = []
    grouped_attention(q, k, v, 2 * lm, bk, bv, torch.ones(1, 3, 4, dtype=torch.bool), scale, mass_error=off)
    assert float(off[0]) > 1e-3
    keys = torch.cat([k[0, 0], bk[0, 0].flatten(0, 1)])
    values = torch.cat([v[0, 0], bv[0, 0].flatten(0, 1)])
    want = torch.softmax(keys @ q[0, 0, 0] * scale, 0) @ values
    torch.testing.assert_close(got[0, 0, 0].double(), want, rtol=1e-5, atol=1e-6)


def test_the_ranking_loss_ranks_the_blocks_and_ignores_the_local_keys():
    """rank_error is zero exactly when the landmark logits equal the blocks' log-masses up to one
    shift (it compares the blocks with each other only: a logit offset common to every block, which
    the mass loss would punish, costs it nothing), and positive when they rank the blocks otherwise."""
    q, k, v, _, bk, bv = _random(hq=1, hkv=1, t=1)
    scale, valid = 8 ** -0.5, torch.ones(1, 3, 4, dtype=torch.bool)
    rows = torch.einsum("d,nrd->nr", q[0, 0, 0], bk[0, 0]) * scale
    lse = torch.logsumexp(rows, -1)
    unit = q[0, 0, 0] / (scale * q[0, 0, 0].dot(q[0, 0, 0]))  # scale q . (c * unit) = c
    for shift, ranked in ((0.0, True), (5.0, True), (0.0, False)):
        logits = (lse + shift) if ranked else lse.flip(0)
        lm = (unit * logits[:, None]).view(1, 1, 3, 8)
        mass, rank = [], []
        grouped_attention(q, k, v, lm, bk, bv, valid, scale, mass_error=mass, rank_error=rank)
        if ranked:
            assert abs(float(rank[0])) < 1e-6  # fp32 arithmetic inside
            assert (float(mass[0]) > 1e-3) == (shift != 0)
        else:
            assert float(rank[0]) > 1e-3


@pytest.mark.model
def test_the_trained_landmarks_can_only_choose_the_rows_read():
    """grouped_softmax=False: the landmarks choose each head's blocks, whose rows then enter the one
    softmax with the local keys; with every block chosen that is full attention over them all."""
    from memlm.modes.landmark.blocks import BlockKV

    q, k, v, lm, bk, bv = _random(hq=6, hkv=2, t=1, s=5, nb=3, r=4, seed=5)
    q, k, v, lm, bk, bv = (x.float() for x in (q, k, v, lm, bk, bv))
    store = BlockKV(bk[0].flatten(1, 2), bv[0].flatten(1, 2), torch.arange(12).view(3, 4), "trained",
                    landmarks=lm[0], gate_bias=torch.randn(6), grouped_softmax=False)
    got = store.attention(q, k, v, top_k=3, scale=8 ** -0.5)
    keys = torch.cat([k, bk.flatten(2, 3)], 2).repeat_interleave(3, 1)  # (1, 6, 5 + 12, 8)
    values = torch.cat([v, bv.flatten(2, 3)], 2).repeat_interleave(3, 1)
    want = torch.softmax(q @ keys.transpose(-1, -2) * 8 ** -0.5, -1) @ values
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    one = store.attention(q, k, v, top_k=1, scale=8 ** -0.5)
    chosen = (q @ lm[0].repeat_interleave(3, 0).transpose(-1, -2)).argmax(-1)  # (1, 6, 1): each head's best landmark
    for h in range(6):
        b = int(chosen[0, h, 0])
        kh = torch.cat([k[0, h // 3], bk[0, h // 3, b]]); vh = torch.cat([v[0, h // 3], bv[0, h // 3, b]])
        torch.testing.assert_close(one[0, h, 0], torch.softmax(kh @ q[0, h, 0] * 8 ** -0.5, 0) @ vh, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def base(bundled_model_dir):
    return load_llama(bundled_model_dir)



@pytest.mark.model
def test_the_training_memory_is_what_the_kv_memory_stores(base):
    """window_memory's block keys and values are the capture's (what ingest stores), rotated at
    their offset in the block as the landmark mode reads them."""
    from memlm.modes.knn.capture import _OwnedKVCapture
    from memlm.modes.knn.reading import rotate_keys

    tokens = torch.randint(0, base.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(1))
    mem = window_memory(base, tokens, 64, range(4))
    cap = _OwnedKVCapture(base, [0, 1, 2, 3])
    try:
        with torch.no_grad():
            stored = cap.run(tokens)
    finally:
        cap.remove()
    for layer in (0, 3):
        k, v = stored[layer]  # (Hkv, 128, D), keys before RoPE
        rotated = rotate_keys(base, k, torch.arange(128) % 64)  # in_block
        torch.testing.assert_close(mem.block_k[layer][0].flatten(1, 2), rotated, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mem.block_v[layer][0].flatten(1, 2), v, rtol=1e-5, atol=1e-5)


@pytest.mark.model
def test_a_landmark_key_depends_on_its_own_block_alone(base):
    adapter = LandmarkAdapter(base.config, LandmarkConfig(layers=(1, 2, 3)))
    torch.nn.init.normal_(adapter.lora_b, std=0.02)  # a trained-looking correction
    tokens = torch.randint(0, base.config.vocab_size, (1, 192), generator=torch.Generator().manual_seed(2))
    mem = window_memory(base, tokens, 64, (1, 2, 3))
    per_block = {l: k[0].transpose(0, 1) for l, k in mem.block_k.items()}  # (nB, Hkv, R, D)
    values = {l: v[0].transpose(0, 1) for l, v in mem.block_v.items()}
    with torch.no_grad():
        together = adapter.landmark_keys(base, per_block, values, mem.valid[0])
        alone = adapter.landmark_keys(base, {l: k[1:2] for l, k in per_block.items()},
                                      {l: v[1:2] for l, v in values.items()}, mem.valid[0, 1:2])
    assert together[3].shape == (3, base.config.n_kv_heads, base.config.head_dim)
    for layer in (1, 3):
        torch.testing.assert_close(together[layer][1:2], alone[layer], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(together[3][0], together[3][1])


@pytest.mark.model
def test_detached_it_is_exactly_the_base_model(base):
    tokens = torch.randint(0, base.config.vocab_size, (1, 40))
    pos = torch.arange(40)
    with torch.no_grad():
        before = base(tokens, pos)
        adapter = LandmarkAdapter(base.config)
        adapter.attach(base)
        attached_without_memory = base(tokens, pos)
        adapter.detach(base)
        after = base(tokens, pos)
    assert torch.equal(before, after)
    torch.testing.assert_close(attached_without_memory, before, rtol=0, atol=1e-5)  # SDPA fallback


@pytest.mark.model
def test_a_tiny_run_lowers_the_loss_and_saves_small_weights(base, bundled_model_dir, tmp_path):
    from memlm.train.corpus import build_corpus
    from memlm.train.trainer import TrainConfig, Trainer
    from memlm.train.weights import folder_fingerprint

    corpus = build_corpus(bundled_model_dir, sources=("stdlib",), max_docs=30, heldout_permille=100,
                          cache_dir=tmp_path, log=lambda m: None)
    adapter = LandmarkAdapter(base.config, LandmarkConfig(layers=(1, 2, 3, 4, 5), local=32))
    # 2 windows of 96 tokens (one memory block, 32 local tokens) seen again and again
    config = TrainConfig(steps=8, batch=2, seq=96, lr=2e-2, warmup_steps=1, train_windows=2, eval_every=0,
                         eval_windows=2, checkpoint_every=0)
    trainer = Trainer(base, adapter, corpus.train, corpus.heldout, config, tmp_path / "run", "bundled",
                      folder_fingerprint(bundled_model_dir, cache_dir=tmp_path), progress=False)
    try:
        trainer.fit()
    finally:
        adapter.detach(base)
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert losses[-1] < losses[0] - 0.05, losses
    size = (tmp_path / "run" / "adapter.safetensors").stat().st_size
    assert size < 200_000, size  # 5 layers x (rank-8 correction: 6,144 floats) + embedding + biases
    assert np.isfinite(losses).all() and not math.isnan(trainer.history[-1].get("eval_loss", 0.0))


def test_the_served_reading_over_every_block_is_the_trained_one():
    """kernels' grouped_read_ref (generation: chosen blocks gathered by row id) with every block
    chosen equals grouped_attention (training: every block, dense)."""
    from memlm.kernels.landmark_reference import grouped_read_ref

    q, k, v, lm, bk, bv = _random(hq=6, hkv=2, t=3, s=5, nb=3, r=4)
    scale, bias = 8 ** -0.5, torch.randn(6, dtype=torch.float64)
    valid = torch.ones(1, 3, 4, dtype=torch.bool)
    valid[0, 2, 3] = False  # a short block
    want = grouped_attention(q, k, v, lm, bk, bv, valid, scale, bias)
    mem_k, mem_v = bk[0].flatten(1, 2), bv[0].flatten(1, 2)  # (Hkv, nB*R, D)
    rows = torch.arange(12).view(3, 4).masked_fill(~valid[0], -1)
    blocks = torch.arange(3).expand(1, 6, 3, 3)
    logits = torch.einsum("bhtd,bhnd->bhtn", q, lm.repeat_interleave(3, 1)) * scale + bias.view(1, 6, 1, 1)
    got, reads, _ = grouped_read_ref(q, k, v, mem_k, mem_v, rows, blocks, logits, scale=scale)
    # grouped_attention computes in fp32 whatever its inputs: fp32's tolerance (1e-7 failed on one CPU)
    torch.testing.assert_close(got.float(), want)
    assert (reads.mass.sum(-1) < 1).all() and (reads.mass > 0).all()


@pytest.mark.model
def test_served_landmark_keys_are_the_trained_ones(base, tmp_path):
    """load_block_memories("trained") over a KV memory as ingest builds it computes the landmark
    keys the training path computes for the same text."""
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.landmark.blocks import load_block_memories

    adapter = LandmarkAdapter(base.config, LandmarkConfig(layers=(1, 2, 3)))
    torch.nn.init.normal_(adapter.lora_b, std=0.02)
    tokens = torch.randint(0, base.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(3))
    mem = kv_memory_for_model(tmp_path / "kv", base, layers=range(1, 4))
    build_kv_memory(mem, base, [tokens[0, :64].tolist(), tokens[0, 64:].tolist()], [10, 11], documents=[0, 0])
    read, block_ids, offset = load_block_memories(base, mem, layers="all", top_k=2, representation="trained",
                                                  positions="in_block", min_memory_position=0, landmarks=adapter)
    assert list(block_ids) == [10, 11] and offset == 64 and sorted(read) == [1, 2, 3]
    wm = window_memory(base, tokens, 64, (1, 2, 3))
    with torch.no_grad():
        trained = adapter.landmark_keys(base, {l: k[0].transpose(0, 1) for l, k in wm.block_k.items()},
                                        {l: v[0].transpose(0, 1) for l, v in wm.block_v.items()}, wm.valid[0])
    for layer in (1, 3):  # stored fp16, trained from fp32 states: fp16 rounding apart
        torch.testing.assert_close(read[layer].store.reps["rep_k"].float(), trained[layer].transpose(0, 1),
                                   rtol=2e-2, atol=2e-2)


def test_block_memory_reads_trained_landmarks_by_the_grouped_softmax():
    from memlm.modes.landmark.blocks import BlockKV

    q, k, v, lm, bk, bv = _random(hq=6, hkv=2, t=1, s=5, nb=3, r=4, seed=4)
    q, k, v, lm, bk, bv = (x.float() for x in (q, k, v, lm, bk, bv))
    bias = torch.randn(6)
    store = BlockKV(bk[0].flatten(1, 2), bv[0].flatten(1, 2), torch.arange(12).view(3, 4), "trained",
                    landmarks=lm[0], gate_bias=bias)
    got = store.attention(q, k, v, top_k=3, scale=8 ** -0.5)  # every block: the training reading
    want = grouped_attention(q, k, v, lm, bk, bv, torch.ones(1, 3, 4, dtype=torch.bool), 8 ** -0.5, bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert store.mass.sum() > 0 and int(store.reads.sum()) == 6 * 3
    one = store.attention(q, k, v, top_k=1, scale=8 ** -0.5)  # each head its best landmark only
    assert not torch.allclose(one, got)
    with pytest.raises(ValueError, match="landmark keys"):
        BlockKV(bk[0].flatten(1, 2), bv[0].flatten(1, 2), torch.arange(12).view(3, 4), "trained")


@pytest.mark.model
def test_unrotate_undoes_rope(base):
    from memlm.model.llama import apply_rope
    from memlm.modes.landmark.adapter import unrotate

    x = torch.randn(1, 3, 5, base.config.head_dim)
    pos = torch.tensor([0, 7, 64, 900, 5000])
    rope = (base.rope_cos[pos, None], base.rope_sin[pos, None])  # (T, 1, D)
    rotated = apply_rope(x.transpose(1, 2), rope).transpose(1, 2)  # (B, T, H, D) layout for apply_rope
    torch.testing.assert_close(unrotate(base, rotated, pos), x, rtol=1e-5, atol=1e-5)


@pytest.mark.model
def test_what_is_served_is_what_was_trained(base, tmp_path):
    """One window: the training path's logits (adapter.read over window_memory) and the service's
    (the memory built as ingest builds it, loaded as trained block memories, every block read,
    knn_mode's token loop) agree to the fp16 rounding of the stored rows."""
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import knn_mode
    from memlm.modes.landmark.blocks import load_block_memories

    adapter = LandmarkAdapter(base.config, LandmarkConfig(layers=(1, 2, 3, 4)))
    torch.nn.init.normal_(adapter.lora_b, std=0.02)
    torch.nn.init.normal_(adapter.gate_bias, std=1.0)
    tokens = torch.randint(0, base.config.vocab_size, (1, 192 + 24), generator=torch.Generator().manual_seed(5))
    memory_tokens, inputs = tokens[:, :192], tokens[:, 192:]
    adapter.attach(base)
    try:
        with torch.no_grad():
            trained = adapter.read(base, window_memory(base, memory_tokens, 64, adapter.config.layers), inputs)
    finally:
        adapter.detach(base)
    mem = kv_memory_for_model(tmp_path / "kv", base, layers=range(1, 5))
    build_kv_memory(mem, base, [memory_tokens[0, i : i + 64].tolist() for i in range(0, 192, 64)], [0, 1, 2],
                    documents=[0, 0, 0])
    read, _, _ = load_block_memories(base, mem, layers="all", top_k=3, representation="trained",
                                     positions="in_block", min_memory_position=0, landmarks=adapter)
    with torch.no_grad(), knn_mode(base, mem, read.config, layer_memories=read):
        served = base.output(base.forward_embeds(base.embed(inputs), torch.arange(inputs.shape[1])))
    torch.testing.assert_close(served, trained, rtol=0.05, atol=0.05)
    assert (served - trained).abs().mean() < 5e-3
