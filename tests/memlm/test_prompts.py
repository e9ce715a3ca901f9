"""Prompt building and the context-length rule (real tokenizer, no forward pass)."""
from __future__ import annotations

import pytest

from memlm.engine import ChatMessage
from memlm.errors import InvalidArgument
from memlm.index.types import SearchHit
from memlm.prompts import DEFAULT_RAG_FORMAT, RAG_FORMATS, build_prompt, prompt_budget, query_text

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from memlm.models import load_tokenizer

    return load_tokenizer(bundled_model_dir)


def hit(i: int, text: str) -> SearchHit:
    return SearchHit(chunk_id=i, doc_id=f"d{i}", score=1.0, text=text, metadata={}, chunk_index=0, start=0, end=len(text))


def test_budget():
    assert prompt_budget(256, 8) == 248
    with pytest.raises(InvalidArgument, match="max_new_tokens=256.*256"):
        prompt_budget(256, 256)


def test_plain_prompt_fits_unchanged(tokenizer):
    built = build_prompt(tokenizer, 100, prompt="Hello there")
    assert list(built.input_ids) == tokenizer("Hello there").input_ids
    assert built.truncated_prompt_tokens == 0 and built.citations == ()


def test_over_long_prompt_keeps_its_last_tokens(tokenizer):
    prompt = " ".join(f"w{i}" for i in range(100))
    ids = tokenizer(prompt).input_ids
    built = build_prompt(tokenizer, 50, prompt=prompt)
    assert list(built.input_ids) == ids[-50:]
    assert built.truncated_prompt_tokens == len(ids) - 50


@pytest.mark.parametrize("fmt", sorted(RAG_FORMATS))
def test_rag_adds_chunks_in_rank_order_while_they_fit(tokenizer, fmt):
    hits = [hit(i, f"Passage number {i}: " + "lorem ipsum " * 20) for i in range(6)]
    everything = build_prompt(tokenizer, 10_000, prompt="What?", hits=hits, rag=True, rag_format=fmt)
    assert everything.citations == tuple(hits)
    four = build_prompt(tokenizer, 10_000, prompt="What?", hits=hits[:4], rag=True, rag_format=fmt)
    budget = len(four.input_ids) + 5  # room for four chunks, not for a fifth (~50 tokens)
    built = build_prompt(tokenizer, budget, prompt="What?", hits=hits, rag=True, rag_format=fmt)
    assert built.citations == tuple(hits[:4])  # a rank-order prefix
    assert len(built.input_ids) <= budget and built.truncated_prompt_tokens == 0
    text = tokenizer.decode(built.input_ids)
    assert "Passage number 3" in text and "Passage number 4" not in text


def test_rag_with_no_room_for_chunks_cites_nothing_and_truncates(tokenizer):
    hits = [hit(0, "lorem ipsum " * 50)]
    built = build_prompt(tokenizer, 5, prompt="What is the meaning of all of this, really?", hits=hits, rag=True)
    assert built.citations == () and len(built.input_ids) == 5 and built.truncated_prompt_tokens > 0


def test_chat_rag_puts_passages_in_the_last_user_turn(tokenizer):
    messages = (ChatMessage("user", "Earlier question"), ChatMessage("assistant", "ok"), ChatMessage("user", "Pass key?"))
    built = build_prompt(tokenizer, 1000, messages=messages, hits=[hit(0, "The pass key is 123.")], rag=True)
    text = tokenizer.decode(built.input_ids)
    assert text.index("Earlier question") < text.index("ok") < text.index("The pass key is 123.") < text.index("Pass key?")
    assert text.endswith("<|im_start|>assistant\n")


def test_query_is_the_prompt_or_the_last_user_message():
    assert query_text("q", None) == "q"
    msgs = (ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c"))
    assert query_text(None, msgs) == "c"
    with pytest.raises(InvalidArgument, match="user"):
        query_text(None, (ChatMessage("system", "s"),))


def test_default_format_is_a_known_one():
    assert DEFAULT_RAG_FORMAT in RAG_FORMATS
