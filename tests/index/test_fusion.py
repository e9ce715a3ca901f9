"""Hybrid-search fusion: each method on hand-made rankings, and the store's default on a rare
invented name that only BM25 ranks first."""
from __future__ import annotations

import numpy as np
import pytest

from memlm.config import StoreSettings
from memlm.index.fusion import (
    FUSION_METHODS,
    absolute_fusion,
    distribution_based_score_fusion,
    fuse,
    reciprocal_rank_fusion,
    relative_score_fusion,
)
from memlm.index.types import Document


def ranked(scores, ids):
    return np.array(scores, np.float32), np.array(ids, np.int64)


def test_relative_score_scales_each_list_to_0_1():
    dense = ranked([0.9, 0.5, 0.1], [1, 2, 3])  # -> 1, 0.5, 0
    lexical = ranked([8.0, 2.0, -np.inf], [3, 4, -1])  # -> 1, 0; the hole is ignored
    scores, ids = relative_score_fusion([dense, lexical], k=10)
    # 1: (1 + 0) / 2; 3: (0 + 1) / 2 (dense first wins the tie); 2: 0.25; 4: 0
    assert ids.tolist() == [1, 3, 2, 4]
    np.testing.assert_allclose(scores, [0.5, 0.5, 0.25, 0.0])
    # weights are normalised; a one-score list gives its score 1
    scores, ids = relative_score_fusion([ranked([0.3], [5]), ranked([], [])], k=1, weights=[3, 1])
    assert ids.tolist() == [5] and scores[0] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="weights"):
        relative_score_fusion([dense, lexical], k=1, weights=[-1, 1])


def test_dbsf_scales_by_mean_and_three_deviations():
    dense = ranked([1.0, 0.0], [1, 2])  # mean 0.5, std 0.5 -> window [-1, 2]: 2/3 and 1/3
    scores, ids = distribution_based_score_fusion([dense, ranked([], [])], k=2)
    assert ids.tolist() == [1, 2]
    np.testing.assert_allclose(scores, [1 / 3, 1 / 6], rtol=1e-6)  # halved: the empty list weighs half


def test_reciprocal_rank_fusion_loses_what_only_one_list_ranks_first():
    # The failure the "absolute" default fixes: 9 is BM25's first and dense's 20th; 4 is both lists' third.
    dense = [1, 2, 4] + list(range(10, 26)) + [9]
    lexical = [9, 3, 4]
    scores, ids = reciprocal_rank_fusion([np.array(dense), np.array(lexical)], k=3)
    assert ids[0] == 4 and scores[0] == pytest.approx(2 / 63)
    assert 9 not in ids[:1]


def test_absolute_fusion_scores_every_candidate_by_both():
    asked = {"cos": [], "bm25": []}

    def cosine_of(ids):
        asked["cos"].append(ids.tolist())
        return np.array([{9: 0.2, 3: 0.3}[i] for i in ids.tolist()])

    def bm25_of(ids):
        asked["bm25"].append(ids.tolist())
        return np.array([{1: 0.0, 2: 1.0}[i] for i in ids.tolist()])

    dense = ranked([0.6, 0.5], [1, 2])
    lexical = ranked([4.0, 2.6, 1.0], [9, 2, 3])
    scores, ids = absolute_fusion(dense, lexical, k=3, cosine_of=cosine_of, bm25_of=bm25_of, bm25_reference=4.0)
    assert asked == {"cos": [[9, 3]], "bm25": [[1]]}  # only what each ranking did not return
    # coverage = BM25 / 4; its part: (coverage - 0.3) / 0.7 clipped to [0, 1]
    # 9: 0.4 * 0.2 + 0.6 * 1 = 0.68; 2: 0.4 * 0.5 + 0.6 * 0.5 = 0.5; 1: 0.4 * 0.6 = 0.24;
    # 3: coverage 0.25 is below the floor (a common word shared): 0.4 * 0.3 = 0.12
    assert ids.tolist() == [9, 2, 1]
    np.testing.assert_allclose(scores, [0.68, 0.5, 0.24], rtol=1e-6)
    assert all(0 <= s <= 1 for s in scores)
    # coverage is capped at 1 and cosine clipped at 0: scores stay in [0, 1]
    s, _ = absolute_fusion(ranked([-0.5], [1]), ranked([40.0], [1]), k=1, cosine_of=None, bm25_of=None, bm25_reference=4.0)
    assert s[0] == pytest.approx(0.6)


def test_absolute_fusion_without_lexical_matches_is_the_dense_order():
    dense = ranked([0.7, 0.4, 0.3], [5, 6, 7])
    scores, ids = absolute_fusion(
        dense, ranked([], []), k=3, cosine_of=None, bm25_of=lambda c: np.zeros(len(c)), bm25_reference=0.0
    )
    assert ids.tolist() == [5, 6, 7]
    np.testing.assert_allclose(scores, 0.4 * np.array([0.7, 0.4, 0.3]), rtol=1e-6)


def test_fuse_dispatches_and_names_bad_methods():
    dense, lexical = ranked([0.9, 0.1], [1, 2]), ranked([3.0], [2])
    for method in ("rrf", "relative_score", "dbsf"):
        assert set(fuse(method, dense, lexical, k=2)[1].tolist()) == {1, 2}
    with pytest.raises(ValueError, match="needs cosine_of and bm25_of"):
        fuse("absolute", dense, lexical, k=2)
    with pytest.raises(ValueError, match="unknown fusion method 'max'; expected one of absolute, rrf"):
        fuse("max", dense, lexical, k=2)
    assert StoreSettings().fusion == "absolute" and set(FUSION_METHODS) == {"absolute", "rrf", "relative_score", "dbsf"}


# A few dozen short documents in the benchmark's "entity" shape: several open "According to <name>,"
# and the question names one invented person. Only the name tells them apart, and MiniLM has no
# idea of it; the other documents are about anything, a few about what people say.
ENTITY_DOCS = [
    Document("zorvek", "According to Zorvek Tallimund, the harbour lamps are lit an hour before dusk."),
    Document("brannoc", "According to Brannoc Velisse, people say the old bridge sways in strong wind."),
    Document("miravel", "According to Miravel Osk, what people say about the river is mostly true."),
    Document("quendry", "According to Quendry Pall, the town clock runs two minutes fast."),
    Document("sayings", "Sailors say many things; what they say about storms is worth hearing."),
    Document("quotes", "A collection of famous quotations, with who said them and when."),
] + [
    Document(f"topic-{i}", text) for i, text in enumerate([
        "The forecast says rain tomorrow and sun at the weekend.",
        "Knead the dough for ten minutes and let it rise in a warm place.",
        "The night train leaves at eleven and arrives before breakfast.",
        "Prune the roses in late winter, before the buds begin to swell.",
        "A sorted list can be searched by halving the range at every step.",
        "The museum opens at nine and closes early on public holidays.",
        "Copper conducts heat well, which is why old kettles were made of it.",
        "Migrating geese fly in a V to save energy on long journeys.",
        "The library lends books for three weeks and renews them online.",
        "Tides follow the moon, with two high waters on most days.",
        "A violin's top is usually spruce and its back maple.",
        "The committee meets on the first Monday of every month.",
        "Fresh paint needs a day to dry before a second coat.",
        "Glaciers carve valleys into a U shape over thousands of years.",
        "The bakery sells out of rye bread by noon on Saturdays.",
        "Lighthouse keepers once logged every passing ship by hand.",
        "Honey never spoils if it is kept sealed and dry.",
        "The orchard has forty apple trees and six pears.",
        "Chess clocks stop one player's time as they start the other's.",
        "Bridges expand in summer, so they are built with joints.",
    ])
]


def test_default_hybrid_ranks_first_a_rare_name_only_bm25_ranks_first(store_factory):
    query = "What did Zorvek Tallimund say?"
    s = store_factory()
    s.create_collection("people")
    s.ingest("people", ENTITY_DOCS)
    assert s.search("people", query, k=3, mode="lexical")[0].doc_id == "zorvek"  # BM25: the rare name
    assert s.search("people", query, k=3, mode="dense")[0].doc_id != "zorvek"  # the embedding misses it
    hybrid = s.search("people", query, k=5)  # the default: hybrid, store.fusion = absolute
    assert hybrid[0].doc_id == "zorvek"
    assert all(0 <= h.score <= 1 for h in hybrid) and hybrid[0].score > hybrid[1].score
    rrf = store_factory(StoreSettings(fusion="rrf"), path=s.data_dir.parent / "rrf")
    rrf.create_collection("people")
    rrf.ingest("people", ENTITY_DOCS)
    assert rrf.search("people", query, k=5)[0].doc_id != "zorvek"  # the old default lost it
