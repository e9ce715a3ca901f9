"""Fusing ranked lists from several retrievers (dense and lexical) into one ranking.

Three methods, each taking every list as (scores, ids) best first (ids < 0 are holes):

- "relative_score" (Weaviate's relativeScoreFusion, its default since 1.24): each list's scores
  are min-max scaled over its own candidates to [0, 1] (best 1, worst 0, a list with one score
  gives it 1), and a chunk scores the weighted mean over lists, 0 where a list did not return it.
  The fused score is in [0, 1]: 1 means every list ranked the chunk first.
- "dbsf" (Qdrant's distribution-based score fusion): like relative_score, but a list is scaled by
  its mean +- 3 standard deviations instead of its min and max (clipped to [0, 1]), so one
  outlying score does not squash the rest.
- "rrf", reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009): a chunk scores
  sum over lists of weight / (rank_constant + rank), rank from 1; ranks only. With the usual
  constant 60 a chunk that only one list ranks first (1/61) scores below one both rank third
  (2/63), which loses the rare name or code only BM25 finds; benchmarks/search_fusion.py measures
  that (it is why relative_score is the store's default). Scores are at most
  sum(weights) / (rank_constant + 1).

`fusion_depth` is how many candidates each list contributes.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

RANK_CONSTANT = 60
FUSION_METHODS = ("relative_score", "dbsf", "rrf")

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


def fuse(method: str, lists: Sequence[Ranked], k: int, weights: Sequence[float] | None = None) -> Ranked:
    """Fuse (scores, ids) lists with one of FUSION_METHODS -> the k best (scores, ids)."""
    fusers: dict[str, Callable[..., Ranked]] = {
        "relative_score": relative_score_fusion,
        "dbsf": distribution_based_score_fusion,
        "rrf": lambda ls, kk, w: reciprocal_rank_fusion([i for _, i in ls], kk, w),
    }
    if method not in fusers:
        raise ValueError(f"unknown fusion method {method!r}; expected one of {', '.join(FUSION_METHODS)}")
    return fusers[method](lists, k, weights)


def fusion_depth(k: int) -> int:
    """How many results each retriever contributes when k fused ones are wanted: twice k, so a
    chunk ranked just below k by one list and well by the other can still make the cut."""
    return 2 * k
