"""Chunks ranked for a query the way the store's search ranks them, without a store: for the
benchmarks that keep their corpora as cached vectors and token ids rather than in LMDB.

Modes as `MemoryStore.search`: "dense" (cosine of the bundled MiniLM vectors), "lexical" (BM25 in
the store's own `LexicalIndex`) and "hybrid" (each contributes `fusion_depth(k)`, fused by
`fuse` with the store's default `store.fusion`: the store's code and constants).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from memlm.config import StoreSettings
from memlm.index.fusion import fuse, fusion_depth
from memlm.index.lexical_index import LexicalIndex

SEARCH_MODES = ("dense", "lexical", "hybrid")


def following(chunk: tuple[int, int], n: int, count: int) -> list[tuple[int, int]]:
    """The (up to) n chunks (doc, index) after `chunk` in its document of `count` chunks: what
    `MemoryStore.following_chunks` gives the service, for `memlm.modes.knn.reading.gated_rows`."""
    doc, j = chunk
    return [(doc, c) for c in range(j + 1, min(j + 1 + n, count))]


class ChunkRanker:
    """Rows 0..n-1: `vectors` (n, dim) unit rows from `embedder`; `text(row)` gives a row's text
    (read only when the lexical index is first needed)."""

    def __init__(self, embedder, vectors: np.ndarray, text: Callable[[int], str], fusion: str | None = None) -> None:
        """fusion: how "hybrid" fuses (memlm.index.fusion); None = the store's default `store.fusion`."""
        self.embedder, self.vectors, self.text = embedder, np.asarray(vectors, np.float32), text
        self.fusion = fusion or StoreSettings().fusion
        self._lexical: LexicalIndex | None = None

    def __len__(self) -> int:
        return len(self.vectors)

    def _dense(self, query_vec: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.vectors @ query_vec  # (n,)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, np.int64)
        top = top[np.argsort(-scores[top], kind="stable")]
        return scores[top], top

    def _embed(self, query: str) -> np.ndarray:
        embed = getattr(self.embedder, "embed_queries", self.embedder.embed)
        return embed([query])[0]  # (dim,)

    def dense(self, query: str, k: int) -> np.ndarray:
        return self._dense(self._embed(query), k)[1]

    @property
    def lexical_index(self) -> LexicalIndex:
        if self._lexical is None:
            self._lexical = LexicalIndex()
            self._lexical.add(range(len(self)), [self.text(r) for r in range(len(self))])
        return self._lexical

    def lexical(self, query: str, k: int) -> np.ndarray:
        return self.lexical_index.search(query, k)[1]

    def rank(self, mode: str, query: str, k: int) -> list[int]:
        """The k best rows for `query`, best first."""
        if mode == "hybrid":
            depth, q_vec, lex = fusion_depth(k), self._embed(query), self.lexical_index
            return fuse(
                self.fusion, self._dense(q_vec, depth), lex.search(query, depth), k,
                cosine_of=lambda rows: self.vectors[rows] @ q_vec,
                bm25_of=lambda rows: lex.score(query, rows),
                bm25_reference=lex.reference_score(query),
            )[1].tolist()
        if mode not in SEARCH_MODES:
            raise ValueError(f"unknown search mode {mode!r}; expected one of {SEARCH_MODES}")
        return getattr(self, mode)(query, k).tolist()
