"""Fusing ranked lists from several retrievers (dense and lexical) into one ranking.

Reciprocal rank fusion (Cormack, Clarke & Buettcher, SIGIR 2009): a chunk scores
sum over lists of weight / (rank_constant + rank), rank from 1. It uses ranks only, so scores on
different scales (cosine similarity, BM25) need no calibration; 60 is the paper's constant and
the default of Elastic, Qdrant and LlamaIndex's fusion retriever.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

RANK_CONSTANT = 60


def reciprocal_rank_fusion(
    ranked_ids: Sequence[np.ndarray], k: int, weights: Sequence[float] | None = None, rank_constant: int = RANK_CONSTANT
) -> tuple[np.ndarray, np.ndarray]:
    """Lists of ids, each best first (ids < 0 are holes and ignored) -> the k best fused
    (scores, ids), best first; ties go to the id met first (list order, then rank)."""
    weights = [1.0] * len(ranked_ids) if weights is None else list(weights)
    if len(weights) != len(ranked_ids):
        raise ValueError(f"{len(ranked_ids)} ranked lists but {len(weights)} weights")
    score: dict[int, float] = {}
    for ids, w in zip(ranked_ids, weights):
        rank = 0
        for i in np.asarray(ids).tolist():
            if i < 0:
                continue
            rank += 1
            score[i] = score.get(i, 0.0) + w / (rank_constant + rank)
    best = sorted(score.items(), key=lambda kv: -kv[1])[:k]  # stable: first met wins ties
    return (np.array([s for _, s in best], np.float32), np.array([i for i, _ in best], np.int64))


def fusion_depth(k: int) -> int:
    """How many results each retriever contributes when k fused ones are wanted: twice k, so a
    chunk ranked just below k by one list and well by the other can still make the cut."""
    return 2 * k
