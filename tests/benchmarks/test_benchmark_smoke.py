"""The benchmark corpora: documents of the asked size, haystacks of the asked length, the needle
where it is said to be. Tokenizer only, no model runs (~15 s, most of it parsing the stdlib)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import corpus  # noqa: E402
from corpus import HAYSTACK_KINDS, documents_for_tokens, needle_sentence, pack_documents, place_needle  # noqa: E402


@pytest.fixture(scope="module")
def count_tokens(bundled_model_dir):
    from memlm.index.chunking import Chunker
    from memlm.models.loading import load_tokenizer

    return Chunker(load_tokenizer(bundled_model_dir), 64).count_tokens


@pytest.mark.parametrize("kind", HAYSTACK_KINDS)
def test_documents_have_the_asked_size_and_are_prefix_stable(kind, count_tokens):
    docs = pack_documents(kind, 6, count_tokens, doc_tokens=1000)
    sizes = [count_tokens(d.text) for d in docs]
    # Packing counts unit by unit (+1 per join); the joined text tokenizes within ~2% of that (BPE
    # merges at the joins), and a document stops before the unit that would overflow it (units
    # are at most 500 tokens, so none is under half full).
    assert all(480 <= s <= 1020 for s in sizes), sizes
    assert sum(sizes) / len(sizes) >= 850, sizes
    assert pack_documents(kind, 3, count_tokens, doc_tokens=1000) == docs[:3]  # a cache of 3 extends to 6


@pytest.mark.parametrize("kind,n_tokens", [("prose", 4096), ("stdlib", 16384), ("filler", 131072)])
def test_haystack_length_is_within_half_a_document(kind, n_tokens, count_tokens):
    docs = pack_documents(kind, int(n_tokens / 850) + 2, count_tokens)
    counts = [count_tokens(d.text) for d in docs]
    m = documents_for_tokens(counts, n_tokens)
    assert abs(sum(counts[:m]) - n_tokens) <= max(counts) / 2
    with pytest.raises(ValueError):
        documents_for_tokens(counts[:2], n_tokens)


@pytest.mark.parametrize("depth", [0.05, 0.5, 0.95])
def test_needle_lands_at_the_asked_depth(depth, count_tokens):
    docs = pack_documents("prose", 8, count_tokens)
    counts = [count_tokens(d.text) for d in docs]
    needle = needle_sentence("48213")
    at, needled, actual = place_needle(docs, counts, depth, needle, count_tokens)
    assert needle in needled.text and needle not in docs[at].text
    assert needled.text.replace(needle + needled.separator, "").replace(needled.separator + needle, "") == docs[at].text
    # Depth measured on the real token stream: tokens before the needle over all tokens.
    hay = "\n\n".join(needled.text if i == at else d.text for i, d in enumerate(docs))
    true_depth = count_tokens(hay[: hay.index(needle)]) / count_tokens(hay)
    assert abs(actual - true_depth) < 0.02 and abs(actual - depth) < 0.02, (actual, true_depth, depth)


def test_stdlib_text_is_varied_prose():
    paras = corpus.stdlib_paragraphs()
    assert len(paras) > 2000 and len(set(paras)) == len(paras)
    assert not any(">>>" in p for p in paras)


def test_wilson_interval():
    from passkey import wilson  # noqa: E402  (imports torch, not the model)

    lo, hi = wilson(20, 20)
    assert 0.83 < lo < 0.84 and hi == 1.0
    lo, hi = wilson(0, 5)
    assert lo == 0.0 and 0.43 < hi < 0.44
