"""The trainer on a tiny random Llama (2 layers, dim 64): exact resume, determinism, gradient
accumulation, the hidden-state cache, and the manifest's base-model check. Each test ~1 s."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from memlm.model.llama import Llama, LlamaConfig
from memlm.train.adapter import BottleneckAdapter, BottleneckConfig
from memlm.train.corpus import TokenSplit
from memlm.train.data import WindowOrder
from memlm.train.trainer import TrainConfig, Trainer, lr_factor
from memlm.train.weights import BaseModelMismatch, load_adapter, model_fingerprint, read_manifest

TINY = LlamaConfig(vocab_size=96, dim=64, intermediate_size=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   max_position_embeddings=64)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Llama:
    torch.manual_seed(seed)
    return Llama(TINY).to(dtype).eval()


def tiny_split(n_tokens: int, seed: int) -> TokenSplit:
    """A learnable stream: runs of counting sequences with random starts and strides."""
    rng = np.random.default_rng(seed)
    out, starts = [], [0]
    while sum(map(len, out)) < n_tokens:
        start, stride, length = rng.integers(1, TINY.vocab_size), rng.integers(1, 4), rng.integers(20, 60)
        out.append((start + stride * np.arange(length)) % (TINY.vocab_size - 1) + 1)
        out.append(np.zeros(1, np.int64))
        starts.append(starts[-1] + length + 1)
    return TokenSplit(np.concatenate(out).astype(np.uint16), np.array(starts))


TRAIN, HELDOUT = tiny_split(6000, 0), tiny_split(800, 1)


@pytest.fixture(autouse=True)
def one_thread():
    """Ops this small gain nothing from a second thread, and on a loaded 2-core machine each
    parallel region waits for a descheduled thread (a tiny step took 6 s with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_trainer(tmp_path, model=None, **kw) -> Trainer:
    model = model if model is not None else tiny_model()
    adapter = BottleneckAdapter(TINY, BottleneckConfig(layers=(1,), bottleneck=8), seed=0)
    base = model_fingerprint(model)
    config = TrainConfig(**{"steps": 6, "batch": 4, "seq": 16, "lr": 1e-2, "warmup_steps": 2, "eval_every": 2,
                            "eval_windows": 4, "checkpoint_every": 2, **kw})
    return Trainer(model, adapter, TRAIN, HELDOUT, config, tmp_path, "tiny", base, progress=False)


def adapter_tensors(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in trainer.adapter.state_dict().items()}


def losses(trainer: Trainer) -> list[float]:
    return [h["loss"] for h in trainer.history if "loss" in h]


def test_schedule_warms_up_then_decays_to_the_floor():
    c = TrainConfig(steps=10, warmup_steps=2, min_lr_ratio=0.1)
    f = [lr_factor(s, c) for s in range(10)]
    assert f[:3] == [0.5, 1.0, 1.0] and f[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[1:], f[2:]))


def test_exact_resume_is_bit_identical(tmp_path):
    straight = make_trainer(tmp_path / "straight")
    straight.fit()
    first = make_trainer(tmp_path / "stopped")
    first.fit(stop_after=3)  # stops after step 3 (a checkpoint was written at the stop)
    resumed = make_trainer(tmp_path / "stopped", model=tiny_model())  # a fresh process's objects
    assert resumed.resume() and resumed.step == 3
    resumed.fit()
    assert losses(resumed) == losses(straight)  # bit-identical floats, not approx
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "stopped" / "adapter.safetensors").read_bytes() == (tmp_path / "straight" / "adapter.safetensors").read_bytes()


def test_same_seed_same_run_other_seed_other_run(tmp_path):
    a, b, c = make_trainer(tmp_path / "a"), make_trainer(tmp_path / "b"), make_trainer(tmp_path / "c", seed=1)
    for t in (a, b, c):
        t.fit()
    assert losses(a) == losses(b) and losses(a) != losses(c)


def test_resume_refuses_other_settings(tmp_path):
    make_trainer(tmp_path, steps=2).fit()
    other = make_trainer(tmp_path, steps=2, lr=5e-3)
    with pytest.raises(ValueError, match=r"lr=0.01 \(now 0.005\)"):
        other.resume()


def test_repeated_windows_come_that_often_per_epoch_and_resume_only_in_that_order(tmp_path):
    plain = WindowOrder(40, seed=0, limit=10)
    repeats = np.where(np.arange(10) % 3 == 0, 4, 1)  # windows 0, 3, 6, 9 of the pool four times
    order = plain.repeated(repeats)
    for e in range(2):
        counts = dict(zip(*np.unique(order.epoch(e), return_counts=True)))
        assert counts == {int(w): int(r) for w, r in zip(plain.pool, repeats)}
    assert list(order.take(0, len(order.sequence))) == list(order.epoch(0)) and order.key() != plain.key()
    with pytest.raises(ValueError, match="counts >= 1"):
        plain.repeated(np.zeros(10, np.int64))

    t = make_trainer(tmp_path, steps=2, train_windows=10)
    t.order = t.order.repeated(repeats)
    t.fit()
    again = make_trainer(tmp_path, steps=2, train_windows=10)  # the plain order: refused
    with pytest.raises(ValueError, match="order of training windows"):
        again.resume()
    again.order = again.order.repeated(repeats)
    assert again.resume() and again.step == 2


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """2 micro-batches of 2 == one batch of 4, up to fp32 rounding. The tolerance is measured, not
    guessed: both are compared with the batch-4 gradient in float64, and accumulation may be off by
    at most twice what plain fp32 batch 4 is off by (plus a floor for exact zeros)."""
    def grads(dtype, micro):
        t = make_trainer(tmp_path / f"{dtype}-{micro}", model=tiny_model(dtype=dtype), micro_batch=micro, grad_clip=0)
        t.adapter.to(dtype)
        t.train_step()
        t.train_step()  # the second step: `down` gets a gradient once `up` is non-zero
        t.optimizer.zero_grad()
        t.step -= 1
        t.position -= 4
        loss = 0.0
        for _ in range(t.config.accumulation):
            idx = t.order.take(t.position, t.config.micro)
            t.position += t.config.micro
            l = t.adapter.loss(t.model, t._batch("train", idx))
            (l / t.config.accumulation).backward()
        return {n: p.grad.double() for n, p in t.adapter.named_parameters()}

    ref, big, acc = grads(torch.float64, 4), grads(torch.float32, 4), grads(torch.float32, 2)
    for n in ref:
        err_big = (big[n] - ref[n]).abs().max()
        err_acc = (acc[n] - ref[n]).abs().max()
        assert err_acc <= 2 * err_big + 1e-7, (n, float(err_acc), float(err_big))
        assert ref[n].abs().max() > 0


def test_hidden_cache_gives_the_same_losses(tmp_path):
    plain = make_trainer(tmp_path / "plain")
    plain.fit()
    cached = make_trainer(tmp_path / "cached", cache_hidden=True, train_windows=8)
    cached.fit()
    again = make_trainer(tmp_path / "again", cache_hidden=True, train_windows=8)
    again.caches = cached.caches  # the same cache folders, now filled
    for c in again.caches.values():
        c.computed = 0
    again.fit()
    assert again.caches["train"].computed == 0  # every state came from disk
    assert losses(again) == losses(cached)
    # The cached path runs the same ops on the same inputs as the uncached one.
    uncached = make_trainer(tmp_path / "uncached", train_windows=8)
    uncached.fit()
    np.testing.assert_allclose(losses(cached), losses(uncached), rtol=1e-6)


def test_loss_goes_down_and_manifest_names_the_base(tmp_path):
    t = make_trainer(tmp_path, steps=40, eval_every=40, checkpoint_every=0, lr=3e-2)
    stats = t.fit()
    assert stats["eval_loss"] < stats["eval_loss_initial"] - 0.05
    m = read_manifest(tmp_path)
    assert m["base_model"]["fingerprint"] == model_fingerprint(tiny_model())
    assert m["training"]["steps"] == 40 and m["training"]["tokens_seen"] == 40 * 4 * 16
    assert m["file"]["bytes"] == (tmp_path / "adapter.safetensors").stat().st_size
    model = tiny_model()
    adapter = load_adapter(tmp_path, model, model_fingerprint(model))
    torch.testing.assert_close(adapter.state_dict(), t.adapter.state_dict(), rtol=0, atol=0)

    other = tiny_model(seed=1)
    with pytest.raises(BaseModelMismatch, match="trained on base model 'tiny'"):
        load_adapter(tmp_path, other, model_fingerprint(other))


def test_zero_init_adapter_leaves_logits_unchanged():
    model = tiny_model()
    tokens = torch.randint(0, TINY.vocab_size, (2, 12))
    pos = torch.arange(12)
    with torch.no_grad():
        before = model(tokens, pos)
        adapter = BottleneckAdapter(TINY, BottleneckConfig(layers=(0, 1), bottleneck=8))
        adapter.attach(model)
        after = model(tokens, pos)
        adapter.detach(model)
    assert torch.equal(before, after)
    assert all(len(layer.after_attention) == 0 for layer in model.layers)
