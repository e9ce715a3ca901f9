"""The token-loop pieces: sampling and streaming detokenization (real tokenizer, no forward pass)."""
from __future__ import annotations

import pytest
import torch

from memlm.generation import StreamingText, make_generator, sample

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from memlm.models import load_tokenizer

    return load_tokenizer(bundled_model_dir)


def stream(tokenizer, text: str, stop=()) -> tuple[list[str], StreamingText]:
    s = StreamingText(tokenizer, stop)
    deltas = []
    for token_id in tokenizer(text, add_special_tokens=False).input_ids:
        deltas.append(s.add(token_id))
        if s.stopped:
            break
    deltas.append(s.flush())
    return [d for d in deltas if d], s


def test_greedy_is_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9]])
    assert sample(logits, 0.0, 1.0, None).tolist() == [[1]]


def test_nucleus_keeps_only_the_top_mass():
    logits = torch.log(torch.tensor([[0.2, 0.5, 0.3]]))
    gen = make_generator(0)
    picks = {int(sample(logits, 1.0, 0.6, gen)) for _ in range(200)}
    assert picks == {1, 2}  # 0.5 alone is below 0.6; 0.5 + 0.3 reaches it; token 0 never drawn
    assert {int(sample(logits, 1.0, 1e-6, gen)) for _ in range(50)} == {1}


def test_seeded_generator_repeats():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(0))
    draw = lambda seed: [int(sample(logits, 1.0, 0.9, g)) for g in [make_generator(seed)] for _ in range(20)]
    assert draw(5) == draw(5) and draw(5) != draw(6)


def test_partial_utf8_is_held_back(tokenizer):
    text = "A dragon 🐉 and a café ☕ in Zürich."
    deltas, s = stream(tokenizer, text)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == s.text


def test_stop_sequence_is_cut_and_never_emitted(tokenizer):
    deltas, s = stream(tokenizer, "Hello world. STOP and more text", stop=("STOP",))
    assert s.stopped and s.text == "Hello world. "
    assert "".join(deltas) == s.text
    assert not any("S" in d for d in deltas)


def test_false_start_of_a_stop_sequence_is_released(tokenizer):
    text = "Hello world, goodbye world."
    deltas, s = stream(tokenizer, text, stop=("world peace",))
    assert not s.stopped and "".join(deltas) == text
    # " world" could have begun the stop sequence, so it came out together with what followed.
    assert not any(d.endswith(" world") for d in deltas)
