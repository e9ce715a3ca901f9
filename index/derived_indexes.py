"""The memory store's three derived indexes of a collection, each a `DerivedStructure`
(`index.derived`): the FAISS `VectorIndex` with its snapshot files, the `MetadataIndex` and the BM25
`LexicalIndex`. The classes wrapped keep their own APIs; these add the lifecycle.

Only the vector index is durable: `collections/<name>/index-<seq>.faiss` holds every oplog entry up
to `seq` (its watermark), so at open it loads the newest file and replays the oplog past it. The
metadata and lexical indexes live in memory only: they are rebuilt from LMDB at open (their
watermark is -1: they never hold the oplog back) and mirror each commit from what the write path
has in hand.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np

from memlm.index.derived import Change, ChangePayload, DerivedStructure
from memlm.index.filters import MetadataIndex
from memlm.index.lexical_index import LexicalIndex
from memlm.index.lmdb_store import Commit, LmdbStore, PreparedDocument
from memlm.index.types import CollectionConfig
from memlm.index.vector_index import IndexFileError, VectorIndex

log = logging.getLogger(__name__)

_INDEX_FILE_RE = re.compile(r"index-(\d{16})\.faiss")
_READ_BATCH = 4096  # chunks read from LMDB per step of a rebuild


def commit_change(commit: Commit, prepared: Sequence[PreparedDocument] = ()) -> Change:
    """A committed write as a `Change` carrying what the write path has in hand (`prepared`: what
    was written, in the order of `commit.written`; empty for a delete)."""
    added = np.asarray([cid for w in commit.written for cid in w.chunk_ids], dtype=np.int64)
    removed = np.asarray([cid for _doc_id, old in commit.removed for cid in old.chunk_ids], dtype=np.int64)
    payload = ChangePayload(
        vectors=np.concatenate([p.vectors for p in prepared]) if prepared else np.zeros((0, 0), np.float32),
        texts=[c.text for p in prepared for c in p.chunks],
        documents=[(w.chunk_ids, p.doc.metadata) for w, p in zip(commit.written, prepared)],
        removed_documents=[(old.chunk_ids, old.metadata) for _doc_id, old in commit.removed],
    )
    return Change(commit.seq, added, removed, payload)


class DerivedVectorIndex(DerivedStructure):
    """The collection's FAISS index (`index`; None until loaded or rebuilt) and its snapshot files."""

    name = "vector index"
    built_from = "stored vectors"
    durable = True

    def __init__(self, lmdb: LmdbStore, config: CollectionConfig, folder: Path, exact_filter_below: int) -> None:
        self._lmdb, self._config, self._folder = lmdb, config, folder
        self._exact_filter_below = exact_filter_below
        self.index: Optional[VectorIndex] = None
        self._applied_seq = -1  # the seq of the file `index` was loaded from or saved to

    @property
    def applied_seq(self) -> int:
        return self._applied_seq

    def _fetch(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of chunk ids, (n,) -> (n, dim): brute-force filtered search and HNSW rebuilds."""
        found, vecs = self._lmdb.read_vectors(self._config.name, ids, self._config.dim)
        if len(found) != len(ids):
            missing = sorted(set(np.asarray(ids).tolist()) - set(found.tolist()))
            raise RuntimeError(f"collection {self._config.name!r}: no stored vector for chunk ids {missing[:10]}")
        return vecs

    def _files(self) -> list[tuple[int, Path]]:
        """(seq, path) of the snapshot files, newest first."""
        if not self._folder.is_dir():
            return []
        found = ((int(m.group(1)), p) for p in self._folder.iterdir() if (m := _INDEX_FILE_RE.fullmatch(p.name)))
        return sorted(found, reverse=True)

    def load(self, last_seq: int) -> None:
        """The newest file that loads and is of the collection's factory (an older one may be left
        by a reindex cut short)."""
        self.index, self._applied_seq = None, -1
        name = self._config.name
        for seq, path in self._files():
            if seq > last_seq:  # cannot belong to this collection's history (a dropped namesake's)
                log.warning("collection %r: ignoring index file %s from the future (last seq %d)", name, path, last_seq)
                continue
            try:
                index = VectorIndex.load(path, self._fetch)
                if index.factory != self._config.index_factory:
                    raise IndexFileError(f"it holds a {index.factory!r} index, the collection uses {self._config.index_factory!r}")
            except (IndexFileError, RuntimeError) as e:
                log.warning("collection %r: cannot load %s (%s); trying an older one", name, path, e)
                continue
            index.exact_filter_below = self._exact_filter_below
            self.index, self._applied_seq = index, seq
            return

    def apply(self, change: Change) -> None:
        if len(change.removed):
            self.index.remove(change.removed)
        if not len(change.added):
            return
        if change.payload is not None:
            self.index.add(change.added, change.payload.vectors)
            return
        # A replay: vectors from LMDB, skipping chunks the file already holds and chunks deleted since.
        new = np.array([c for c in change.added.tolist() if c not in self.index], dtype=np.int64)
        found, vecs = self._lmdb.read_vectors(self._config.name, new, self._config.dim)
        self.index.add(found, vecs)

    def rebuild(self) -> None:
        index = VectorIndex(
            self._config.dim, self._config.index_factory, self._fetch, exact_filter_below=self._exact_filter_below
        )
        ids = self._lmdb.chunk_ids(self._config.name)
        for lo in range(0, len(ids), _READ_BATCH):
            found, vecs = self._lmdb.read_vectors(self._config.name, ids[lo : lo + _READ_BATCH], self._config.dim)
            index.add(found, vecs)
        self.index, self._applied_seq = index, -1  # no file holds it until `save`

    def save(self, seq: int) -> None:
        """Write `index-<seq>.faiss` (atomic and fsynced, by `VectorIndex.save`), then delete the
        older files (and any left by a save cut short). A crash between leaves both; the newest loads."""
        path = self._folder / f"index-{seq:016d}.faiss"
        if seq == self._applied_seq and path.exists():
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        self.index.save(path)
        self._applied_seq = seq
        self._delete_files(keep=path)

    def drop(self) -> None:
        self.index, self._applied_seq = None, -1
        self._delete_files()

    def _delete_files(self, keep: Optional[Path] = None) -> None:
        for p in self._folder.iterdir() if self._folder.is_dir() else ():
            if p != keep and (_INDEX_FILE_RE.fullmatch(p.name) or p.name.endswith(".faiss.tmp")):
                p.unlink(missing_ok=True)

    def ids(self) -> np.ndarray:
        return self.index.ids() if self.index is not None else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return self.index.ntotal if self.index is not None else 0


class _InMemoryIndex(DerivedStructure):
    """A derived index in memory only (`index`, of class `wrapped`): no files and no watermark."""

    wrapped: type

    def __init__(self, lmdb: LmdbStore, collection: str) -> None:
        self._lmdb, self._collection = lmdb, collection
        self.index = self.wrapped()

    def _payload(self, change: Change) -> ChangePayload:
        """What it applies; a replay (ids only) cannot be applied: with no watermark, it is never replayed into."""
        if change.payload is None:
            raise ValueError(
                f"the {self.name} lives in memory only and cannot replay oplog entries (they record chunk ids, "
                f"not {self.built_from}); rebuild it"
            )
        return change.payload

    def drop(self) -> None:
        self.index = self.wrapped()

    def __len__(self) -> int:
        return len(self.index)


class DerivedMetadataIndex(_InMemoryIndex):
    """The collection's `MetadataIndex`."""

    name = "metadata index"
    built_from = "stored document headers"
    wrapped = MetadataIndex

    def apply(self, change: Change) -> None:
        payload = self._payload(change)
        for chunk_ids, metadata in payload.removed_documents:
            self.index.remove(chunk_ids, metadata)
        for chunk_ids, metadata in payload.documents:
            self.index.add(chunk_ids, metadata)

    def rebuild(self) -> None:
        index = MetadataIndex()
        for _doc_id, header in self._lmdb.iter_doc_headers(self._collection):
            index.add(header.chunk_ids, header.metadata)
        self.index = index

    def ids(self) -> np.ndarray:
        return self.index.select(None)


class DerivedLexicalIndex(_InMemoryIndex):
    """The collection's BM25 `LexicalIndex`."""

    name = "lexical index"
    built_from = "stored chunk texts"
    wrapped = LexicalIndex

    def apply(self, change: Change) -> None:
        self.index.apply(change.added.tolist(), self._payload(change).texts, change.removed.tolist())

    def rebuild(self) -> None:
        index = LexicalIndex()
        ids: list[int] = []
        texts: list[str] = []
        for cid, text in self._lmdb.iter_chunk_texts(self._collection):
            ids.append(cid)
            texts.append(text)
            if len(ids) == _READ_BATCH:
                index.add(ids, texts)
                ids, texts = [], []
        index.add(ids, texts)
        self.index = index

    def ids(self) -> np.ndarray:
        return self.index.ids()


class StoreIndexes(NamedTuple):
    """A collection's derived structures in the store: iterate for the lifecycle, name one to search."""

    vectors: DerivedVectorIndex
    metadata: DerivedMetadataIndex
    lexical: DerivedLexicalIndex

    @classmethod
    def empty(cls, lmdb: LmdbStore, config: CollectionConfig, folder: Path, exact_filter_below: int) -> "StoreIndexes":
        """Unloaded and unbuilt (nothing touches FAISS yet: the factory may be one it cannot serve)."""
        return cls(
            DerivedVectorIndex(lmdb, config, folder, exact_filter_below),
            DerivedMetadataIndex(lmdb, config.name),
            DerivedLexicalIndex(lmdb, config.name),
        )
