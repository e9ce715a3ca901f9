"""`MemoryStore`: the memory store the servicers and the engine use (it implements
`memlm.engine.MemoryReader`).

LMDB (`lmdb_store`) is the source of truth; per collection the store keeps in memory a FAISS
`VectorIndex`, a `MetadataIndex` and a BM25 `LexicalIndex`, all derived from LMDB. A search is
dense (embedding), lexical (BM25) or hybrid (both, fused by `store.fusion`). A write is: validate,
chunk and embed (outside any lock), ONE durable LMDB transaction (the acknowledgement), then the
same change applied to the derived indexes.
Derived data has one lifecycle (`index.derived`): each index is a `DerivedStructure`
(`index.derived_indexes`) with a durable watermark, `apply(change)`, `rebuild()` and `drop()`, and
the store loops over them to mirror a commit, recover, snapshot or drop. At open each is brought to
LMDB's newest seq by `bring_up_to_date`: the vector index loads its newest file,
`collections/<name>/index-<seq>.faiss` (watermark `seq`), and replays the oplog past it, or is
rebuilt from the stored vectors; the metadata and lexical indexes live in memory only (no
watermark) and are rebuilt from LMDB. Either way, after open every index holds exactly LMDB's
chunks. The oplog is kept back to the lowest durable watermark: the index file's and each memory
mode's (`set_watermark`, at most `store.oplog_retention_ops` behind).

Concurrency: every method may be called from many threads. LMDB readers run concurrently. Each
collection has a readers-writer lock (`index.locks`): searches share it and run side by side
(FAISS, metadata and lexical reads are safe together), writers (commit + apply, snapshots, drop)
hold it alone (FAISS is not safe under concurrent mutation), so a search waits for at most one
commit. Embedding runs outside that lock, queries never behind ingest batches (`index.embedding`).
Limits: one process per data dir (a file lock); the metadata index and the set of live ids live in
memory; a collection's index file is rewritten whole at each snapshot.
"""
from __future__ import annotations

import json
import logging
import math
import re
import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from prometheus_client import Histogram

from memlm.config import StoreSettings
from memlm.errors import (
    AlreadyExists, FailedPrecondition, InvalidArgument, MemlmError, NotFound, ResourceExhausted, Unavailable,
    bounded, quoted, quoted_items,
)
from memlm.index.chunking import Chunker
from memlm.index.derived import DerivedStructure, bring_up_to_date
from memlm.index.derived_indexes import StoreIndexes, commit_change
from memlm.index.factory_check import check_factory, factory_problem
from memlm.index.embedding import Embedder, embedder_dim, load_embedder
from memlm.index.filters import matches, parse_filter
from memlm.index.fusion import fuse, fusion_depth
from memlm.index.lexical_index import query_terms
from memlm.index.locks import ReadWriteLock
from memlm.index.lmdb_store import STOPPED, ChunkRecord, CollectionRecord, Commit, DocHeader, LmdbStore, PreparedDocument
from memlm.index.types import (
    CollectionConfig,
    CollectionStats,
    Document,
    DocumentPage,
    DocumentResult,
    Filter,
    SearchHit,
    StoredDocument,
)
from memlm.modes import collection_memory

log = logging.getLogger(__name__)

# Where ingest time goes (benchmarks/ingest.py reads the sums): chunk = tokenizing, embed = the
# embedder, store = the durable LMDB commit, index = FAISS, metadata- and lexical-index updates + snapshots.
INGEST_STAGE_SECONDS = Histogram(
    "memlm_ingest_stage_seconds", "Ingest call time by stage", ["stage"],
    buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60),
)

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_DOC_ID_BYTES = 256  # LMDB keys stop at 511 bytes; leave room
DEFAULT_TOKENIZER_NAME = "SmolLM2-135M-Instruct"
SEARCH_MODES = ("dense", "lexical", "hybrid")
DEFAULT_LIST_LIMIT = 100  # documents a list_documents page holds unless asked (capped by store.max_ids_per_call)


@dataclass
class _Collection:
    config: CollectionConfig
    derived: StoreIndexes  # empty while `problem` is set
    lock: ReadWriteLock  # exclusive: writers, describe, drop; shared: searches
    applied_seq: int  # last oplog seq reflected in every structure of `derived` (in memory)
    dropped: bool = False
    # Why the derived indexes cannot serve (None: they can). Searches and writes then answer
    # FAILED_PRECONDITION with it; Get, Describe, Drop and Reindex still work (LMDB holds the data).
    problem: Optional[str] = None

    @property
    def durable_seq(self) -> int:
        """The lowest watermark of the durable structures: a restart replays the oplog past it."""
        return min((s.applied_seq for s in self.derived if s.durable), default=self.applied_seq)


def _memory_arg(memory: Optional[Mapping[str, Any]], kv_memory: Optional[bool]) -> Optional[Mapping[str, Any]]:
    """create_collection's `memory`, with the older `kv_memory` flag folded in."""
    if not isinstance(kv_memory, (bool, type(None))):
        raise InvalidArgument(f"kv_memory must be true or false, got {quoted(kv_memory)}")
    if memory is not None and not isinstance(memory, Mapping):
        raise InvalidArgument(f"memory must map memory modes to their options, got {quoted(memory)}")
    if kv_memory:
        memory = {"knn": {}, **(memory or {})}
    return memory


def _memory_differences(existing: CollectionConfig, asked: Mapping[str, Any], filled: Mapping[str, Any],
                        off: frozenset[str] = frozenset()) -> list[str]:
    """What an `if_not_exists` request asks of the collection's memory that it does not have: a
    mode it lacks (or has, when asked off), or an option the request set to another value
    (options it left out agree)."""
    have = collection_memory(existing.memory)  # the defaults of options stored before they were recorded
    out = [f"memory {mode!r} is on (asked off)" for mode in sorted(off) if mode in have]
    for mode, options in filled.items():
        if mode not in have:
            out.append(f"memory {mode!r} is off (asked on; a collection's memory modes are fixed at creation)")
            continue
        for key in dict(asked.get(mode) or {}):
            if have[mode].get(key) != options.get(key):
                out.append(f"memory.{mode}.{key}={have[mode].get(key)!r} (asked {options.get(key)!r})")
    return out


def _remove_if_empty(folder: Path) -> None:
    """Remove a dropped collection's folder once nothing (no mode's derived memory) is left in it."""
    try:
        folder.rmdir()
    except OSError:  # missing, or a mode's folder is still in it (the mode removes it, then this)
        pass


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"invalid collection name {quoted(name)}; expected 1-64 characters from A-Z a-z 0-9 _ . - (not '.' or '..')"
        )
    return name


def _check_doc_id(doc_id: Any, where: str) -> str:
    """A document id LMDB can key: a non-empty string of at most MAX_DOC_ID_BYTES UTF-8 bytes."""
    if not isinstance(doc_id, str) or not doc_id:
        raise InvalidArgument(f"{where}: document ids must be non-empty strings, got {quoted(doc_id)}")
    try:
        size = len(doc_id.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidArgument(f"{where}: document id {quoted(doc_id)} is not valid Unicode text") from None
    if size > MAX_DOC_ID_BYTES:
        raise InvalidArgument(
            f"{where}: document id {quoted(doc_id, 40)} is {size} UTF-8 bytes; the limit is {MAX_DOC_ID_BYTES}"
        )
    return doc_id


def _canonical_metadata(metadata: dict) -> str:
    """Metadata as stored JSON compares it (sorted keys; True is not 1, tuples are lists)."""
    return json.dumps(metadata, sort_keys=True)


def _check_metadata(doc_id: str, metadata: Any) -> None:
    doc_id = quoted(doc_id)
    if not isinstance(metadata, dict):
        raise InvalidArgument(f"document {doc_id}: metadata must be an object, got {type(metadata).__name__}")

    def scalar_ok(v: Any) -> bool:
        if v is None or isinstance(v, (str, bool, int)):
            return True
        return isinstance(v, float) and math.isfinite(v)

    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"document {doc_id}: metadata keys must be non-empty strings, got {quoted(key)}")
        if isinstance(value, (list, tuple)):
            bad = [v for v in value if not scalar_ok(v)]
            if bad:
                raise InvalidArgument(
                    f"document {doc_id}: metadata {quoted(key)} holds {quoted(bad[0])}; list elements must be "
                    "strings, numbers (finite), booleans or null"
                )
        elif not scalar_ok(value):
            raise InvalidArgument(
                f"document {doc_id}: metadata {quoted(key)} is {quoted(value)} ({type(value).__name__}); expected a string, "
                "finite number, boolean, null, or a list of those"
            )


def _set_faiss_threads(n: int) -> None:
    """OpenMP's thread count is per calling thread, and the store is called from a pool of server
    threads: set it on each before FAISS runs (see StoreSettings.faiss_threads)."""
    import faiss

    faiss.omp_set_num_threads(n)


def _pad(scores: Sequence[np.ndarray], ids: Sequence[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-query results -> (nq, k) scores and ids, holes -inf and -1 (as FAISS gives)."""
    out_s = np.full((len(ids), k), -np.inf, np.float32)
    out_i = np.full((len(ids), k), -1, np.int64)
    for q, (s, i) in enumerate(zip(scores, ids)):
        out_s[q, : len(i)], out_i[q, : len(i)] = s[:k], i[:k]
    return out_s, out_i


def _why(e: BaseException) -> str:
    return f"{type(e).__name__}: {bounded(str(e), 300)}"


_REMEDY = (
    "its documents are kept and Get still reads them; Reindex it (memlm reindex NAME --index-factory F) "
    "to rebuild its index from them, or drop it"
)


class MemoryStore:
    """Collections of documents, chunked, embedded, indexed and stored durably."""

    def __init__(
        self,
        data_dir: Path,
        settings: StoreSettings = StoreSettings(),
        embedder: Optional[Embedder] = None,
        tokenizer: Any = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.settings = settings
        _set_faiss_threads(settings.faiss_threads)
        self._embedder = embedder
        self._tokenizer = tokenizer
        self._tokenizer_lock = threading.Lock()
        self._chunkers: dict[tuple[int, int], Chunker] = {}
        self._global = threading.RLock()  # create / drop / close
        self._closed = False
        self._stopping = threading.Event()  # set by stop_writes(): every commit from then on is refused
        self._lmdb = LmdbStore(self.data_dir, int(settings.map_size_gib * 2**30))
        self._collections: dict[str, _Collection] = {}
        self._write_listeners: list[Callable[[str], None]] = []
        try:
            for name, rec in self._lmdb.records().items():
                self._collections[name] = self._open_collection(rec.config, last_seq=rec.next_op_seq - 1)
        except BaseException:
            self._lmdb.close()
            raise

    @classmethod
    def open(
        cls,
        data_dir: Path,
        settings: StoreSettings = StoreSettings(),
        embedder: Optional[Embedder] = None,
        tokenizer: Any = None,
    ) -> "MemoryStore":
        """Open (creating if needed) the store in `data_dir`, recovering every collection's index."""
        return cls(data_dir, settings, embedder, tokenizer)

    def __enter__(self) -> "MemoryStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---------------------------------------------------------------- models, lazily

    def _embedder_for(self, config: CollectionConfig) -> Embedder:
        return self._embedder_for_name(config.embedding_model)

    def _embedder_for_name(self, name: str) -> Embedder:
        if self._embedder is not None and self._embedder.name == name:
            return self._embedder
        return load_embedder(name, self.settings.embed_batch_size, self.settings.embed_bulk_nice)

    def _chunker(self, config: CollectionConfig) -> Chunker:
        key = (config.chunk_tokens, config.chunk_overlap)
        with self._tokenizer_lock:
            if self._tokenizer is None:
                from memlm.models.loading import bundled_model_dir, load_tokenizer

                self._tokenizer = load_tokenizer(bundled_model_dir())
            if key not in self._chunkers:
                self._chunkers[key] = Chunker(self._tokenizer, config.chunk_tokens, config.chunk_overlap)
            return self._chunkers[key]

    # ---------------------------------------------------------------- recovery

    def _dir(self, name: str) -> Path:
        return self.data_dir / "collections" / name

    def memory_folder(self, name: str) -> Path:
        """Where memory modes keep a collection's derived memory in process (beside its index
        files); a mode's folder there is the mode's to drop."""
        return self._dir(name)

    def collection_dir(self, name: str) -> Path:
        """The folder of a collection's derived files (index snapshots, KV memory); dropped with it."""
        self._collection(name, usable=False)
        return self._dir(name)

    def _new_derived(self, config: CollectionConfig) -> StoreIndexes:
        return StoreIndexes.empty(self._lmdb, config, self._dir(config.name), self.settings.exact_filter_below)

    def _oplog_changes(self, name: str, after_seq: int, upto_seq: int) -> Optional[list[tuple[int, list[int], list[int]]]]:
        """The oplog entries after_seq < seq <= upto_seq, or None when some are truncated."""
        if after_seq < self._lmdb.oplog_floor(name):
            return None
        return [entry for entry in self._lmdb.oplog(name, after_seq) if entry[0] <= upto_seq]

    def _open_collection(self, config: CollectionConfig, last_seq: int) -> _Collection:
        """Recover one collection at open. Whatever its derived data does, the store opens: a
        factory the store cannot serve (checked in a child process before FAISS touches it here,
        for data dirs written before that check existed) or a recovery that fails leaves this
        collection unavailable, with the reason, and the others serving."""
        col = _Collection(config, self._new_derived(config), ReadWriteLock(), applied_seq=last_seq)
        problem = factory_problem(config.dim, config.index_factory)
        if problem is not None:
            problem = f"its index factory {config.index_factory!r} cannot be served: {problem}"
        else:
            try:
                self._recover(col)
                return col
            except Exception as e:  # noqa: BLE001 - one collection's derived data must not stop the store
                log.exception("collection %r: recovering its indexes failed", config.name)
                problem = f"recovering its indexes failed: {_why(e)}"
        self._mark_unavailable(col, problem)
        return col

    def _mark_unavailable(self, col: _Collection, problem: str) -> None:
        """Drop the collection's derived indexes from memory (their files stay) and record why it
        cannot serve (see `problem`)."""
        col.derived, col.problem = self._new_derived(col.config), problem
        log.error("collection %r is unavailable: %s (%s)", col.config.name, problem, _REMEDY)

    def _recover(self, col: _Collection) -> None:
        """Give the collection fresh derived structures brought to `col.applied_seq` (LMDB's newest
        seq) by the one rule (`bring_up_to_date`): each loads its files, if it has any, and replays
        the oplog past their seq, else is rebuilt from LMDB; then each must hold exactly LMDB's
        chunks, or is rebuilt. A structure rebuilt with files to keep writes them now. The caller
        holds col.lock (or no other thread has the collection yet)."""
        name = col.config.name
        self._dir(name).mkdir(parents=True, exist_ok=True)
        col.derived = self._new_derived(col.config)
        stored = self._lmdb.chunk_ids(name)  # (n,) ascending
        how = [f"{s.name} {self._bring_up(name, s, col.applied_seq, stored)}" for s in col.derived]
        assert all(len(s) == len(stored) for s in col.derived), "derived structures and LMDB disagree after recovery"
        log.info("collection %r: %s; %d chunks", name, ", ".join(how), len(stored))
        if any(s.durable and s.applied_seq < 0 for s in col.derived):
            self._snapshot_locked(col)

    def _bring_up(self, name: str, s: DerivedStructure, last_seq: int, stored: np.ndarray) -> str:
        """Load, replay or rebuild one structure (see `_recover`); says which for the log."""
        s.load(last_seq)
        loaded = s.applied_seq

        def rebuild() -> str:
            s.rebuild()
            return f"rebuilt from {s.built_from}"

        def replay(change) -> str:
            try:
                s.apply(change)
            except Exception as e:  # derived data: any trouble here is repaired by a rebuild
                log.warning("collection %r: replaying the oplog into its %s failed (%s); rebuilding", name, s.name, e)
                return rebuild()
            return f"loaded at seq {loaded} and replayed the oplog to {last_seq}"

        changes = lambda after, upto: self._oplog_changes(name, after, upto)  # noqa: E731
        how = bring_up_to_date(loaded, last_seq, changes, replay, rebuild) or f"loaded at seq {loaded}"
        if not np.array_equal(s.ids(), stored):
            log.warning("collection %r: its %s holds %d chunks but LMDB %d (or other ids); rebuilding",
                        name, s.name, len(s), len(stored))
            how = rebuild()
        return how

    # ---------------------------------------------------------------- collections

    def _collection(self, name: str, *, usable: bool = True) -> _Collection:
        """The named collection; NotFound if there is none, FailedPrecondition if `usable` and its
        indexes cannot serve (usable=False: for what reads LMDB only)."""
        if self._closed:
            raise FailedPrecondition(f"the memory store at {self.data_dir} is closed")
        col = self._collections.get(name) if isinstance(name, str) else None
        if col is None:
            raise NotFound(f"collection {quoted(name)} does not exist")
        if usable:
            self._check_usable(col)
        return col

    @staticmethod
    def _check_usable(col: _Collection) -> None:
        if col.problem is not None:
            raise FailedPrecondition(f"collection {col.config.name!r} is unavailable: {col.problem}; {_REMEDY}")

    def create_collection(
        self,
        name: str,
        *,
        index_factory: Optional[str] = None,
        chunk_tokens: Optional[int] = None,
        chunk_overlap: Optional[int] = None,
        embedding_model: Optional[str] = None,
        memory: Optional[Mapping[str, Optional[Mapping[str, Any]]]] = None,
        kv_memory: Optional[bool] = None,
    ) -> CollectionConfig:
        """Create a collection; AlreadyExists if one of that name exists. A setting left None
        takes the store's default. memory: {mode: options} for the memory modes that derive
        something from the collection (`{"knn": {}}`: knn's KV memory with its default options);
        kv_memory=True is the older spelling of `{"knn": {}}`."""
        config, _ = self._create(name, False, index_factory, chunk_tokens, chunk_overlap, embedding_model,
                                 _memory_arg(memory, kv_memory))
        return config

    def ensure_collection(self, name: str, **settings: Any) -> tuple[CollectionConfig, bool]:
        """(config, created): create the collection unless it exists (so start-up scripts can be
        re-run); `settings` are create_collection's. An existing one must agree with every
        setting given (not None), else AlreadyExists names the ones that differ."""
        unknown = set(settings) - {"index_factory", "chunk_tokens", "chunk_overlap", "embedding_model", "memory", "kv_memory"}
        if unknown:
            raise TypeError(f"ensure_collection() got unexpected settings {sorted(unknown)}")
        get = settings.get
        off = frozenset({"knn"}) if get("kv_memory") is False else frozenset()  # kv_memory=False: asked without knn
        return self._create(name, True, get("index_factory"), get("chunk_tokens"), get("chunk_overlap"),
                            get("embedding_model"), _memory_arg(get("memory"), get("kv_memory")), off)

    def _create(
        self,
        name: str,
        if_not_exists: bool,
        index_factory: Optional[str],
        chunk_tokens: Optional[int],
        chunk_overlap: Optional[int],
        embedding_model: Optional[str],
        memory: Optional[Mapping[str, Optional[Mapping[str, Any]]]],
        memory_off: frozenset[str] = frozenset(),
    ) -> tuple[CollectionConfig, bool]:
        _check_name(name)
        given = {
            k: v for k, v in (
                ("index_factory", index_factory), ("chunk_tokens", chunk_tokens), ("chunk_overlap", chunk_overlap),
                ("embedding_model", embedding_model),
            ) if v is not None
        }
        factory = index_factory or self.settings.default_index_factory
        embedding_model = embedding_model or "all-MiniLM-L6-v2"
        chunk_tokens = self.settings.default_chunk_tokens if chunk_tokens is None else chunk_tokens
        chunk_overlap = 0 if chunk_overlap is None else chunk_overlap
        lo, hi = self.settings.min_chunk_tokens, self.settings.max_chunk_tokens
        if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or not lo <= chunk_tokens <= hi:
            raise InvalidArgument(
                f"chunk_tokens must be an integer in [{lo}, {hi}] (store.min_chunk_tokens, store.max_chunk_tokens), "
                f"got {quoted(chunk_tokens)}"
            )
        if isinstance(chunk_overlap, bool) or not isinstance(chunk_overlap, int) or not 0 <= chunk_overlap < chunk_tokens:
            raise InvalidArgument(f"chunk_overlap must be an integer in [0, {chunk_tokens}), got {quoted(chunk_overlap)}")
        asked_memory = dict(memory or {})
        memory_options = collection_memory(asked_memory)  # InvalidArgument naming a mode or option
        if self._embedder is not None and self._embedder.name == embedding_model:
            dim = self._embedder.dim
        else:
            dim = embedder_dim(embedding_model)  # InvalidArgument naming the known models
        check_factory(dim, factory, self.settings)  # InvalidArgument naming a string the store cannot serve
        config = CollectionConfig(
            name=name,
            embedding_model=embedding_model,
            dim=dim,
            index_factory=factory,
            chunk_tokens=chunk_tokens,
            chunk_overlap=chunk_overlap,
            tokenizer=self.tokenizer_name,
            memory=memory_options,
            created_at=time.time(),
        )
        with self._global:
            if self._closed:
                raise FailedPrecondition(f"the memory store at {self.data_dir} is closed")
            existing = self._collections.get(name)
            if existing is not None:
                if not if_not_exists:
                    raise AlreadyExists(f"collection {name!r} already exists; pass if_not_exists to reuse it")
                diff = [
                    f"{f}={getattr(existing.config, f)!r} (asked {quoted(v)})"
                    for f, v in given.items() if getattr(existing.config, f) != v
                ] + _memory_differences(existing.config, asked_memory, memory_options, memory_off)
                if diff:
                    raise AlreadyExists(f"collection {name!r} already exists with different settings: {', '.join(diff)}")
                return existing.config, False
            if len(self._collections) >= self.settings.max_collections:
                raise ResourceExhausted(
                    f"the store holds {len(self._collections)} collections; the limit is "
                    f"{self.settings.max_collections} (store.max_collections): drop one first"
                )
            shutil.rmtree(self._dir(name), ignore_errors=True)  # leftovers of a drop cut short by a crash
            self._lmdb.create_collection(config)
            self._dir(name).mkdir(parents=True, exist_ok=True)
            derived = self._new_derived(config)
            for s in derived:
                s.rebuild()  # of an empty collection: nothing to read
            self._collections[name] = _Collection(config, derived, ReadWriteLock(), applied_seq=0)
        log.info("created collection %r (%s, %d-token chunks)", name, factory, chunk_tokens)
        return config, True

    def reindex(self, name: str, index_factory: Optional[str] = None) -> CollectionConfig:
        """Rebuild a collection's indexes from LMDB with `index_factory` (None: the one it has):
        the repair for an unavailable collection, and the way to change a collection's index type
        (e.g. Flat to HNSW32 as it grows). Durable when it returns; searches and writes of the
        collection wait while it builds. InvalidArgument for a factory the store cannot serve."""
        col = self._collection(name, usable=False)
        factory = col.config.index_factory if index_factory is None else index_factory
        check_factory(col.config.dim, factory, self.settings)
        with col.lock:
            if col.dropped:
                raise NotFound(f"collection {name!r} does not exist")
            self._check_writes_allowed()
            config = replace(col.config, index_factory=factory)
            derived = self._new_derived(config)
            for s in derived:
                s.rebuild()  # first: a failure here leaves the collection as it was
            self._lmdb.set_index_factory(name, factory)  # recovery ignores files of another factory
            col.config, col.derived, col.problem = config, derived, None
            col.applied_seq = self._lmdb.record(name).last_seq
            self._snapshot_locked(col)  # also removes the old factory's files
        log.info("collection %r: reindexed as %s (%d vectors)", name, factory, len(derived.vectors))
        return config

    def list_collections(self) -> list[CollectionConfig]:
        return [c.config for _, c in sorted(self._collections.items())]

    def collection_config(self, name: str) -> CollectionConfig:
        """A collection's settings (NotFound if it does not exist); cheaper than `describe`."""
        return self._collection(name, usable=False).config

    @property
    def tokenizer_name(self) -> str:
        """What new collections record as their tokenizer: the folder name of the one chunking."""
        if self._tokenizer is not None and getattr(self._tokenizer, "name_or_path", ""):
            return Path(str(self._tokenizer.name_or_path)).name
        return DEFAULT_TOKENIZER_NAME

    def add_write_listener(self, listener: Callable[[str, Mapping[str, Any], bool], None]) -> None:
        """Call `listener(collection, memory, dropped)` (memory: the collection's
        `CollectionConfig.memory`) after every durable ingest, delete or drop of a collection with
        derived memory on, on the
        writing thread, outside every store lock (the write is already acknowledged to LMDB). The
        model host uses it to have the memory modes keep their derived memory in step; the store
        never runs the model. An exception from it is logged, never raised to the writer."""
        self._write_listeners.append(listener)

    def _notify_write(self, col: _Collection, dropped: bool = False) -> None:
        if not col.config.memory or self.stopping:  # stopping: the next start brings derived memory in step
            return
        for listener in self._write_listeners:
            try:
                listener(col.config.name, col.config.memory, dropped)
            except Exception:  # noqa: BLE001 - derived data; the next sync repairs it
                log.exception("collection %r: a write listener failed after a committed write", col.config.name)

    def describe(self, name: str) -> CollectionStats:
        col = self._collection(name, usable=False)
        with col.lock:
            docs, chunks, lmdb_bytes = self._lmdb.counts(name)
            files = sum(p.stat().st_size for p in self._dir(name).glob("*") if p.is_file())
            vectors = col.derived.vectors.index  # None while `problem` is set
            return CollectionStats(
                config=col.config,
                documents=docs,
                chunks=chunks,
                index_vectors=len(col.derived.vectors),
                index_trained=vectors is not None and vectors.is_trained,
                pending_ops=col.applied_seq - max(col.durable_seq, 0),
                disk_bytes=lmdb_bytes + files,
                problem=col.problem,
                memory_lag=self._memory_lag(col),
            )

    def _memory_lag(self, col: _Collection) -> dict[str, int]:
        """{mode: oplog entries its derived memory has not applied yet} for the collection's modes."""
        rec = self._lmdb.record(col.config.name)
        return {mode: max(0, rec.last_seq - rec.watermarks.get(mode, 0)) for mode in col.config.memory}

    stats = describe

    def drop(self, name: str) -> None:
        """Delete a collection: its LMDB databases (one durable transaction), then each derived
        structure's memory and files; then the write listeners hear of it (`dropped=True`), so that
        each memory mode drops its own derived memory (a crash before that leaves files the next
        create of the name clears)."""
        with self._global:
            col = self._collection(name, usable=False)
            with col.lock:
                self._lmdb.drop_collection(name)
                col.dropped = True
                del self._collections[name]
                for s in col.derived:
                    s.drop()  # the store's own files; a mode's folders are the mode's to drop
                _remove_if_empty(self._dir(name))
        log.info("dropped collection %r", name)
        self._notify_write(col, dropped=True)

    # ---------------------------------------------------------------- the change log, for derived memory

    def last_seq(self, name: str) -> int:
        """The seq of the collection's newest oplog entry (0: nothing written yet): a derived
        structure that has applied up to this holds every acknowledged write."""
        self._collection(name, usable=False)
        return self._lmdb.record(name).last_seq

    def changes(self, name: str, after_seq: int, upto_seq: int) -> Optional[list[tuple[int, list[int], list[int]]]]:
        """The oplog entries after_seq < seq <= upto_seq as (seq, added chunk ids, removed chunk
        ids), or None when some are gone (truncated: the caller rebuilds from the stored chunks)."""
        self._collection(name, usable=False)
        return self._oplog_changes(name, after_seq, upto_seq)

    def set_watermark(self, name: str, mode: str, seq: int) -> None:
        """A memory mode's derived memory of the collection durably holds every entry up to `seq`;
        the oplog is kept back to the lowest watermark of the collection's modes (at most
        `store.oplog_retention_ops` entries behind the newest)."""
        self._collection(name, usable=False)
        self._lmdb.set_watermark(name, mode, seq)

    # ---------------------------------------------------------------- ingest

    def _validate(self, doc: Any, seen: set[str]) -> None:
        if not isinstance(doc, Document):
            raise InvalidArgument(f"expected a Document, got {type(doc).__name__}")
        _check_doc_id(doc.id, "ingest")
        if doc.id in seen:
            raise InvalidArgument(f"document id {quoted(doc.id)} appears more than once in this call")
        if not isinstance(doc.text, str) or not doc.text.strip():
            raise InvalidArgument(f"document {quoted(doc.id)} has empty text; expected some non-whitespace text")
        try:
            size = len(doc.text.encode("utf-8"))
        except UnicodeEncodeError:
            raise InvalidArgument(f"document {quoted(doc.id)}: text is not valid Unicode") from None
        if size > self.settings.max_document_bytes:
            raise ResourceExhausted(
                f"document {quoted(doc.id)} is {size} bytes of UTF-8 text; the limit is "
                f"{self.settings.max_document_bytes} (store.max_document_bytes)"
            )
        _check_metadata(doc.id, doc.metadata)

    def ingest(self, name: str, docs: Sequence[Document], *, skip_invalid: bool = False) -> list[DocumentResult]:
        """Store documents (upserting by id). Returns one result per input, in order.

        With skip_invalid=False the first invalid document raises and nothing from the call is
        stored; with True invalid ones come back "rejected" and the rest are stored. When this
        returns, the stored documents are durable (one LMDB commit) and searchable.
        """
        col = self._collection(name)
        self._check_writes_allowed()  # a stopping store refuses every write, unchanged documents included
        if isinstance(docs, (Document, str)) or not isinstance(docs, Sequence):
            raise InvalidArgument(f"ingest takes a sequence of Documents, got {type(docs).__name__}")
        total = sum(len(d.text.encode("utf-8", "surrogatepass")) for d in docs if isinstance(d, Document) and isinstance(d.text, str))
        if total > self.settings.max_ingest_call_bytes:
            raise ResourceExhausted(
                f"this ingest call carries {total} bytes of text; the limit is {self.settings.max_ingest_call_bytes} "
                "(store.max_ingest_call_bytes): split it into smaller calls"
            )
        results: list[Optional[DocumentResult]] = [None] * len(docs)
        seen: set[str] = set()
        valid: list[int] = []
        for i, doc in enumerate(docs):
            try:
                self._validate(doc, seen)
            except MemlmError as e:
                if not skip_invalid:
                    raise
                results[i] = DocumentResult(
                    id=str(getattr(doc, "id", "")), status="rejected", error_code=e.code, message=str(e)
                )
                continue
            seen.add(doc.id)
            valid.append(i)
        valid = self._skip_unchanged(name, docs, valid, results)

        # Chunk and embed outside every lock: this is the slow part.
        t0 = time.perf_counter()
        chunker = self._chunker(col.config)
        chunk_lists = [chunker.chunk(docs[i].text) for i in valid]
        texts = [c.text for cl in chunk_lists for c in cl]
        t1 = time.perf_counter()
        embedder, step = self._embedder_for(col.config), self.settings.embed_batch_size
        parts = [np.zeros((0, col.config.dim), np.float32)]
        for start in range(0, len(texts), step):  # a stop check between batches keeps shutdown prompt
            self._check_writes_allowed()
            parts.append(embedder.embed(texts[start : start + step]))
        vectors = np.concatenate(parts)  # (len(texts), dim)
        t2 = time.perf_counter()
        INGEST_STAGE_SECONDS.labels("chunk").observe(t1 - t0)
        INGEST_STAGE_SECONDS.labels("embed").observe(t2 - t1)
        prepared: list[PreparedDocument] = []
        offset = 0
        for i, cl in zip(valid, chunk_lists):
            prepared.append(PreparedDocument(docs[i], cl, vectors[offset : offset + len(cl)]))  # (len(cl), dim)
            offset += len(cl)

        if prepared:
            with col.lock:
                if col.dropped:
                    raise NotFound(f"collection {name!r} does not exist")
                self._check_usable(col)  # a failure since this call began
                t0 = time.perf_counter()
                self._check_writes_allowed()
                commit = self._lmdb.write_ingest(name, prepared, time.time())  # durable from here
                t1 = time.perf_counter()
                self._after_commit(col, commit, prepared)
                INGEST_STAGE_SECONDS.labels("store").observe(t1 - t0)
                INGEST_STAGE_SECONDS.labels("index").observe(time.perf_counter() - t1)
            self._notify_write(col)
            for i, written in zip(valid, commit.written):
                results[i] = DocumentResult(
                    id=written.doc_id,
                    status="replaced" if written.replaced is not None else "created",
                    chunks=len(written.chunk_ids),
                    chunk_ids=written.chunk_ids,
                )
        return [r for r in results if r is not None]

    def _skip_unchanged(
        self, name: str, docs: Sequence[Document], valid: list[int], results: list[Optional[DocumentResult]]
    ) -> list[int]:
        """Documents stored with the same text and metadata are "unchanged": neither re-embedded nor
        rewritten (their chunk ids and updated_at stay). Returns the indices still to write.
        A concurrent write may change one after this read; the calls then land in either order."""
        todo: list[int] = []
        with self._lmdb.begin() as txn:
            for i in valid:
                doc = docs[i]
                stored = self._lmdb.read_doc(name, doc.id, txn)
                if stored is not None and stored[0] == doc.text and (
                    _canonical_metadata(stored[1].metadata) == _canonical_metadata(doc.metadata)
                ):
                    ids = stored[1].chunk_ids
                    results[i] = DocumentResult(id=doc.id, status="unchanged", chunks=len(ids), chunk_ids=ids)
                else:
                    todo.append(i)
        return todo

    def _after_commit(self, col: _Collection, commit: Commit, prepared: Sequence[PreparedDocument] = ()) -> None:
        """The derived half of a write whose LMDB commit succeeded (caller holds col.lock). The
        commit is the acknowledgement, so nothing here turns the write into an error: a failure
        mirroring it is logged and the collection's indexes are recovered from LMDB (index file +
        oplog, else a rebuild); only if that fails too is the collection marked unavailable. A
        failed snapshot is logged and retried at the next write: the oplog still holds its entries."""
        try:
            self._apply(col, commit, prepared)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("collection %r: mirroring committed write %d in the indexes failed; recovering them from LMDB",
                          col.config.name, commit.seq)
            self._rederive(col)
            return
        try:
            self._maybe_snapshot(col)
        except Exception:  # noqa: BLE001 - see the docstring
            log.exception("collection %r: writing an index snapshot failed; the oplog keeps the entries", col.config.name)

    def _rederive(self, col: _Collection) -> None:
        """Replace a collection's derived indexes by ones recovered from LMDB (caller holds col.lock)."""
        name = col.config.name
        col.applied_seq = self._lmdb.record(name).last_seq
        try:
            self._recover(col)
        except Exception as e:  # noqa: BLE001 - LMDB keeps the data; a restart or Reindex retries
            log.exception("collection %r: recovering its indexes failed", name)
            self._mark_unavailable(col, f"recovering its indexes after a failed update failed: {_why(e)}")
            return
        col.problem = None

    def _apply(self, col: _Collection, commit: Commit, prepared: Sequence[PreparedDocument] = ()) -> None:
        """Mirror a committed LMDB transaction in every derived structure, from what the write had
        in hand (caller holds col.lock). `prepared` is what was written, in the order of `commit.written`."""
        change = commit_change(commit, prepared)
        for s in col.derived:
            s.apply(change)
        col.applied_seq = max(col.applied_seq, commit.seq)

    # ---------------------------------------------------------------- reads

    def search(
        self,
        collection: str,
        query: Optional[str] = None,
        vector: Optional[np.ndarray] = None,
        k: int = 10,
        filter: Optional[Filter] = None,
        mode: Optional[str] = None,
    ) -> list[SearchHit]:
        """The k best chunks for `query` or `vector`, best first, among those `filter` allows.

        mode "dense": nearest by the collection's embedder (score: cosine similarity; `vector` is
        normalised to unit length); "lexical": BM25 over the chunk words (score: BM25); "hybrid":
        both, fused by `store.fusion` (score: for "absolute", the default, in [0, 1]; see
        `memlm.index.fusion`). None: the store's
        `search_mode` for a text query, "dense" for a vector (the only mode a vector can use)."""
        if (query is None) == (vector is None):
            self._both_or_neither(query, vector)
        if query is not None:
            return self.search_batch(collection, queries=[query], k=k, filter=filter, mode=mode)[0]
        try:
            vec = np.asarray(vector, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidArgument(f"vector must be a list of numbers, got {type(vector).__name__}") from None
        if vec.ndim != 1 and not (vec.ndim == 2 and vec.shape[0] == 1):
            raise InvalidArgument(f"vector must be one (dim,) vector, got shape {vec.shape}")
        return self.search_batch(collection, vectors=vec.reshape(1, -1), k=k, filter=filter, mode=mode)[0]

    @staticmethod
    def _both_or_neither(query: Any, vector: Any) -> None:
        raise InvalidArgument(
            "give exactly one of query (text) or vector, got "
            + ("both" if query is not None and vector is not None else "neither")
        )

    def _search_mode(self, mode: Optional[str], text: bool) -> str:
        if not mode:
            return self.settings.search_mode if text else "dense"
        if mode not in SEARCH_MODES:
            raise InvalidArgument(f"unknown search mode {quoted(mode)}; expected one of {', '.join(SEARCH_MODES)}")
        if not text and mode != "dense":
            raise InvalidArgument(f"search mode {quoted(mode)} needs a text query; a vector query can only search dense")
        return mode

    def search_batch(
        self,
        collection: str,
        queries: Optional[Sequence[str]] = None,
        vectors: Optional[np.ndarray] = None,
        k: int = 10,
        filter: Optional[Filter] = None,
        mode: Optional[str] = None,
    ) -> list[list[SearchHit]]:
        """Like `search` for several queries (texts, or (nq, dim) vectors) sharing k, filter and mode."""
        col = self._collection(collection)
        dim = col.config.dim
        if (queries is None) == (vectors is None):
            self._both_or_neither(queries, vectors)
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.settings.max_k:
            raise InvalidArgument(f"k must be an integer in [1, {self.settings.max_k}] (store.max_k), got {quoted(k)}")
        k = int(k)
        mode = self._search_mode(mode, text=queries is not None)
        f = self._check_filter(parse_filter(filter))
        q_vecs: Optional[np.ndarray] = None
        if queries is not None:
            for q in queries:
                self._check_query(q)
            if mode != "lexical":
                embedder = self._embedder_for(col.config)
                embed = getattr(embedder, "embed_queries", embedder.embed)  # never behind ingest batches
                q_vecs = embed(list(queries))  # (nq, dim), unit rows
        else:
            q_vecs = self._check_vectors(vectors, col.config, collection)
        nq = len(queries) if queries is not None else len(q_vecs)
        depth = fusion_depth(k) if mode == "hybrid" else k
        q_terms = [query_terms(q) for q in queries] if mode != "dense" else []  # outside the lock: O(query)
        _set_faiss_threads(self.settings.faiss_threads)
        with col.lock.shared():  # searches run side by side; a writer waits for them, they for it
            if col.dropped:
                raise NotFound(f"collection {collection!r} does not exist")
            self._check_usable(col)
            vectors, metadata, bm25 = (s.index for s in col.derived)
            allowed = metadata.select(f) if f is not None else None
            if allowed is not None and len(allowed) == 0:
                return [[] for _ in range(nq)]
            if q_vecs is not None:
                scores, ids = vectors.search(q_vecs, depth, allowed)  # (nq, depth) each
            if mode != "dense":
                lexical = [bm25.search(t, depth, allowed) for t in q_terms]
            if mode == "hybrid":  # under the lock: "absolute" fusion scores candidates by both rankers
                fused = [
                    fuse(
                        self.settings.fusion, (scores[q], ids[q]), lexical[q], k,
                        cosine_of=lambda c, v=q_vecs[q]: vectors.fetch(c) @ v,  # (n, dim) @ (dim,)
                        bm25_of=lambda c, t=q_terms[q]: bm25.score(t, c),
                        bm25_reference=bm25.reference_score(q_terms[q]),
                    )
                    for q in range(nq)
                ]
        if mode == "lexical":
            scores, ids = _pad([s for s, _ in lexical], [i for _, i in lexical], k)
        elif mode == "hybrid":
            scores, ids = _pad([s for s, _ in fused], [i for _, i in fused], k)
        return self._hits(collection, scores, ids)

    def embed_texts(self, texts: Sequence[str], model: Optional[str] = None) -> tuple[np.ndarray, int]:
        """(n,) texts -> ((n, dim) float32 unit rows, word pieces read) by the registered embedder `model`
        (None: the one collections get by default), embedded as a search query is (at once in the caller's
        thread, `embed_batch_size` texts per pass): the vectors a collection of that embedder stores and searches
        with. Each text is checked like a query (non-empty, store.max_query_bytes). Read-only."""
        name = model or CollectionConfig.embedding_model  # the dataclass default: new collections' embedder
        for i, text in enumerate(texts):
            try:
                self._check_query(text)
            except InvalidArgument as exc:
                raise InvalidArgument(f"input[{i}]: {exc}") from None
        embedder = self._embedder_for_name(name)  # InvalidArgument naming the registered embedders
        embed = getattr(embedder, "embed_queries", embedder.embed)
        step = self.settings.embed_batch_size
        parts = [embed(list(texts[start : start + step])) for start in range(0, len(texts), step)]
        vectors = np.concatenate(parts) if parts else np.zeros((0, embedder.dim), dtype=np.float32)  # (n, dim)
        count = getattr(embedder, "count_tokens", None)
        return vectors, (count(texts) if count is not None and len(texts) else 0)

    def _check_query(self, q: Any) -> None:
        if not isinstance(q, str) or not q.strip():
            raise InvalidArgument(f"query must be non-empty text, got {quoted(q)}")
        size = len(q.encode("utf-8", "surrogatepass"))
        if size > self.settings.max_query_bytes:
            raise InvalidArgument(
                f"the query is {size} bytes of UTF-8 text; the limit is {self.settings.max_query_bytes} "
                "(store.max_query_bytes)"
            )

    def _check_filter(self, f: Optional[Filter]) -> Optional[Filter]:
        """A filter's conditions and values within store.max_filter_conditions / _values."""
        if f is None:
            return None
        conditions = [c for clause in (f.must, f.should, f.must_not) for c in clause]
        values = sum(len(c.any_of) if c.any_of is not None else 1 for c in conditions)
        for what, n, limit in (("conditions", len(conditions), self.settings.max_filter_conditions),
                               ("values", values, self.settings.max_filter_values)):
            if n > limit:
                raise InvalidArgument(
                    f"the filter holds {n} {what}; the limit is {limit} (store.max_filter_{what})"
                )
        return f

    @staticmethod
    def _check_vectors(vectors: Any, config: CollectionConfig, collection: str) -> np.ndarray:
        """(nq, dim) or (dim,) query vectors -> (nq, dim) float32 unit rows, or InvalidArgument."""
        dim = config.dim
        try:
            q_vecs = np.asarray(vectors, dtype=np.float32)
        except (TypeError, ValueError):
            raise InvalidArgument(f"vector must be numeric with {dim} values, got {type(vectors).__name__}") from None
        if q_vecs.ndim == 1:
            q_vecs = q_vecs[None, :]
        if q_vecs.ndim != 2 or q_vecs.shape[1] != dim:
            raise InvalidArgument(
                f"vector must have {dim} values (collection {collection!r} uses {config.embedding_model}), "
                f"got shape {tuple(np.shape(vectors))}"
            )
        if not np.isfinite(q_vecs).all():
            raise InvalidArgument("vector holds NaN or infinite values; expected finite numbers")
        # Scale each row by its largest magnitude first: the norm of 384 x 3e38 overflows float32
        # (and of 1e-40s underflows), which would make a real direction a zero vector.
        peak = np.abs(q_vecs).max(axis=1, keepdims=True)  # (nq, 1)
        if (peak == 0).any():
            raise InvalidArgument("vector is all zeros; expected a direction to search along")
        q_vecs = q_vecs / peak  # (nq, dim), largest |value| 1
        return q_vecs / np.linalg.norm(q_vecs, axis=1, keepdims=True)

    def _hits(self, name: str, scores: np.ndarray, ids: np.ndarray) -> list[list[SearchHit]]:
        out: list[list[SearchHit]] = []
        headers: dict[str, Optional[DocHeader]] = {}
        with self._lmdb.begin() as txn:
            for row_s, row_i in zip(scores, ids):
                hits = []
                for s, cid in zip(row_s.tolist(), row_i.tolist()):
                    if cid < 0:
                        continue
                    chunk = self._lmdb.read_chunk(name, cid, txn)
                    if chunk is None:
                        continue  # deleted after the index answered
                    if chunk.doc_id not in headers:
                        headers[chunk.doc_id] = self._lmdb.read_doc_header(name, chunk.doc_id, txn)
                    header = headers[chunk.doc_id]
                    if header is None:
                        continue
                    hits.append(
                        SearchHit(
                            chunk_id=cid,
                            doc_id=chunk.doc_id,
                            score=float(s),
                            text=chunk.text,
                            metadata=header.metadata,
                            chunk_index=chunk.chunk_index,
                            start=chunk.start,
                            end=chunk.end,
                        )
                    )
                out.append(hits)
        return out

    def get(self, name: str, ids: Sequence[str], missing_ok: bool = False) -> list[StoredDocument]:
        """The stored documents, in the order asked. Raises NotFound naming every missing id, or
        with `missing_ok` leaves them out."""
        self._collection(name, usable=False)
        ids = self._check_ids(ids, "get")
        found: list[StoredDocument] = []
        missing: list[str] = []
        with self._lmdb.begin() as txn:
            for doc_id in ids:
                rec = self._lmdb.read_doc(name, doc_id, txn)
                if rec is None:
                    missing.append(doc_id)
                    continue
                text, header = rec
                found.append(StoredDocument(doc_id, text, header.metadata, header.chunk_ids, header.updated_at))
        if missing and not missing_ok:
            some = f"{len(missing)} of the ids asked" if len(missing) > 1 else "the id"
            raise NotFound(f"collection {name!r} has no document with {some}: {quoted_items(missing)}")
        return found

    def _check_ids(self, ids: Any, call: str) -> list[str]:
        """A Get's or Delete's ids: a list of at most store.max_ids_per_call valid document ids."""
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise InvalidArgument(f"{call} takes a list of document ids, got {quoted(ids)}")
        if len(ids) > self.settings.max_ids_per_call:
            raise InvalidArgument(
                f"{call} names {len(ids)} document ids; the limit is {self.settings.max_ids_per_call} "
                "(store.max_ids_per_call): split it into several calls"
            )
        return [_check_doc_id(doc_id, call) for doc_id in ids]

    def read_chunks(self, name: str, chunk_ids: Sequence[int], missing_ok: bool = False) -> list[Optional[ChunkRecord]]:
        """Stored chunks (document id, index in the document, text, token ids), in the order asked,
        read in one LMDB snapshot. A missing chunk raises NotFound naming it, or with `missing_ok`
        comes back as None (deleted since its id was read)."""
        self._collection(name, usable=False)
        out = []
        with self._lmdb.begin() as txn:
            for cid in chunk_ids:
                rec = self._lmdb.read_chunk(name, int(cid), txn)
                if rec is None and not missing_ok:
                    raise NotFound(f"collection {name!r} has no chunk {cid}")
                out.append(rec)
        return out

    def following_chunks(self, name: str, chunk_id: int, n: int) -> list[int]:
        """The ids of the (up to) n chunks after `chunk_id` in its document, in order; [] for an
        unknown chunk (deleted since it was found)."""
        self._collection(name, usable=False)
        with self._lmdb.begin() as txn:
            rec = self._lmdb.read_chunk(name, int(chunk_id), txn)
            header = self._lmdb.read_doc_header(name, rec.doc_id, txn) if rec is not None else None
        if header is None or n <= 0:
            return []
        return list(header.chunk_ids[rec.chunk_index + 1 : rec.chunk_index + 1 + n])

    def chunk_ids(self, name: str) -> np.ndarray:
        """Every stored chunk id of a collection, ascending (int64): what derived data must hold."""
        self._collection(name, usable=False)
        return self._lmdb.chunk_ids(name)

    def chunk_ids_page(self, name: str, after: Optional[int] = None, limit: int = 100_000) -> np.ndarray:
        """`chunk_ids` a page at a time: up to `limit` ids greater than `after` (None: the first)."""
        self._collection(name, usable=False)
        return self._lmdb.chunk_ids_page(name, after, limit)

    # ---------------------------------------------------------------- delete

    def delete(
        self, name: str, ids: Optional[Sequence[str]] = None, *, filter: Optional[Filter | Mapping[str, Any]] = None,
        all: bool = False,
    ) -> list[str]:
        """Delete documents everywhere (LMDB, index, filters) in ONE durable LMDB transaction; returns
        the ids actually deleted. Durable when it returns; a call that raises deletes nothing.

        ids: those of them that are stored (unknown ids are ignored). filter: every document whose
        metadata matches it, as a search's filter does (with ids: those of the ids that match).
        all=True: every document (the collection and its settings stay). Deleting everything takes
        all=True: an empty filter, which would match every document, is refused, and so is a call
        with neither ids nor a filter."""
        col = self._collection(name)
        matching = self._delete_selection(ids, filter, all)
        ids = None if ids is None else self._check_ids(ids, "delete")
        with col.lock:
            if col.dropped:
                raise NotFound(f"collection {name!r} does not exist")
            self._check_usable(col)
            self._check_writes_allowed()
            commit = self._lmdb.write_delete(name, ids, self._stopping.is_set, matching)  # durable from here
            if not commit.removed:
                return []
            self._after_commit(col, commit)
        self._notify_write(col)
        return [doc_id for doc_id, _ in commit.removed]

    def _delete_selection(self, ids: Any, filter: Any, everything: Any) -> Optional[Callable[[Mapping[str, Any]], bool]]:
        """What a delete's metadata must match (None: anything), or InvalidArgument for a call that
        says too little (nothing, or an empty filter) or contradicts itself (all with ids or a filter)."""
        if not isinstance(everything, bool):
            raise InvalidArgument(f"delete's all must be true or false, got {quoted(everything)}")
        f = self._check_filter(parse_filter(filter)) if filter is not None else None
        if everything:
            if ids is not None or filter is not None:
                raise InvalidArgument("delete with all=True deletes every document; it takes no ids or filter")
            return None
        if filter is not None and f is None:
            raise InvalidArgument(
                "delete's filter is empty, which matches every document; pass all=True to delete them all"
            )
        if ids is None and f is None:
            raise InvalidArgument("delete needs ids, a filter, or all=True (to delete every document)")
        return None if f is None else lambda metadata: matches(metadata, f)

    # ---------------------------------------------------------------- listing

    def list_documents(
        self, name: str, *, filter: Optional[Filter | Mapping[str, Any]] = None, after: Optional[str] = None,
        limit: Optional[int] = None, with_text: bool = True,
    ) -> DocumentPage:
        """Up to `limit` documents whose metadata matches `filter` (None: all; a search's filter,
        evaluated the same way), in id order, with ids strictly after `after` (None: from the
        first), and the cursor of the next page (None: none is left). `limit` None:
        DEFAULT_LIST_LIMIT, or store.max_ids_per_call where that is lower. `with_text=False` leaves
        the texts out (""). One LMDB snapshot under the collection's shared lock: a page sees every
        write acknowledged before it and none of one that commits during it. Works on an
        unavailable collection (it reads LMDB only).
        A filter is tested on each document's stored metadata from the cursor on, so a page of a
        filter that matches few documents reads many; paging through all reads each at most twice."""
        col = self._collection(name, usable=False)
        f = self._check_filter(parse_filter(filter))
        most = self.settings.max_ids_per_call
        limit = min(DEFAULT_LIST_LIMIT, most) if limit is None else limit
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= most:
            raise InvalidArgument(
                f"list_documents' limit must be an integer in [1, {most}] (store.max_ids_per_call), got {quoted(limit)}"
            )
        if after is not None:
            _check_doc_id(after, "list_documents' after")
        found: list[StoredDocument] = []
        with col.lock.shared():  # no drop closes the LMDB handles while the cursor reads
            if col.dropped:
                raise NotFound(f"collection {name!r} does not exist")
            with self._lmdb.begin() as txn:
                for doc_id, text, header in self._lmdb.iter_docs(name, txn, after, with_text):
                    if f is not None and not matches(header.metadata, f):
                        continue
                    if len(found) == limit:  # one more matches: the page is not the last
                        return DocumentPage(found, found[-1].id)
                    found.append(StoredDocument(doc_id, text or "", header.metadata, header.chunk_ids, header.updated_at))
        return DocumentPage(found, None)

    # ---------------------------------------------------------------- shutdown

    def stop_writes(self) -> None:
        """Refuse every commit from now on (the server calls this at shutdown, once the drain's
        grace period is over or nothing is in flight): an ingest or delete still running raises
        Unavailable at its next check (between embedding batches, right before the commit, inside
        a long delete), having stored nothing; KV memory builds stop at their next segment."""
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        """Whether stop_writes() was called: derived work (KV memory builds) stops early too."""
        return self._stopping.is_set()

    def _check_writes_allowed(self) -> None:
        if self._stopping.is_set():
            raise Unavailable(STOPPED)

    # ---------------------------------------------------------------- snapshots

    def _maybe_snapshot(self, col: _Collection) -> None:
        if col.applied_seq - max(col.durable_seq, 0) >= self.settings.snapshot_every_ops:
            self._snapshot_locked(col)

    def _snapshot_locked(self, col: _Collection) -> None:
        """Have every durable derived structure write its files as of `col.applied_seq` (the
        vector index: `index-<seq>.faiss`, atomic and fsynced, then its older files go), then drop
        the oplog entries that every reader holds. A crash between steps leaves a state recovery
        handles: older files plus the oplog, or the new files plus entries they already hold."""
        for s in col.derived:
            s.save(col.applied_seq)  # nothing for one in memory only, or one already saved at this seq
        rec = self._lmdb.record(col.config.name)
        keep_after = self._oplog_keep_after(col, rec)
        if keep_after > rec.oplog_floor:
            self._lmdb.truncate_oplog(col.config.name, keep_after)

    def _oplog_keep_after(self, col: _Collection, rec: CollectionRecord) -> int:
        """The seq up to which the oplog may go: the lowest durable watermark of the collection's
        derived structures (the store's with files, and every memory mode's as it reported it),
        except that a mode never keeps more than `store.oplog_retention_ops` entries (one further
        behind rebuilds from the stored chunks). Structures in memory only rebuild at open: they
        hold nothing back."""
        floor_of_modes = col.applied_seq - self.settings.oplog_retention_ops
        modes = [max(rec.watermarks.get(mode, 0), floor_of_modes) for mode in col.config.memory]
        return min([col.applied_seq, col.durable_seq] + modes)

    def snapshot(self, name: Optional[str] = None) -> None:
        """Write index files for one collection (or all) and truncate their oplogs."""
        names = [name] if name is not None else list(self._collections)
        for n in names:
            col = self._collection(n, usable=False)
            with col.lock:
                if not col.dropped and col.problem is None:
                    self._snapshot_locked(col)

    def close(self) -> None:
        """Snapshot every collection and close LMDB. Idempotent."""
        with self._global:
            if self._closed:
                return
            try:
                self.snapshot()
            finally:
                self._closed = True
                self._lmdb.close()
