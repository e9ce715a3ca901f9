"""LexicalIndex (in-memory BM25: search, score, reference_score) and reciprocal rank fusion, on their own."""
from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
import pytest

from memlm.index.fusion import fusion_depth, reciprocal_rank_fusion
from memlm.index.lexical_index import LexicalIndex, query_terms, terms

FILLER = [f"Paragraph {i} explains how the parser reads a token and returns the next key of the table." for i in range(40)]
NEEDLE = "The pass key is 48213. Remember it. 48213 is the pass key."


def make() -> LexicalIndex:
    ix = LexicalIndex()
    ix.add(list(range(40)), FILLER)
    ix.add([1000], [NEEDLE])
    return ix


def test_analysis():
    assert terms("What is the Pass-key? THE pass key is") == ["pass", "key", "pass", "key"]
    assert query_terms("What is the pass key? The pass key is") == ["pass", "key"]
    assert query_terms("What is it?") == []  # stop words only: nothing to match on
    assert query_terms("Ünïcode naïve, naïve! crypt_r") == ["ünïcode", "naïve", "crypt_r"]


def test_bm25_scores_and_ranks():
    ix = make()
    scores, ids = ix.search("What is the pass key? The pass key is", k=5)
    assert ids[0] == 1000 and len(ids) == 5  # "key" is in every paragraph, "pass" only in the needle
    assert np.all(np.diff(scores) <= 0)
    # Okapi BM25 by hand for the needle: "pass" (df 1) twice and "key" (df 41) twice in 9 words
    n, avg = 41, (sum(len(terms(t)) for t in FILLER) + len(terms(NEEDLE))) / 41

    def part(df, tf, length):
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        return idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / avg))

    expect = part(1, 2, len(terms(NEEDLE))) + part(41, 2, len(terms(NEEDLE)))
    assert scores[0] == pytest.approx(expect, rel=1e-5)
    assert ix.search("PASS", k=3)[1].tolist() == [1000]  # case folded; one match
    assert ix.search("zebra", k=3)[1].tolist() == []
    assert ix.search("", k=3)[1].tolist() == []
    assert ix.search("key", k=0)[1].tolist() == []


def test_filters():
    ix = make()
    got = ix.search("pass key", k=3, allowed_ids=np.array([5, 7, 99999]))[1].tolist()
    assert got == [5, 7]  # equal scores: ties by chunk id; ids outside the index are ignored
    assert ix.search("pass key", k=3, allowed_ids=np.array([], np.int64))[1].tolist() == []
    everything_but = np.setdiff1d(np.arange(30_000), [1000])
    assert ix.search("pass key", k=3, allowed_ids=everything_but)[1].tolist() == ix.search("pass key", k=4)[1][1:].tolist()


def test_add_remove_compact():
    ix = make()
    with pytest.raises(ValueError, match="2 ids but 1 texts"):
        ix.add([1, 2], ["one"])
    with pytest.raises(ValueError, match="already held or repeated"):
        ix.add([1000], ["a duplicate id"])
    assert len(ix) == 41 and 1000 in ix
    ix.apply([2000], ["a brand new zebra"], remove_ids=[1000, 424242])  # unknown ids ignored
    assert 1000 not in ix and ix.search("48213", 5)[1].tolist() == [] and ix.search("zebra", 1)[1].tolist() == [2000]
    before = ix.search("parser token", 50)
    ix.remove(range(0, 40, 2))
    assert set(ix.search("parser token", 50)[1].tolist()) == set(range(1, 40, 2))
    ix._compact()  # what many removals trigger: dead postings dropped, slots renumbered
    assert ix.ids().tolist() == list(range(1, 40, 2)) + [2000]
    after = ix.search("parser token", 50)
    assert set(after[1].tolist()) == set(range(1, 40, 2)) and len(before[1]) == 40
    assert ix.search("zebra", 1)[1].tolist() == [2000]
    big = LexicalIndex()
    big.add(list(range(3000)), [f"word{i % 7} filler" for i in range(3000)])
    big.remove(range(2500))  # more removed than live: compacts by itself
    assert big._dead == 0 and len(big) == 500 and big.search("word3", 1000)[1].min() >= 2500


def test_reference_score_is_a_chunk_holding_each_query_term_once():
    ix = make()  # 40 chunks with "parser", the needle with "pass"
    n = len(ix)
    idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t, df in (("pass", 1), ("parser", 40))}
    assert ix.reference_score("the pass parser zebra") == pytest.approx(idf["pass"] + idf["parser"])  # zebra: not indexed
    assert ix.reference_score("zebra") == 0.0
    # an average-length chunk holding "pass" and "parser" once each scores the reference (within 2%:
    # its length is the average rounded to whole words, and adding it moves the average)
    avg = ix._live_words / n  # noqa: SLF001
    ix.add([2000], [" ".join(["pass", "parser"] + [f"w{i}" for i in range(round(avg) - 2)])])
    n = len(ix)
    idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t, df in (("pass", 2), ("parser", 41))}
    assert ix.score("pass parser", np.array([2000]))[0] == pytest.approx(idf["pass"] + idf["parser"], rel=0.02)


def test_reciprocal_rank_fusion():
    scores, ids = reciprocal_rank_fusion([np.array([3, 1, -1, 7]), np.array([1, 2])], k=3)
    assert ids.tolist() == [1, 3, 2]  # 1: 1/62 + 1/61 beats 3: 1/61; holes (-1) do not count as ranks
    assert scores[0] == pytest.approx(1 / 62 + 1 / 61) and scores[1] == pytest.approx(1 / 61)
    assert reciprocal_rank_fusion([np.array([7]), np.array([], np.int64)], k=5)[1].tolist() == [7]
    assert reciprocal_rank_fusion([np.array([1]), np.array([2])], k=2, weights=[1, 2])[1].tolist() == [2, 1]
    with pytest.raises(ValueError, match="2 ranked lists but 1 weights"):
        reciprocal_rank_fusion([np.array([1]), np.array([2])], k=2, weights=[1])
    assert fusion_depth(16) == 32


def brute_force_bm25(docs: dict[int, str], query: str) -> dict[int, float]:
    """Okapi BM25 straight from its definition, over the live documents only."""
    toks = {i: terms(t) for i, t in docs.items()}
    n, avg = len(toks), sum(map(len, toks.values())) / max(len(toks), 1)
    out: dict[int, float] = {}
    for term in query_terms(query):
        df = sum(term in t for t in toks.values())
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, t in toks.items():
            tf = t.count(term)
            if tf:
                out[i] = out.get(i, 0.0) + idf * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * len(t) / avg))
    return out


WORDS = ["alpha", "beta", "gamma", "delta", "the", "is", "omega", "x1"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 30), st.lists(st.sampled_from(WORDS), min_size=1, max_size=12)),
                min_size=1, max_size=60),
       st.lists(st.sampled_from(WORDS), min_size=1, max_size=4))
def test_matches_a_brute_force_bm25_through_adds_removes_and_compaction(ops, query_words):
    ix, live = LexicalIndex(), {}
    for add, cid, words in ops:
        if add and cid not in live:
            ix.add([cid], [" ".join(words)])
            live[cid] = " ".join(words)
        elif not add:
            ix.remove([cid])
            live.pop(cid, None)
    query = " ".join(query_words)
    expect = brute_force_bm25(live, query)
    assert sorted(ix.ids().tolist()) == sorted(live)
    # before compaction removed chunks still count in df (as in Lucene): the same chunks match
    assert set(ix.search(query, 100)[1].tolist()) == {i for i, s in expect.items() if s > 0}
    def score_matches_search() -> None:  # score() of given chunks is what search() gives them, 0 if unmatched
        found = dict(zip(ix.search(query, 100)[1].tolist(), ix.search(query, 100)[0].tolist()))
        asked = np.array(sorted(live) + [10_000], np.int64)  # and an id it never held
        got = ix.score(query_terms(query), asked)
        assert got.tolist() == pytest.approx([found.get(i, 0.0) for i in asked.tolist()], rel=1e-5)

    score_matches_search()
    ix._compact()  # afterwards the scores are exactly BM25 over the live chunks
    score_matches_search()
    scores, ids = ix.search(query, 100)
    assert dict(zip(ids.tolist(), scores.tolist())) == pytest.approx({i: s for i, s in expect.items() if s > 0}, rel=1e-5)
    assert np.all(np.diff(scores) <= 0)
