"""Planted facts for landmark training (`memlm.modes.landmark.facts`): the fact lands inside the
memory blocks, the question and its answer open the local tokens, nothing else changes, and the
draws are reproducible (the same held-out windows planted the same way at every evaluation)."""
from __future__ import annotations

import numpy as np
import torch

from memlm.modes.landmark.facts import FactPlanter, planted_batches


def test_a_fact_lands_in_the_memory_and_its_question_opens_the_local_tokens(bundled_model_dir):
    from memlm.models.loading import load_tokenizer

    tok = load_tokenizer(bundled_model_dir)
    seq, local = 512, 64
    tokens = torch.randint(1000, 2000, (6, seq + 1))
    planter = FactPlanter(tok, local, min_position=4)
    planted = planter.plant(tokens, 1.0, np.random.default_rng(0))
    memory = seq - local
    for b in range(6):
        changed = (planted[b] != tokens[b]).nonzero().flatten()
        text_memory = tok.decode(planted[b, 4:memory].tolist())
        text_local = tok.decode(planted[b, memory:].tolist())
        assert "pass key" in text_memory and "What is the pass key of" in text_local
        key = text_local.split("The pass key of")[1].split(" is ")[1][:5]  # the answer, after the question
        assert key.isdigit() and key in text_memory  # answered by what the memory states
        assert changed.min() >= 4  # the first rows (left out as attention sinks) are never written
        assert bool((planted[b, seq - 8 :] == tokens[b, seq - 8 :]).all())  # the rest of the local text stays
    assert torch.equal(planter.plant(tokens, 0.0, np.random.default_rng(0)), tokens)
    again = planter.plant(tokens, 1.0, np.random.default_rng(0))
    assert torch.equal(again, planted)


def test_held_out_windows_are_planted_the_same_way_at_every_evaluation_and_train_windows_afresh():
    extra = planted_batches(planter=object(), fractions={"train": 0.5, "heldout_facts": 1.0}, seed=3)
    idx = np.array([4, 9])
    assert extra("heldout", idx) == {}  # the plain held-out evaluation is left as it is
    draws = lambda split: extra(split, idx)["plant"][2].random(4)  # noqa: E731
    assert np.array_equal(draws("heldout_facts"), draws("heldout_facts"))
    assert not np.array_equal(draws("train"), draws("train"))
