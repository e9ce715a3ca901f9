"""Fusing the dense (embedding) and lexical (BM25) rankings of a hybrid search into one.

Each method takes each ranking's candidates as (scores, ids), best first (ids < 0 are holes), and
returns the k best fused (scores, ids), best first; ties go to the id met first (dense first).

- "absolute" (the store's default, `store.fusion`): every candidate of either ranking is scored
  by BOTH rankers (`cosine_of` / `bm25_of` give the score a ranking did not return), each score is
  mapped to a query-independent [0, 1] scale, and the fused score is their weighted mean:
      0.4 * max(cosine, 0) + 0.6 * clip((coverage - 0.3) / 0.7, 0, 1),  coverage = min(1, BM25 / reference)
  (DENSE_WEIGHT, LEXICAL_FLOOR). `reference` is what a chunk holding every query term once scores
  (`LexicalIndex.reference_score`, the sum of the terms' idfs), so coverage is 1 for "the whole
  query, rare words included"; the floor makes a chunk that shares only a common word or two with
  the query (a paraphrase's false friend) count as no lexical match, while a chunk holding the
  query's rare name or code keeps most of it. With no lexical match the order is the dense one.
  Scores are in [0, 1] and mean the same across queries, so they can be thresholded: above 0.6
  takes a lexical match of most of the query's weight, 0.4 at most from the embedding alone.
- "rrf", reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009; Elastic's, Qdrant's and
  LlamaIndex's default): sum over lists of weight / (rank_constant + rank), rank from 1; ranks only.
  With constant 60 a chunk that only BM25 ranks first (1/61) scores below one both rank third
  (2/63): the rare name or code only BM25 finds is lost. At most sum(weights) / (rank_constant + 1).
- "relative_score" (Weaviate's relativeScoreFusion, its default since 1.24): each list min-max
  scaled over its own candidates to [0, 1], then the weighted mean, 0 where a list did not return
  the chunk. In [0, 1], but relative to the query's candidates: the best chunk of a query nothing
  matches well still scores near 1.
- "dbsf" (Qdrant's distribution-based score fusion): like relative_score with each list scaled by
  its mean +- 3 standard deviations (clipped to [0, 1]).

benchmarks/search_fusion.py measures them per kind of query (README, "Search quality").
`fusion_depth` is how many candidates each ranking contributes.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np

RANK_CONSTANT = 60
FUSION_METHODS = ("absolute", "rrf", "relative_score", "dbsf")
DENSE_WEIGHT = 0.4  # "absolute": the dense share of the fused score
LEXICAL_FLOOR = 0.3  # "absolute": BM25 coverage at or below this counts 0 (a common word or two shared)
LEXICAL_POWER = 1.0  # "absolute": the exponent on the rescaled coverage

Ranked = tuple[np.ndarray, np.ndarray]  # (scores, ids) of one list, best first


def _live(scores: np.ndarray, ids: np.ndarray) -> Ranked:
    ids = np.asarray(ids, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64)
    keep = (ids >= 0) & np.isfinite(scores)
    return scores[keep], ids[keep]


def _weighted_sum(lists: Sequence[Ranked], weights: Sequence[float], k: int) -> Ranked:
    """Sum each list's (already scaled) scores per id -> the k best (scores, ids), best first;
    ties go to the id met first (list order, then rank)."""
    total: dict[int, float] = {}
    for (scores, ids), w in zip(lists, weights):
        for s, i in zip(scores.tolist(), ids.tolist()):
            total[i] = total.get(i, 0.0) + w * s
    best = sorted(total.items(), key=lambda kv: -kv[1])[:k]  # stable: first met wins ties
    return np.array([s for _, s in best], np.float32), np.array([i for i, _ in best], np.int64)


def _check_weights(lists: Sequence[Ranked], weights: Sequence[float] | None) -> list[float]:
    weights = [1.0] * len(lists) if weights is None else [float(w) for w in weights]
    if len(weights) != len(lists):
        raise ValueError(f"{len(lists)} ranked lists but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"fusion weights must be >= 0 with a positive sum, got {weights}")
    return weights


def relative_score_fusion(lists: Sequence[Ranked], k: int, weights: Sequence[float] | None = None) -> Ranked:
    """Min-max scale each list to [0, 1], then the weighted mean per id: fused scores in [0, 1]."""
    weights = _check_weights(lists, weights)
    scaled = []
    for scores, ids in (_live(s, i) for s, i in lists):
        if len(scores):
            lo, hi = scores.min(), scores.max()
            scores = (scores - lo) / (hi - lo) if hi > lo else np.ones_like(scores)
        scaled.append((scores, ids))
    return _weighted_sum(scaled, [w / sum(weights) for w in weights], k)


def distribution_based_score_fusion(lists: Sequence[Ranked], k: int, weights: Sequence[float] | None = None) -> Ranked:
    """Scale each list by mean +- 3 std to [0, 1] (clipped), then the weighted mean per id."""
    weights = _check_weights(lists, weights)
    scaled = []
    for scores, ids in (_live(s, i) for s, i in lists):
        if len(scores):
            mu, sd = scores.mean(), scores.std()
            scores = np.clip((scores - (mu - 3 * sd)) / (6 * sd), 0.0, 1.0) if sd > 0 else np.ones_like(scores)
        scaled.append((scores, ids))
    return _weighted_sum(scaled, [w / sum(weights) for w in weights], k)


def reciprocal_rank_fusion(
    ranked_ids: Sequence[np.ndarray], k: int, weights: Sequence[float] | None = None, rank_constant: int = RANK_CONSTANT
) -> Ranked:
    """Lists of ids, each best first (ids < 0 are holes and ignored) -> the k best fused
    (scores, ids), best first; ties go to the id met first (list order, then rank)."""
    weights = [1.0] * len(ranked_ids) if weights is None else list(weights)
    if len(weights) != len(ranked_ids):
        raise ValueError(f"{len(ranked_ids)} ranked lists but {len(weights)} weights")
    by_rank = []
    for ids in ranked_ids:
        ids = np.asarray(ids, dtype=np.int64)
        ids = ids[ids >= 0]
        by_rank.append((1.0 / (rank_constant + np.arange(1, len(ids) + 1)), ids))
    return _weighted_sum(by_rank, weights, k)


def absolute_fusion(
    dense: Ranked,
    lexical: Ranked,
    k: int,
    *,
    cosine_of: Callable[[np.ndarray], np.ndarray],
    bm25_of: Callable[[np.ndarray], np.ndarray],
    bm25_reference: float,
    dense_weight: float = DENSE_WEIGHT,
    lexical_floor: float = LEXICAL_FLOOR,
    lexical_power: float = LEXICAL_POWER,
) -> Ranked:
    """The union of both rankings' candidates, each scored by both rankers on absolute [0, 1]
    scales and fused by a weighted mean (module docstring) -> the k best (scores, ids).
    `cosine_of(ids)` / `bm25_of(ids)`: (n,) ids -> (n,) scores, for candidates a ranking did not
    return (BM25 0 for a chunk sharing no word with the query)."""
    if not 0 <= dense_weight <= 1 or not 0 <= lexical_floor < 1:
        raise ValueError(f"need dense_weight in [0, 1] and lexical_floor in [0, 1), got {dense_weight}, {lexical_floor}")
    (d_s, d_i), (l_s, l_i) = _live(*dense), _live(*lexical)
    ids = np.array(list(dict.fromkeys(d_i.tolist() + l_i.tolist())), dtype=np.int64)  # dense first
    if len(ids) == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.int64)
    cos = dict(zip(d_i.tolist(), d_s.tolist()))
    bm25 = dict(zip(l_i.tolist(), l_s.tolist()))
    for known, fill in ((cos, cosine_of), (bm25, bm25_of)):
        missing = np.array([c for c in ids.tolist() if c not in known], dtype=np.int64)
        if len(missing):
            known.update(zip(missing.tolist(), np.asarray(fill(missing), dtype=np.float64).tolist()))
    c = np.array([cos[i] for i in ids.tolist()])  # (n,) cosine in [-1, 1]
    b = np.array([bm25[i] for i in ids.tolist()])  # (n,) BM25 >= 0
    coverage = np.minimum(1.0, b / bm25_reference) if bm25_reference > 0 else np.zeros_like(b)
    lexical_part = np.clip((coverage - lexical_floor) / (1 - lexical_floor), 0.0, 1.0) ** lexical_power
    fused = dense_weight * np.clip(c, 0.0, 1.0) + (1 - dense_weight) * lexical_part
    order = np.argsort(-fused, kind="stable")[:k]
    return fused[order].astype(np.float32), ids[order]


def fuse(
    method: str,
    dense: Ranked,
    lexical: Ranked,
    k: int,
    *,
    cosine_of: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    bm25_of: Optional[Callable[[np.ndarray], np.ndarray]] = None,
    bm25_reference: float = 0.0,
) -> Ranked:
    """Fuse a hybrid search's dense and lexical candidates with one of FUSION_METHODS -> the k best
    (scores, ids). "absolute" needs `cosine_of`, `bm25_of` and `bm25_reference`; the others use
    the candidates alone."""
    if method == "absolute":
        if cosine_of is None or bm25_of is None:
            raise ValueError("absolute fusion needs cosine_of and bm25_of")
        return absolute_fusion(dense, lexical, k, cosine_of=cosine_of, bm25_of=bm25_of, bm25_reference=bm25_reference)
    if method == "rrf":
        return reciprocal_rank_fusion([dense[1], lexical[1]], k)
    if method == "relative_score":
        return relative_score_fusion([dense, lexical], k)
    if method == "dbsf":
        return distribution_based_score_fusion([dense, lexical], k)
    raise ValueError(f"unknown fusion method {method!r}; expected one of {', '.join(FUSION_METHODS)}")


def fusion_depth(k: int) -> int:
    """How many results each retriever contributes when k fused ones are wanted: twice k, so a
    chunk ranked just below k by one list and well by the other can still make the cut."""
    return 2 * k
