"""The proof adapter on the bundled SmolLM2-135M and a slice of the real corpus (stdlib
docstrings): zero-init identity, and the loss going down in a few seconds."""
from __future__ import annotations

import pytest
import torch

from memlm.model.llama import load_llama
from memlm.train.adapter import BottleneckAdapter, BottleneckConfig
from memlm.train.corpus import build_corpus
from memlm.train.trainer import TrainConfig, Trainer
from memlm.train.weights import folder_fingerprint

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def base(bundled_model_dir):
    torch.manual_seed(0)
    return load_llama(bundled_model_dir)


def test_zero_init_adapter_is_exactly_the_base_model(base):
    tokens = torch.randint(0, base.config.vocab_size, (2, 24))
    pos = torch.arange(24)
    with torch.no_grad():
        before = base(tokens, pos)
        adapter = BottleneckAdapter(base.config)  # layers 20, 23, 26, 29
        adapter.attach(base)
        after = base(tokens, pos)
        adapter.detach(base)
    assert torch.equal(before, after)


def test_loss_goes_down_on_real_text(base, bundled_model_dir, tmp_path):
    corpus = build_corpus(bundled_model_dir, sources=("stdlib",), max_docs=30, heldout_permille=100,
                          cache_dir=tmp_path, log=lambda m: None)
    assert corpus.train.n_docs > 10 and corpus.heldout.n_docs >= 1
    adapter = BottleneckAdapter(base.config, BottleneckConfig(layers=(29,), bottleneck=16))
    # 4 windows seen again and again, from cached states entering layer 29: a step runs one layer
    # and the output projection.
    config = TrainConfig(steps=10, batch=4, seq=48, lr=2e-2, warmup_steps=2, train_windows=4, cache_hidden=True,
                         eval_every=0, eval_windows=2, checkpoint_every=0)
    trainer = Trainer(base, adapter, corpus.train, corpus.heldout, config, tmp_path / "run", "bundled",
                      folder_fingerprint(bundled_model_dir, cache_dir=tmp_path), progress=False)
    try:
        trainer.fit()
    finally:
        adapter.detach(base)
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert losses[-1] < losses[0] - 0.1, losses
    assert (tmp_path / "run" / "adapter.safetensors").stat().st_size < 200_000
