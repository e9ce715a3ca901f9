"""Chunker: token-exact chunks whose character spans tile the document."""
from __future__ import annotations

import pytest

from memlm.errors import InvalidArgument
from memlm.index.chunking import Chunker

TEXT = (
    "Memorizing Transformers extend a language model with a non-differentiable memory of recent "
    "(key, value) pairs. RETRO retrieves neighbours of each 64-token chunk from a large database "
    "and reads them through chunked cross-attention.\n\n  Indented line\twith a tab.   "
)


def reference_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("chunk_tokens", [1, 3, 7, 16, 64, 83, 1000])
def test_spans_tile_the_text_and_tokens_match(tokenizer, chunk_tokens):
    chunker = Chunker(tokenizer, chunk_tokens)
    chunks = chunker.chunk(TEXT)
    ids = reference_ids(tokenizer, TEXT)
    assert [t for c in chunks for t in c.token_ids] == ids
    assert all(len(c.token_ids) == chunk_tokens for c in chunks[:-1])
    assert 1 <= len(chunks[-1].token_ids) <= chunk_tokens
    assert chunks[0].start == 0 and chunks[-1].end == len(TEXT)
    for a, b in zip(chunks, chunks[1:]):
        assert a.end == b.start
    assert "".join(c.text for c in chunks) == TEXT
    assert all(c.text == TEXT[c.start : c.end] for c in chunks)
    assert chunker.count_tokens(TEXT) == len(ids)


def test_chunk_text_decodes_to_its_tokens(tokenizer):
    chunks = Chunker(tokenizer, 8).chunk(TEXT)
    for c in chunks:
        # Byte-level BPE: the span's text decodes from its token ids, up to whitespace at the edges.
        assert tokenizer.decode(list(c.token_ids)).strip() == c.text.strip()


def test_unicode_and_emoji(tokenizer):
    text = "naïve café 👋🏽 déjà vu — 東京 🇫🇷 end"
    for n in (1, 2, 3, 5):
        chunks = Chunker(tokenizer, n).chunk(text)
        assert [t for c in chunks for t in c.token_ids] == reference_ids(tokenizer, text)
        assert "".join(c.text for c in chunks) == text
        assert all(a.end == b.start and a.start <= a.end for a, b in zip(chunks, chunks[1:]))


def test_overlap(tokenizer):
    ids = reference_ids(tokenizer, TEXT)
    chunks = Chunker(tokenizer, 10, overlap=4).chunk(TEXT)
    step = 6
    for i, c in enumerate(chunks):
        assert list(c.token_ids) == ids[i * step : i * step + 10]
        assert c.text == TEXT[c.start : c.end]
    assert chunks[-1].end == len(TEXT) and i * step + 10 >= len(ids)
    for a, b in zip(chunks, chunks[1:]):
        assert b.start < a.end  # spans overlap too
        assert a.token_ids[-4:] == b.token_ids[:4]


def test_empty_and_whitespace(tokenizer):
    chunker = Chunker(tokenizer, 4)
    assert chunker.chunk("") == []
    assert chunker.count_tokens("") == 0
    ws = chunker.chunk("   \n ")
    assert "".join(c.text for c in ws) == "   \n "


@pytest.mark.parametrize("chunk_tokens, overlap", [(0, 0), (-1, 0), (4, 4), (4, -1), (4, 9)])
def test_invalid_settings(tokenizer, chunk_tokens, overlap):
    with pytest.raises(InvalidArgument, match=str(overlap) if chunk_tokens > 0 else str(chunk_tokens)):
        Chunker(tokenizer, chunk_tokens, overlap)
