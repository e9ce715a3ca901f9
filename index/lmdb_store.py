"""The durable half of the memory store: one LMDB environment holding every collection.

Layout of `data_dir/store.lmdb` (named databases):
  `_collections`         name -> JSON {config, next_chunk_id, next_op_seq, oplog_floor, watermarks}
  `<name>/docs`          doc id (UTF-8) -> doc record: b"D1", u32 header length, JSON header
                         {metadata, chunk_ids, updated_at}, then the text as UTF-8. The header comes
                         first so metadata reads (search hits, the filter index at open) skip the text.
  `<name>/chunks`        u64 big-endian chunk id -> u32 header length, JSON {d: doc id, i: chunk index,
                         s: start, e: end, t: text}, then the LM token ids as little-endian int32.
  `<name>/vectors`       u64 big-endian chunk id -> float32 embedding (kept so the FAISS index can be
                         rebuilt or replayed without re-embedding).
  `<name>/oplog`         u64 big-endian seq -> JSON {"add": [chunk ids], "remove": [chunk ids]}.

Every write path is a method marked `# WRITE`; each is ONE LMDB write transaction, and the
environment is opened with sync and metasync on, so a returned commit is on disk (fsync) and a crash
before it leaves nothing of it. Chunk ids and oplog seqs come from counters in the collection record,
bumped in the same transaction, so they are never reused. An exclusive `flock` on `data_dir/LOCK`
keeps a second process (or a second store in this process) out of the same data dir.
Limits: LMDB keys are at most 511 bytes (doc ids are capped below that); one writer at a time for the
whole environment; the map size caps the total data size.
"""
from __future__ import annotations

import fcntl
import json
import os
import struct
import threading
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import lmdb
import numpy as np

from memlm.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted, Unavailable
from memlm.index.types import Chunk, CollectionConfig, Document, Metadata

_COLLECTIONS_DB = b"_collections"
_PARTS = ("docs", "chunks", "vectors", "oplog")
STOPPED = "server is shutting down; nothing from this call was stored"
# LMDB opens a fixed number of named DBs (it looks handles up linearly, so not unbounded): four per
# collection plus `_collections`. store.max_collections (at most this) is checked before LMDB's own limit.
MAX_COLLECTIONS = 4096
MAX_DBS = len(_PARTS) * MAX_COLLECTIONS + 8


def u64(n: int) -> bytes:
    return struct.pack(">Q", n)  # big-endian keeps LMDB's byte order equal to numeric order


def from_u64(b: bytes) -> int:
    return struct.unpack(">Q", b)[0]


# ---------------------------------------------------------------- record encodings


@dataclass
class CollectionRecord:
    config: CollectionConfig
    next_chunk_id: int = 0
    next_op_seq: int = 1  # seq 0 means "nothing logged yet"
    # Entries with seq <= oplog_floor have been truncated: a reader that has applied less than the
    # floor cannot replay, it must rebuild from the stored chunks.
    oplog_floor: int = 0
    # Durable applied-seq watermarks of the derived structures kept outside the store (a memory
    # mode's, e.g. "knn"), as they report them; the oplog is kept back to the lowest.
    watermarks: dict[str, int] = field(default_factory=dict)

    @property
    def last_seq(self) -> int:
        return self.next_op_seq - 1

    def encode(self) -> bytes:
        return json.dumps({
            "config": asdict(self.config), "next_chunk_id": self.next_chunk_id, "next_op_seq": self.next_op_seq,
            "oplog_floor": self.oplog_floor, "watermarks": self.watermarks,
        }).encode()

    @classmethod
    def decode(cls, raw: bytes) -> "CollectionRecord":
        obj = json.loads(raw)
        # Records written before the floor was kept: assume everything below the first entry is gone.
        return cls(CollectionConfig.from_dict(obj["config"]), obj["next_chunk_id"], obj["next_op_seq"],
                   obj.get("oplog_floor", -1), obj.get("watermarks", {}))


@dataclass(frozen=True)
class DocHeader:
    metadata: Metadata
    chunk_ids: tuple[int, ...]
    updated_at: float


def encode_doc(text: str, header: DocHeader) -> bytes:
    h = json.dumps({"metadata": header.metadata, "chunk_ids": list(header.chunk_ids), "updated_at": header.updated_at}).encode()
    return b"D1" + struct.pack("<I", len(h)) + h + text.encode("utf-8")


def decode_doc_header(raw: bytes) -> DocHeader:
    (n,) = struct.unpack_from("<I", raw, 2)
    obj = json.loads(bytes(raw[6 : 6 + n]))
    return DocHeader(obj["metadata"], tuple(obj["chunk_ids"]), obj["updated_at"])


def decode_doc(raw: bytes) -> tuple[str, DocHeader]:
    (n,) = struct.unpack_from("<I", raw, 2)
    return bytes(raw[6 + n :]).decode("utf-8"), decode_doc_header(raw)


@dataclass(frozen=True)
class ChunkRecord:
    doc_id: str
    chunk_index: int
    start: int
    end: int
    text: str
    token_ids: np.ndarray  # (n,) int32


def encode_chunk(doc_id: str, index: int, chunk: Chunk) -> bytes:
    h = json.dumps({"d": doc_id, "i": index, "s": chunk.start, "e": chunk.end, "t": chunk.text}).encode()
    return struct.pack("<I", len(h)) + h + np.asarray(chunk.token_ids, dtype="<i4").tobytes()


def decode_chunk(raw: bytes) -> ChunkRecord:
    (n,) = struct.unpack_from("<I", raw, 0)
    obj = json.loads(bytes(raw[4 : 4 + n]))
    tokens = np.frombuffer(bytes(raw[4 + n :]), dtype="<i4").astype(np.int32)
    return ChunkRecord(obj["d"], obj["i"], obj["s"], obj["e"], obj["t"], tokens)


# ---------------------------------------------------------------- what writes report back


@dataclass(frozen=True)
class PreparedDocument:
    """A validated document, chunked and embedded, ready to write."""

    doc: Document
    chunks: list[Chunk]
    vectors: np.ndarray  # (len(chunks), dim) float32


@dataclass(frozen=True)
class WrittenDocument:
    doc_id: str
    chunk_ids: tuple[int, ...]
    replaced: Optional[DocHeader]  # the previous version's header when this was an upsert


@dataclass
class Commit:
    """What one write transaction did, for the in-memory indexes to follow."""

    seq: int
    written: list[WrittenDocument] = field(default_factory=list)
    removed: list[tuple[str, DocHeader]] = field(default_factory=list)  # (doc id, old header) of deletes/replacements


@dataclass
class _Dbs:
    docs: Any
    chunks: Any
    vectors: Any
    oplog: Any


class LmdbStore:
    def __init__(self, data_dir: Path, map_size_bytes: int) -> None:
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.data_dir / "LOCK", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.seek(0)
            holder = self._lock_file.read().strip() or "unknown"
            self._lock_file.close()
            raise FailedPrecondition(
                f"data dir {self.data_dir} is already open in another memlm store (lock held by pid {holder}); "
                "stop that process or use another data dir"
            ) from None
        self._lock_file.seek(0)
        self._lock_file.truncate()
        self._lock_file.write(str(os.getpid()))
        self._lock_file.flush()

        # sync/metasync on: commit returns only after fsync, which is what acknowledges a write.
        # Owner-only modes: LMDB would make its folder with the file mode (no x bit), so it is made here.
        (self.data_dir / "store.lmdb").mkdir(mode=0o700, exist_ok=True)
        self.env = lmdb.open(
            str(self.data_dir / "store.lmdb"),
            mode=0o600,
            map_size=int(map_size_bytes),
            max_dbs=MAX_DBS,
            max_readers=1024,
            subdir=True,
            sync=True,
            metasync=True,
            readahead=False,
        )
        self._handles_lock = threading.Lock()  # dbi opens must not run concurrently (LMDB rule)
        self._dbs: dict[str, _Dbs] = {}
        with self._handles_lock, self.env.begin(write=True) as txn:
            self._collections = self.env.open_db(_COLLECTIONS_DB, txn=txn, create=True)
            for key, _ in txn.cursor(db=self._collections):
                name = bytes(key).decode()
                self._dbs[name] = self._open_dbs(name, txn)

    def _open_dbs(self, name: str, txn: lmdb.Transaction) -> _Dbs:
        return _Dbs(*(self.env.open_db(f"{name}/{part}".encode(), txn=txn, create=True) for part in _PARTS))

    def dbs(self, name: str) -> _Dbs:
        d = self._dbs.get(name)
        if d is None:
            raise NotFound(f"collection {name!r} does not exist")
        return d

    def close(self) -> None:
        self.env.close()
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_UN)
        finally:
            self._lock_file.close()

    # ---------------------------------------------------------------- collections

    def records(self) -> dict[str, CollectionRecord]:
        with self.env.begin() as txn:
            return {bytes(k).decode(): CollectionRecord.decode(v) for k, v in txn.cursor(db=self._collections)}

    def record(self, name: str, txn: Optional[lmdb.Transaction] = None) -> CollectionRecord:
        """The collection's record, read in `txn` (a write transaction about to bump its counters)
        or in a read transaction of its own."""
        if txn is None:
            with self.env.begin() as own:
                return self.record(name, own)
        raw = txn.get(name.encode(), db=self._collections)
        if raw is None:
            raise NotFound(f"collection {name!r} does not exist")
        return CollectionRecord.decode(raw)

    def create_collection(self, config: CollectionConfig) -> None:  # WRITE
        """Durable: the record and the empty named DBs commit together."""
        with self._handles_lock, self.env.begin(write=True) as txn:
            if txn.get(config.name.encode(), db=self._collections) is not None:
                raise AlreadyExists(f"collection {config.name!r} already exists")
            txn.put(config.name.encode(), CollectionRecord(config).encode(), db=self._collections)
            try:
                dbs = self._open_dbs(config.name, txn)
            except lmdb.DbsFullError:  # the transaction aborts: nothing of the collection is stored
                raise ResourceExhausted(
                    f"the store holds as many collections as LMDB can open ({MAX_COLLECTIONS}); drop one first"
                ) from None
        self._dbs[config.name] = dbs

    def set_index_factory(self, name: str, factory: str) -> CollectionConfig:  # WRITE
        """Record a new index factory for the collection (its counters and data unchanged)."""
        with self.env.begin(write=True) as txn:
            rec = self.record(name, txn)
            rec.config = replace(rec.config, index_factory=factory)
            txn.put(name.encode(), rec.encode(), db=self._collections)
        return rec.config

    def drop_collection(self, name: str) -> None:  # WRITE
        """Durable: the record and all four DBs go in one transaction. The caller holds the
        collection's lock so no other thread uses the handles being deleted."""
        with self._handles_lock:
            dbs = self.dbs(name)
            with self.env.begin(write=True) as txn:
                if not txn.delete(name.encode(), db=self._collections):
                    raise NotFound(f"collection {name!r} does not exist")
                for part in _PARTS:
                    txn.drop(getattr(dbs, part), delete=True)
            del self._dbs[name]

    # ---------------------------------------------------------------- documents and chunks: writes

    def write_ingest(self, name: str, prepared: Sequence[PreparedDocument], now: float) -> Commit:  # WRITE
        """Store documents, replacing earlier versions of the same ids, in ONE transaction with one
        oplog entry. Durable when it returns; nothing of it exists if it raises."""
        dbs = self.dbs(name)
        try:
            return self._write_ingest(name, dbs, prepared, now)
        except lmdb.MapFullError:  # the transaction aborted: nothing of it is stored
            raise ResourceExhausted(
                f"the store's LMDB map ({self.env.info()['map_size'] / 2**30:.1f} GiB, store.map_size_gib) is full; "
                "nothing from this call was stored: raise store.map_size_gib and restart, or delete documents"
            ) from None

    def _write_ingest(self, name: str, dbs: _Dbs, prepared: Sequence[PreparedDocument], now: float) -> Commit:
        with self.env.begin(write=True) as txn:
            rec = self.record(name, txn)
            commit = Commit(seq=rec.next_op_seq)
            added: list[int] = []
            removed: list[int] = []
            for p in prepared:
                key = p.doc.id.encode()
                old_raw = txn.get(key, db=dbs.docs)
                old = decode_doc_header(old_raw) if old_raw is not None else None
                if old is not None:
                    self._delete_chunks(txn, dbs, old.chunk_ids)
                    removed.extend(old.chunk_ids)
                    commit.removed.append((p.doc.id, old))
                ids = tuple(range(rec.next_chunk_id, rec.next_chunk_id + len(p.chunks)))
                rec.next_chunk_id += len(p.chunks)
                vectors = np.ascontiguousarray(p.vectors, dtype="<f4")
                for i, (cid, chunk) in enumerate(zip(ids, p.chunks)):
                    txn.put(u64(cid), encode_chunk(p.doc.id, i, chunk), db=dbs.chunks)
                    txn.put(u64(cid), vectors[i].tobytes(), db=dbs.vectors)
                header = DocHeader(dict(p.doc.metadata), ids, now)
                txn.put(key, encode_doc(p.doc.text, header), db=dbs.docs)
                added.extend(ids)
                commit.written.append(WrittenDocument(p.doc.id, ids, old))
            txn.put(u64(commit.seq), json.dumps({"add": added, "remove": removed}).encode(), db=dbs.oplog)
            rec.next_op_seq += 1
            txn.put(name.encode(), rec.encode(), db=self._collections)
        return commit

    def write_delete(
        self, name: str, doc_ids: Optional[Sequence[str]], should_stop: Callable[[], bool] = lambda: False,
        matching: Optional[Callable[[Metadata], bool]] = None,
    ) -> Commit:  # WRITE
        """Delete documents with their chunks and vectors, plus one oplog entry, in ONE transaction:
        those of `doc_ids` that are stored (unknown ids are skipped), or with `doc_ids` None every
        document, read in this transaction; with `matching`, only those whose metadata it accepts.
        When none goes nothing is written (seq is then 0). When `should_stop()` turns true
        (checked every 256 documents and before the commit) the transaction is aborted and
        Unavailable raised: nothing is deleted."""
        dbs = self.dbs(name)

        def stored(txn: lmdb.Transaction) -> Iterator[tuple[str, DocHeader]]:
            if doc_ids is None:
                for key, raw in txn.cursor(db=dbs.docs):
                    yield bytes(key).decode(), decode_doc_header(raw)
                return
            for doc_id in dict.fromkeys(doc_ids):  # de-duplicated, order kept
                raw = txn.get(doc_id.encode(), db=dbs.docs)
                if raw is not None:
                    yield doc_id, decode_doc_header(raw)

        with self.env.begin(write=True) as txn:  # an exception inside aborts the transaction
            rec = self.record(name, txn)
            commit = Commit(seq=0)
            doomed: list[tuple[str, DocHeader]] = []  # found first: no cursor walks what is being deleted
            for n, (doc_id, header) in enumerate(stored(txn)):
                if n % 256 == 0 and should_stop():
                    raise Unavailable(STOPPED)
                if matching is None or matching(header.metadata):
                    doomed.append((doc_id, header))
            removed: list[int] = []
            for n, (doc_id, old) in enumerate(doomed):
                if n % 256 == 0 and should_stop():
                    raise Unavailable(STOPPED)
                self._delete_chunks(txn, dbs, old.chunk_ids)
                txn.delete(doc_id.encode(), db=dbs.docs)
                removed.extend(old.chunk_ids)
                commit.removed.append((doc_id, old))
            if not commit.removed:
                return commit  # the with-block commits an empty transaction: harmless
            commit.seq = rec.next_op_seq
            txn.put(u64(commit.seq), json.dumps({"add": [], "remove": removed}).encode(), db=dbs.oplog)
            rec.next_op_seq += 1
            txn.put(name.encode(), rec.encode(), db=self._collections)
            if should_stop():
                raise Unavailable(STOPPED)
        return commit

    @staticmethod
    def _delete_chunks(txn: lmdb.Transaction, dbs: _Dbs, chunk_ids: Sequence[int]) -> None:
        for cid in chunk_ids:
            txn.delete(u64(cid), db=dbs.chunks)
            txn.delete(u64(cid), db=dbs.vectors)

    def truncate_oplog(self, name: str, upto_seq: int) -> int:  # WRITE
        """Delete oplog entries with seq <= upto_seq (every derived structure that replays has them
        on disk now) and raise the record's floor to upto_seq, in one transaction. Durable on
        return; losing it to a crash only means replaying entries already applied, which replay
        tolerates."""
        dbs = self.dbs(name)
        n = 0
        with self.env.begin(write=True) as txn:
            rec = self.record(name, txn)
            if upto_seq <= rec.oplog_floor:
                return 0
            cur = txn.cursor(db=dbs.oplog)
            key = cur.key() if cur.first() else b""
            while key and from_u64(key) <= upto_seq:
                cur.delete()  # moves the cursor to the next record (or unpositions it at the end)
                n += 1
                key = cur.key()
            rec.oplog_floor = upto_seq
            txn.put(name.encode(), rec.encode(), db=self._collections)
        return n

    def set_watermark(self, name: str, consumer: str, seq: int) -> None:  # WRITE
        """Record that `consumer`'s derived structure of the collection durably holds every entry
        up to `seq` (None of it is lost by a crash: it is one small transaction)."""
        with self.env.begin(write=True) as txn:
            rec = self.record(name, txn)
            if rec.watermarks.get(consumer) == seq:
                return
            rec.watermarks[consumer] = int(seq)
            txn.put(name.encode(), rec.encode(), db=self._collections)

    def oplog_floor(self, name: str) -> int:
        """Entries with seq <= this are gone. Records from before the floor was kept answer the
        seq before their first entry (or their last seq, when the oplog is empty)."""
        with self.env.begin() as txn:
            rec = self.record(name, txn)
            if rec.oplog_floor >= 0:
                return rec.oplog_floor
            cur = txn.cursor(db=self.dbs(name).oplog)
            return from_u64(cur.key()) - 1 if cur.first() else rec.last_seq

    # ---------------------------------------------------------------- reads

    def begin(self) -> lmdb.Transaction:
        return self.env.begin()

    def read_doc(self, name: str, doc_id: str, txn: lmdb.Transaction) -> Optional[tuple[str, DocHeader]]:
        raw = txn.get(doc_id.encode(), db=self.dbs(name).docs)
        return decode_doc(raw) if raw is not None else None

    def read_doc_header(self, name: str, doc_id: str, txn: lmdb.Transaction) -> Optional[DocHeader]:
        raw = txn.get(doc_id.encode(), db=self.dbs(name).docs)
        return decode_doc_header(raw) if raw is not None else None

    def iter_doc_headers(self, name: str) -> Iterator[tuple[str, DocHeader]]:
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.dbs(name).docs):
                yield bytes(k).decode(), decode_doc_header(v)

    def iter_docs(
        self, name: str, txn: lmdb.Transaction, after: Optional[str] = None, with_text: bool = True
    ) -> Iterator[tuple[str, Optional[str], DocHeader]]:
        """(doc id, text or None, header) of the documents with ids after `after` (None: from the
        first), in id order (LMDB's byte order of the UTF-8 ids, which is code point order), in `txn`."""
        cur = txn.cursor(db=self.dbs(name).docs)
        if after is None:
            positioned = cur.first()
        else:
            start = after.encode()
            positioned = cur.set_range(start)
            if positioned and cur.key() == start:
                positioned = cur.next()
        while positioned:
            raw = cur.value()
            text, header = decode_doc(raw) if with_text else (None, decode_doc_header(raw))
            yield bytes(cur.key()).decode(), text, header
            positioned = cur.next()

    def read_chunk(self, name: str, chunk_id: int, txn: lmdb.Transaction) -> Optional[ChunkRecord]:
        raw = txn.get(u64(chunk_id), db=self.dbs(name).chunks)
        return decode_chunk(raw) if raw is not None else None

    def iter_chunk_texts(self, name: str) -> Iterator[tuple[int, str]]:
        """(chunk id, text) of every stored chunk, ascending by id, in one read snapshot."""
        with self.env.begin() as txn:
            for k, v in txn.cursor(db=self.dbs(name).chunks):
                yield from_u64(k), decode_chunk(v).text

    def read_vectors(self, name: str, ids: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """(n,) ids -> (found ids (m,), vectors (m, dim)); ids without a vector are left out."""
        dbs = self.dbs(name)
        found: list[int] = []
        out = np.empty((len(ids), dim), dtype=np.float32)
        with self.env.begin() as txn:
            for cid in np.asarray(ids, dtype=np.int64).tolist():
                raw = txn.get(u64(cid), db=dbs.vectors)
                if raw is not None:
                    out[len(found)] = np.frombuffer(raw, dtype="<f4")
                    found.append(cid)
        return np.array(found, dtype=np.int64), out[: len(found)]

    def chunk_ids(self, name: str) -> np.ndarray:
        """All chunk ids of a collection, sorted."""
        with self.env.begin() as txn:
            keys = [from_u64(k) for k in txn.cursor(db=self.dbs(name).chunks).iternext(keys=True, values=False)]
        return np.array(keys, dtype=np.int64)

    def chunk_ids_page(self, name: str, after: Optional[int], limit: int) -> np.ndarray:
        """Up to `limit` chunk ids greater than `after` (None: from the first), ascending."""
        out: list[int] = []
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs(name).chunks)
            positioned = cur.first() if after is None else cur.set_range(u64(after + 1))
            while positioned and len(out) < limit:
                out.append(from_u64(cur.key()))
                positioned = cur.next()
        return np.array(out, dtype=np.int64)

    def oplog(self, name: str, after_seq: int) -> Iterator[tuple[int, list[int], list[int]]]:
        """(seq, added chunk ids, removed chunk ids) for entries with seq > after_seq, in order."""
        with self.env.begin() as txn:
            cur = txn.cursor(db=self.dbs(name).oplog)
            if cur.set_range(u64(after_seq + 1)):
                for k, v in cur:
                    obj = json.loads(bytes(v))
                    yield from_u64(k), obj["add"], obj["remove"]

    def counts(self, name: str) -> tuple[int, int, int]:
        """(documents, chunks, approximate bytes of this collection's pages)."""
        dbs = self.dbs(name)
        with self.env.begin() as txn:
            stats = [txn.stat(getattr(dbs, p)) for p in _PARTS]
        nbytes = sum(s["psize"] * (s["branch_pages"] + s["leaf_pages"] + s["overflow_pages"]) for s in stats)
        return stats[0]["entries"], stats[1]["entries"], nbytes
