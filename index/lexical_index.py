"""`LexicalIndex`: BM25 keyword search over a collection's chunks, in memory.

Dense (MiniLM) search finds chunks that are *about* a query; it misses the ones that share its rare
words but little of its topic (a pass key in an API reference, a product code, a name). BM25 over
the words finds those. The store keeps both and fuses them (`index.fusion`), as Qdrant, Elastic
and LlamaIndex's fusion retriever do.

An inverted index held in memory like the store's `MetadataIndex`, and like it derived from LMDB:
the store fills it from the stored chunk texts at open and mirrors every commit into it, so it
holds exactly LMDB's chunks with no file of its own to keep consistent. Per term, its postings are
growable arrays of (slot, term frequency); a query gathers its terms' postings and
scores them in numpy (Okapi BM25, k1 1.2, b 0.75, Lucene's idf), summing per chunk with one
`bincount` over dense slot numbers, so a query whose words are in most chunks costs milliseconds,
not a per-row scoring call (SQLite FTS5's bm25() took 143 ms at 100k chunks on such queries; see
the README). Removed chunks are masked and their postings dropped at the next compaction; until
then they still count in document frequencies, as Lucene's deleted documents do until a merge.

Analysis (Lucene's standard analyzer, with English stop words): Unicode words (`\\w+`), lower-cased;
no stemming. Stop words are neither indexed nor searched (a query of nothing but stop words
matches nothing). Memory: ~8 bytes per distinct term of a chunk (~0.3 KB per 64-token chunk).
Threads: reads (`search`, `score`, `reference_score`) only read, so any number may run at once;
a write must run alone (the store's collection lock: shared for searches, exclusive for commits).
"""
from __future__ import annotations

import re
from array import array
from collections import Counter
from typing import Iterable, Optional, Sequence

import numpy as np

# Lucene's English stop words (EnglishAnalyzer.ENGLISH_STOP_WORDS_SET) plus a few question words:
# they are in most chunks, so they cost the most to score and carry the least evidence.
STOP_WORDS = frozenset(
    "a an and are as at be but by for from has have how i if in into is it its me my no not of on or "
    "our so such than that the their them then there these they this those to was we were what when "
    "where which who whom why will with you your".split()
)
_WORD = re.compile(r"\w+", re.UNICODE)
K1, B = 1.2, 0.75


def terms(text: str) -> list[str]:
    """The indexed words of `text`, in order: lower-cased Unicode words, stop words dropped."""
    return [w for w in (m.lower() for m in _WORD.findall(text)) if w not in STOP_WORDS]


def query_terms(text: str) -> list[str]:
    """The distinct terms of a query, in order of first appearance."""
    return list(dict.fromkeys(terms(text)))


class _Postings:
    __slots__ = ("slots", "tf")

    def __init__(self) -> None:
        self.slots, self.tf = array("i"), array("f")


class LexicalIndex:
    """BM25 over chunk texts, keyed by chunk id."""

    def __init__(self) -> None:
        self._postings: dict[str, _Postings] = {}
        self._slot_of: dict[int, int] = {}  # live chunk id -> slot
        self._ids = array("q")  # slot -> chunk id
        self._alive = array("b")  # slot -> 1 live, 0 removed
        self._length = array("f")  # slot -> indexed words
        self._live_words = 0.0
        self._dead = 0

    def __len__(self) -> int:
        return len(self._slot_of)

    def __contains__(self, chunk_id: int) -> bool:
        return int(chunk_id) in self._slot_of

    def ids(self) -> np.ndarray:
        """Every chunk id held, ascending (int64)."""
        return np.array(sorted(self._slot_of), dtype=np.int64)

    def add(self, ids: Sequence[int], texts: Sequence[str]) -> None:
        if len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids but {len(texts)} texts")
        dup = [int(i) for i in ids if int(i) in self._slot_of]
        if dup or len(set(map(int, ids))) != len(ids):
            raise ValueError(f"chunk ids already held or repeated: {(dup or list(ids))[:5]}")
        for cid, text in zip(ids, texts):
            words = terms(text)
            slot = len(self._ids)
            self._ids.append(int(cid))
            self._alive.append(1)
            self._length.append(len(words))
            self._slot_of[int(cid)] = slot
            self._live_words += len(words)
            for term, tf in Counter(words).items():
                p = self._postings.get(term)
                if p is None:
                    p = self._postings[term] = _Postings()
                p.slots.append(slot)
                p.tf.append(tf)

    def remove(self, ids: Iterable[int]) -> None:
        """Forget chunks (unknown ids are ignored)."""
        for cid in ids:
            slot = self._slot_of.pop(int(cid), None)
            if slot is not None:
                self._alive[slot] = 0
                self._live_words -= self._length[slot]
                self._dead += 1
        if self._dead > max(1024, len(self._slot_of)):
            self._compact()

    def apply(self, add_ids: Sequence[int] = (), add_texts: Sequence[str] = (), remove_ids: Iterable[int] = ()) -> None:
        """Remove, then add: one commit's change."""
        self.remove(remove_ids)
        self.add(add_ids, add_texts)

    def _compact(self) -> None:
        """Drop removed chunks' postings and renumber the live slots densely."""
        alive = np.frombuffer(self._alive, dtype=np.int8).astype(bool)
        new_slot = np.cumsum(alive, dtype=np.int64) - 1  # old slot -> new slot (live ones)
        for term in list(self._postings):
            p = self._postings[term]
            slots = np.frombuffer(p.slots, dtype=np.int32)
            keep = alive[slots]
            if not keep.any():
                del self._postings[term]
                continue
            q = _Postings()
            q.slots.frombytes(new_slot[slots[keep]].astype(np.int32).tobytes())
            q.tf.frombytes(np.frombuffer(p.tf, dtype=np.float32)[keep].tobytes())
            self._postings[term] = q
        ids = np.frombuffer(self._ids, dtype=np.int64)[alive]
        self._ids = array("q", ids.tobytes())
        self._length = array("f", np.frombuffer(self._length, dtype=np.float32)[alive].tobytes())
        self._alive = array("b", bytes([1]) * len(ids))
        self._slot_of = {int(c): s for s, c in enumerate(ids.tolist())}
        self._dead = 0

    def reference_score(self, query: str | Sequence[str]) -> float:
        """What an average-length chunk holding each of the query's indexed terms once scores:
        the sum of their idfs (BM25's tf part is 1 at tf 1 and average length). BM25 over it is a
        query-independent scale: 1 is "the whole query, once each"; 0 if no term is indexed."""
        q_terms = query_terms(query) if isinstance(query, str) else query
        n_docs = len(self._ids)
        return float(sum(
            np.log1p((n_docs - len(p.slots) + 0.5) / (len(p.slots) + 0.5))
            for p in (self._postings.get(t) for t in q_terms) if p is not None
        ))

    def score(self, query: str | Sequence[str], ids: np.ndarray) -> np.ndarray:
        """BM25 of the given chunks for `query` (text or its `query_terms`) -> (n,) float32, as
        `search` scores them; 0 for a chunk sharing no term with it or not held. For hybrid
        search's candidates that BM25 did not rank."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        out = np.zeros(len(ids), np.float64)
        if not self._slot_of or len(ids) == 0:
            return out.astype(np.float32)
        q_terms = query_terms(query) if isinstance(query, str) else query
        n_docs = len(self._ids)
        avg_len = max(self._live_words / len(self._slot_of), 1e-6)
        chunk_length = np.frombuffer(self._length, dtype=np.float32)  # slot -> indexed words
        slots = np.array([self._slot_of.get(int(c), -1) for c in ids.tolist()], dtype=np.int64)  # (n,)
        for t in q_terms:
            p = self._postings.get(t)
            if p is None:
                continue
            sl = np.frombuffer(p.slots, dtype=np.int32)  # ascending: slots are appended in order
            pos = np.minimum(np.searchsorted(sl, slots), len(sl) - 1)
            hit = (slots >= 0) & (sl[pos] == slots)
            tf = np.frombuffer(p.tf, dtype=np.float32)[pos[hit]]
            length = chunk_length[slots[hit]]
            idf = np.log1p((n_docs - len(sl) + 0.5) / (len(sl) + 0.5))
            out[hit] += idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / avg_len))
        return out.astype(np.float32)

    def search(
        self, query: str | Sequence[str], k: int, allowed_ids: Optional[np.ndarray] = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k best chunks for `query` by BM25 -> (scores, ids), best first; fewer than k when
        fewer chunks share a term with it. `query` is text, or its `query_terms` already taken
        (the store analyses queries before it takes the collection lock). `allowed_ids`
        (ascending, as `MetadataIndex.select` gives them) restricts the ids."""
        n_docs = len(self._ids)  # removed-but-not-compacted chunks still count, as in Lucene
        q_terms = query_terms(query) if isinstance(query, str) else query
        lists = [self._postings[t] for t in q_terms if t in self._postings]
        if not lists or k <= 0 or not self._slot_of:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        avg_len = max(self._live_words / len(self._slot_of), 1e-6)
        chunk_length = np.frombuffer(self._length, dtype=np.float32)  # slot -> indexed words
        slots, weights = [], []
        for p in lists:
            sl = np.frombuffer(p.slots, dtype=np.int32)
            tf = np.frombuffer(p.tf, dtype=np.float32)
            length = chunk_length[sl]
            idf = np.log1p((n_docs - len(sl) + 0.5) / (len(sl) + 0.5))
            slots.append(sl)
            weights.append(idf * tf * (K1 + 1) / (tf + K1 * (1 - B + B * length / avg_len)))
        scores = np.bincount(np.concatenate(slots), weights=np.concatenate(weights), minlength=n_docs)
        scores[np.frombuffer(self._alive, dtype=np.int8) == 0] = 0
        cand = np.flatnonzero(scores > 0)
        ids = np.frombuffer(self._ids, dtype=np.int64)[cand]
        if allowed_ids is not None:
            allowed = np.asarray(allowed_ids, dtype=np.int64)
            pos = np.minimum(np.searchsorted(allowed, ids), max(len(allowed) - 1, 0))
            keep = allowed[pos] == ids if len(allowed) else np.zeros(len(ids), bool)
            cand, ids = cand[keep], ids[keep]
        s = scores[cand]
        if len(s) > k:
            top = np.argpartition(-s, k - 1)[:k]
            cand, ids, s = cand[top], ids[top], s[top]
        order = np.lexsort((ids, -s))  # best first; ties by chunk id
        return s[order].astype(np.float32), ids[order]
