"""Chunks ranked for a query the way the store's search ranks them, without a store: for the
benchmarks that keep their corpora as cached vectors and token ids rather than in LMDB.

Modes as `MemoryStore.search`: "dense" (cosine of the bundled MiniLM vectors), "lexical" (BM25 in
the store's own `LexicalIndex`) and "hybrid" (each contributes `fusion_depth(k)`, fused by
`reciprocal_rank_fusion`: the store's code and constants).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from memlm.index.fusion import fusion_depth, reciprocal_rank_fusion
from memlm.index.lexical_index import LexicalIndex

SEARCH_MODES = ("dense", "lexical", "hybrid")


def following(chunk: tuple[int, int], n: int, count: int) -> list[tuple[int, int]]:
    """The (up to) n chunks (doc, index) after `chunk` in its document of `count` chunks: what
    `MemoryStore.following_chunks` gives the service, for `knn_memory.with_following`."""
    doc, j = chunk
    return [(doc, c) for c in range(j + 1, min(j + 1 + n, count))]


class ChunkRanker:
    """Rows 0..n-1: `vectors` (n, dim) unit rows from `embedder`; `text(row)` gives a row's text
    (read only when the lexical index is first needed)."""

    def __init__(self, embedder, vectors: np.ndarray, text: Callable[[int], str]) -> None:
        self.embedder, self.vectors, self.text = embedder, np.asarray(vectors, np.float32), text
        self._lexical: LexicalIndex | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    def dense(self, query: str, k: int) -> np.ndarray:
        scores = self.vectors @ self.embedder.embed([query])[0]  # (n,)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, np.int64)
        return top[np.argsort(-scores[top], kind="stable")]

    def lexical(self, query: str, k: int) -> np.ndarray:
        if self._lexical is None:
            self._lexical = LexicalIndex()
            self._lexical.add(range(len(self)), [self.text(r) for r in range(len(self))])
        return self._lexical.search(query, k)[1]

    def rank(self, mode: str, query: str, k: int) -> list[int]:
        """The k best rows for `query`, best first."""
        if mode == "hybrid":
            depth = fusion_depth(k)
            return reciprocal_rank_fusion([self.dense(query, depth), self.lexical(query, depth)], k)[1].tolist()
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {mode!r}; expected one of {SEARCH_MODES}")
        return getattr(self, mode)(query, k).tolist()
