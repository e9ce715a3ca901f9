"""One lifecycle for everything derived from LMDB (Chroma's `max_seqid` rule, as Qdrant's segments
follow it too): the store's FAISS, metadata and BM25 indexes (`index.derived_indexes`), a memory
mode's derived memory (knn's KV memory, `memlm.modes.knn.memories`), and whatever comes later.

Each derived structure knows the last oplog seq it holds durably (its watermark), takes a `Change`
(the effect of one committed write, or the net effect of the oplog entries past its watermark) and
can be rebuilt from LMDB at any time. `bring_up_to_date` is the one rule: replay the oplog past the
watermark while the oplog still reaches back, else rebuild. The oplog is kept back to the lowest
durable watermark, so a structure with files replays at open instead of rebuilding; one that lives
in memory only has no watermark (-1), rebuilds at open, and never holds the oplog back.
This module only describes the lifecycle: it imports no LMDB, FAISS or model code.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, TypeVar

import numpy as np

from memlm.index.types import Metadata

OplogEntry = tuple[int, Sequence[int], Sequence[int]]  # (seq, added chunk ids, removed chunk ids)
# (after_seq, upto_seq) -> the entries after_seq < seq <= upto_seq in order, or None when some are
# gone (truncated): `MemoryStore.changes`, `RemoteStore.changes`.
ChangeFeed = Callable[[int, int], Optional[Sequence[OplogEntry]]]


@dataclass(frozen=True)
class ChangePayload:
    """What the in-process write path has in hand of a change's chunks, so that applying it reads
    nothing back from LMDB. A replay from the oplog has only chunk ids (the oplog records no more)."""

    vectors: np.ndarray  # (len(added), dim) float32; row i is added[i]'s embedding
    texts: Sequence[str]  # (len(added),) chunk texts
    documents: Sequence[tuple[Sequence[int], Metadata]]  # (chunk ids, metadata) per written document
    removed_documents: Sequence[tuple[Sequence[int], Metadata]]  # (chunk ids, old metadata) per deleted/replaced one


@dataclass(frozen=True)
class Change:
    """The effect on a collection's chunks of the oplog entries up to `seq`: chunks `removed`, then
    chunks `added` (chunk ids are never reused, so the order within a change never matters)."""

    seq: int
    added: np.ndarray  # (n,) int64 chunk ids, still stored at `seq`
    removed: np.ndarray  # (m,) int64 chunk ids
    payload: Optional[ChangePayload] = None  # None: replayed from the oplog (ids only)

    @classmethod
    def net(cls, seq: int, entries: Iterable[OplogEntry]) -> "Change":
        """The net effect of consecutive oplog entries ending at `seq`: every chunk any of them
        removed, and the chunks they added that none removed. Applying it is the same as applying
        the entries one by one (ids are never reused), and it never needs a chunk that a later
        entry deleted (an HNSW rebuild mid-replay would ask LMDB for its vector)."""
        entries = list(entries)
        removed = [int(c) for _seq, _add, rem in entries for c in rem]
        gone = set(removed)
        added = [int(c) for _seq, add, _rem in entries for c in add if int(c) not in gone]
        return cls(seq, np.asarray(added, dtype=np.int64), np.asarray(removed, dtype=np.int64))


class DerivedStructure(ABC):
    """A structure derived from one collection's LMDB data. The store calls every method with the
    collection's lock held exclusively (searches, which only read, share it)."""

    name: str  # what it is, for logs ("vector index")
    built_from: str  # what `rebuild` reads, for logs ("stored vectors")
    durable: bool = False  # whether `applied_seq` survives a restart (the structure has files)

    @property
    def applied_seq(self) -> int:
        """The durable watermark: every oplog entry up to it is in the structure's files, and a
        restart resumes from it. -1: nothing on disk holds the current state (always, for a
        structure in memory only; for one with files, until `save`)."""
        return -1

    def load(self, last_seq: int) -> None:
        """Read what the structure's files hold, ignoring any newer than `last_seq` (a dropped
        namesake's), and set `applied_seq` to their seq (-1: none usable). In memory only: nothing."""

    @abstractmethod
    def apply(self, change: Change) -> None:
        """Mirror a change. Structures in memory only need its payload (they are rebuilt, never
        replayed into: they have no watermark to replay past)."""

    @abstractmethod
    def rebuild(self) -> None:
        """Replace the contents by what the collection's LMDB data holds now."""

    def save(self, seq: int) -> None:
        """Make the current state durable as of `seq` (then `applied_seq == seq`). In memory only: nothing."""

    @abstractmethod
    def drop(self) -> None:
        """Forget the contents and delete the structure's files (its collection is dropped)."""

    @abstractmethod
    def ids(self) -> np.ndarray:
        """Every chunk id held, ascending (int64): recovery compares it with LMDB's."""

    @abstractmethod
    def __len__(self) -> int:
        """Chunks held."""


R = TypeVar("R")


def bring_up_to_date(
    applied_seq: int, last_seq: int, changes: ChangeFeed, apply: Callable[[Change], R], rebuild: Callable[[], R]
) -> Optional[R]:
    """The one rule: a structure at watermark `applied_seq` is brought to `last_seq` (the
    collection's newest oplog seq) by `apply` of the net change past its watermark if the oplog
    still reaches back, else by `rebuild` (also for a watermark that is unknown, -1, or ahead of
    the log: a dropped namesake's). In step it costs nothing and reads nothing: None."""
    if applied_seq == last_seq:
        return None
    entries = changes(applied_seq, last_seq) if 0 <= applied_seq < last_seq else None
    return rebuild() if entries is None else apply(Change.net(last_seq, entries))
