"""LexicalIndex (SQLite FTS5 BM25) and reciprocal rank fusion, on their own."""
from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from memlm.index.fusion import fusion_depth, reciprocal_rank_fusion
from memlm.index.lexical_index import LexicalIndex, match_expression, query_terms

FILLER = [f"Paragraph {i} explains how the parser reads a token and returns the next key of the table." for i in range(40)]
NEEDLE = "The pass key is 48213. Remember it. 48213 is the pass key."


def make(path=None) -> LexicalIndex:
    ix = LexicalIndex(path)
    ix.add(list(range(40)), FILLER)
    ix.add([1000], [NEEDLE])
    return ix


def test_query_terms():
    assert query_terms("What is the pass key? The pass key is") == ["pass", "key"]
    assert query_terms("What is it?") == ["what", "is", "it"]  # nothing but stop words: keep them
    assert query_terms("Ünïcode naïve, naïve!") == ["ünïcode", "naïve"]
    assert query_terms("  ?! ") == []
    assert match_expression(['a"b', "or"]) == '"a""b" OR "or"'  # quoted: no word is an FTS5 operator


def test_bm25_ranks_the_rare_words_first():
    ix = make()
    scores, ids = ix.search("What is the pass key? The pass key is", k=5)
    assert ids[0] == 1000 and len(ids) == 5  # "key" is in every paragraph, "pass" only in the needle
    assert np.all(np.diff(scores) <= 0)
    assert ix.search("passing keys", k=1)[1].tolist() == [1000]  # Porter stemming: passing -> pass
    assert ix.search("PASS", k=3)[1].tolist() == [1000]  # case folded; one match
    assert ix.search("zebra", k=3)[1].tolist() == []
    assert ix.search("", k=3)[1].tolist() == []
    assert ix.search('" OR NEAR( pass', k=3)[1].tolist() == [1000]  # operators are just words


def test_filters_both_paths():
    ix = make()
    q = "pass key"
    # small allowed set: joined in SQL; ids outside the index are ignored
    assert ix.search(q, k=3, allowed_ids=np.array([5, 7, 99999]))[1].tolist() in ([5, 7], [7, 5])
    assert ix.search(q, k=3, allowed_ids=np.array([], np.int64))[1].tolist() == []
    # large allowed set: paged through the ranking
    big = np.setdiff1d(np.arange(30_000), [1000])
    assert ix.search(q, k=3)[1][0] == 1000
    assert ix.search(q, k=3, allowed_ids=big)[1].tolist() == ix.search(q, k=4)[1][1:].tolist()
    assert len(ix.search(q, k=50, allowed_ids=big)[1]) == 40  # pages until every match was seen


def test_apply_is_atomic_and_persists(tmp_path):
    path = tmp_path / "lex.sqlite"
    ix = make(path)
    with pytest.raises(sqlite3.IntegrityError):
        ix.apply([1000], ["a duplicate id"], remove_ids=[3])  # the add fails: the removal is rolled back too
    assert 3 in ix.ids() and len(ix) == 41
    with pytest.raises(ValueError, match="2 ids but 1 texts"):
        ix.apply([1, 2], ["one"])
    ix.apply([2000], ["a brand new zebra"], remove_ids=[1000])
    ix.close()
    ix2 = LexicalIndex(path)
    assert len(ix2) == 41 and ix2.search("zebra", 1)[1].tolist() == [2000] and ix2.search("48213", 1)[1].tolist() == []
    # reconcile to a stored set: drops what is gone, reads what is missing
    stored = np.array([0, 1, 2000, 3000], np.int64)
    added, removed = ix2.reconcile(stored, lambda ids: [f"text of {i} okapi" for i in ids])
    assert (added, removed) == (1, 38) and ix2.ids().tolist() == stored.tolist()
    assert ix2.search("okapi", 3)[1].tolist() == [3000]
    ix2.close()


def test_reciprocal_rank_fusion():
    scores, ids = reciprocal_rank_fusion([np.array([3, 1, -1, 7]), np.array([1, 2])], k=3)
    assert ids.tolist() == [1, 3, 2]  # 1: 1/62 + 1/61 beats 3: 1/61; holes (-1) do not count as ranks
    assert scores[0] == pytest.approx(1 / 62 + 1 / 61) and scores[1] == pytest.approx(1 / 61)
    assert reciprocal_rank_fusion([np.array([7]), np.array([], np.int64)], k=5)[1].tolist() == [7]
    assert reciprocal_rank_fusion([np.array([1]), np.array([2])], k=2, weights=[1, 2])[1].tolist() == [2, 1]
    with pytest.raises(ValueError, match="2 ranked lists but 1 weights"):
        reciprocal_rank_fusion([np.array([1]), np.array([2])], k=2, weights=[1])
    assert fusion_depth(16) == 32
