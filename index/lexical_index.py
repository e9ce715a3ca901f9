"""`LexicalIndex`: BM25 keyword search over a collection's chunks, in an SQLite FTS5 table.

Dense (MiniLM) search finds chunks that are *about* a query; it misses the ones that share its rare
words but little of its topic (a pass key in an API reference, a product code, a name). BM25 over
the words finds those. The store keeps both and fuses them (`index.fusion`), as Qdrant, Elastic
and LlamaIndex's fusion retriever do.

SQLite's FTS5 (in Python's standard library; no new dependency) holds the inverted index on disk,
`collections/<name>/lexical.sqlite`, one row per chunk with rowid = chunk id, tokenized by
`unicode61` (Unicode word boundaries, case and diacritics folded) with Porter stemming. Like the
FAISS index it is derived from LMDB: chunk ids are never reused and a chunk's text never changes,
so the set of rowids says exactly what it holds, and `reconcile` (at open) brings it to LMDB's
chunks by adding the missing ids and removing the gone ones. WAL journal with synchronous=NORMAL:
a killed process loses nothing committed; a power cut may lose the last commits, which
`reconcile` puts back.

Queries are free text: the words (`\\w+`) less a short English stop-word list (kept if nothing
else is left), each quoted, OR-ed. Not thread-safe: the store calls it under the collection lock.
"""
from __future__ import annotations

import re
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

# Common English function words: they match most chunks (making FTS5 score nearly every row for
# nothing) and carry no evidence BM25 would use.
STOP_WORDS = frozenset(
    "a an and are as at be but by for from has have how i if in into is it its me my no not of on or "
    "our so than that the their them then there these they this those to was we were what when where "
    "which who whom why will with you your".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)
# Below this many allowed ids a filtered search joins them in SQL; above, it pages through the
# ranked matches and drops the disallowed (a large allowed set rarely needs a second page).
_JOIN_FILTER_BELOW = 20_000


def query_terms(text: str) -> list[str]:
    """The words of `text` that a lexical search matches on: lower-cased, stop words dropped
    (unless nothing else is left), duplicates dropped, in order of first appearance."""
    words = [w.lower() for w in _WORD.findall(text)]
    kept = [w for w in words if w not in STOP_WORDS] or words
    return list(dict.fromkeys(kept))


def match_expression(terms: Sequence[str]) -> str:
    """An FTS5 MATCH string: the terms quoted (so no word is read as an operator), OR-ed."""
    return " OR ".join('"' + t.replace('"', '""') + '"' for t in terms)


class LexicalIndex:
    """BM25 over chunk texts. `path=None` keeps it in memory (benchmarks, tests)."""

    def __init__(self, path: Optional[Union[str, Path]] = None) -> None:
        self.path = Path(path) if path is not None else None
        self._db = sqlite3.connect(
            str(path) if path is not None else ":memory:", check_same_thread=False, isolation_level=None
        )
        if path is not None:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(
            "CREATE VIRTUAL TABLE IF NOT EXISTS chunks USING fts5(text, tokenize='porter unicode61 remove_diacritics 2')"
        )
        self._db.execute("CREATE TEMP TABLE allowed (id INTEGER PRIMARY KEY)")

    def close(self) -> None:
        self._db.close()

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM chunks").fetchone()[0])

    def ids(self) -> np.ndarray:
        """Every chunk id held, ascending (int64)."""
        rows = self._db.execute("SELECT rowid FROM chunks ORDER BY rowid").fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def apply(
        self, add_ids: Sequence[int] = (), add_texts: Sequence[str] = (), remove_ids: Iterable[int] = ()
    ) -> None:
        """Remove, then add, in one transaction (all of it or none)."""
        if len(add_ids) != len(add_texts):
            raise ValueError(f"{len(add_ids)} ids but {len(add_texts)} texts")
        with self._transaction():
            self._db.executemany("DELETE FROM chunks WHERE rowid = ?", ((int(i),) for i in remove_ids))
            self._db.executemany(
                "INSERT INTO chunks (rowid, text) VALUES (?, ?)", ((int(i), t) for i, t in zip(add_ids, add_texts))
            )

    def add(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        self.apply(ids, texts)

    def remove(self, ids: Iterable[int]) -> None:
        self.apply(remove_ids=ids)

    def reconcile(self, stored_ids: np.ndarray, read_texts) -> tuple[int, int]:
        """Make the index hold exactly `stored_ids` (ascending): drop ids not among them, add the
        missing ones with `read_texts(ids) -> list[str]`. Returns (added, removed)."""
        held = self.ids()
        gone = np.setdiff1d(held, stored_ids, assume_unique=True)
        missing = np.setdiff1d(stored_ids, held, assume_unique=True)
        if len(gone):
            self.remove(gone.tolist())
        for lo in range(0, len(missing), 4096):
            part = missing[lo : lo + 4096].tolist()
            self.add(part, read_texts(part))
        return len(missing), len(gone)

    def search(self, query: str, k: int, allowed_ids: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
        """The k best chunks for `query` by BM25 -> (scores, ids), best first; fewer than k when
        fewer chunks share a word with the query. Scores are FTS5's bm25() negated (higher is
        better; comparable within one query only). `allowed_ids` restricts the ids returned."""
        terms = query_terms(query)
        if not terms or k <= 0:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        expr = match_expression(terms)
        if allowed_ids is None:
            rows = self._db.execute(
                "SELECT rowid, bm25(chunks) FROM chunks WHERE chunks MATCH ? ORDER BY rank LIMIT ?", (expr, int(k))
            ).fetchall()
        elif len(allowed_ids) < _JOIN_FILTER_BELOW:
            with self._transaction():
                self._db.execute("DELETE FROM temp.allowed")
                self._db.executemany("INSERT OR IGNORE INTO temp.allowed VALUES (?)", ((int(i),) for i in allowed_ids))
                rows = self._db.execute(
                    "SELECT rowid, bm25(chunks) FROM chunks WHERE chunks MATCH ? "
                    "AND rowid IN (SELECT id FROM temp.allowed) ORDER BY rank LIMIT ?",
                    (expr, int(k)),
                ).fetchall()
        else:
            allowed = set(np.asarray(allowed_ids).tolist())
            rows, limit, offset = [], 4 * int(k), 0
            while len(rows) < k:
                page = self._db.execute(
                    "SELECT rowid, bm25(chunks) FROM chunks WHERE chunks MATCH ? ORDER BY rank LIMIT ? OFFSET ?",
                    (expr, limit, offset),
                ).fetchall()
                rows += [r for r in page if r[0] in allowed]
                if len(page) < limit:
                    break
                offset += limit
                limit *= 2
            rows = rows[:k]
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        scores = np.fromiter((-r[1] for r in rows), dtype=np.float32, count=len(rows))
        return scores, ids

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
