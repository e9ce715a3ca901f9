"""A memory mode's derived memory of each collection, kept in step with LMDB: the lifecycle that
knn's KV memory, landmark's block memory and RETRO's neighbour states share (the rule of
`memlm.modes.base`: a durable watermark, oplog replay past it, a rebuild by chunk ids when the log
no longer reaches back, the watermark reported to the store).

`DerivedMemoryManager` holds the lifecycle; a subclass says what the memory is: how a folder is
opened (`open_memory`) and created (`create_memory`) and how chunks are built into it (`build`).
A memory object is a `memlm.index.segments.SegmentedRows`: a `path` (its folder, committed by its
`manifest.json`), `manifest.applied_seq`, `manifest.segments`, `set_applied_seq`, `known_chunks`,
`chunk_ids`, `delete` and `compact` (`memlm.index.kv_memory.KVMemory`,
`memlm.modes.retro.memory.NeighbourStateMemory`).

`DerivedMemoryModeBase` is the mode's side: the manager made at start, crash repair at start-up,
a catch-up after every acknowledged write (waited for or queued one segment per turn), the folder
removed after a drop. Everything runs on the model host's one worker thread.
"""
from __future__ import annotations

import logging
import shutil
import time
import weakref
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from memlm.errors import FailedPrecondition, NotFound
from memlm.index.derived import Change, bring_up_to_date
from memlm.index.segments import MANIFEST
from memlm.modes.base import MemoryModeBase, ModeRuntime

log = logging.getLogger(__name__)

# store -> {(folder, created_at): memory}: every manager of a store (one per mode) opens a folder's
# memory once, so two modes sharing a folder (knn and landmark) see one manifest.
_OPENED: "weakref.WeakKeyDictionary[object, dict[tuple[str, float], Any]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SyncReport:
    added_rows: int = 0  # rows built (memory tokens for a KV memory, chunks for RETRO's states)
    built_documents: int = 0
    removed_chunks: int = 0  # chunks whose rows were tombstoned
    compacted: bool = False
    seconds: float = 0.0
    done: bool = True  # False: a bounded catch-up left work for the next call


class DerivedMemoryManager(ABC):
    """Builds and repairs one mode's derived memory of every collection of one store that has it on."""

    what = "derived memory"  # for logs and errors

    def __init__(self, store, model, settings, model_name: str = "", mode: str = "", folder: str = ""):
        """mode: whose memory this is (the collection option `config.memory[mode]` and the
        watermark's name); folder: its folder under the store's `memory_folder(collection)`."""
        self.store, self.model, self.settings = store, model, settings
        self.model_name, self.mode, self.folder = model_name, mode, folder
        self._reported: dict[tuple[str, float], int] = {}  # (name, created_at) -> the watermark last set

    # --- what the memory is (subclasses) ---------------------------------------------------

    @abstractmethod
    def open_memory(self, path: Path):
        """The memory at path; FileNotFoundError when there is none."""

    @abstractmethod
    def create_memory(self, path: Path, config):
        """An empty memory shaped by the collection's options, holding every write up to seq 0."""

    @abstractmethod
    def build(self, name: str, config, mem, chunk_ids: Sequence[int], max_segments: Optional[int]) -> tuple[int, int, bool]:
        """Build these chunks into mem: (rows added, documents, whether all were built). Chunks
        deleted since their ids were read are skipped (their removal is a later oplog entry)."""

    # --- opening ---------------------------------------------------------------------------

    def check_collection(self, name: str):
        """The collection's config if it has this memory on; FailedPrecondition naming why not."""
        config = self.store.collection_config(name)  # NotFound
        if self.mode not in config.memory:
            raise FailedPrecondition(
                f"collection {name!r} has no {self.mode} memory; create it with it on (memory={{'{self.mode}': {{}}}}; "
                f"CLI: memlm ingest PATH --collection NEW_NAME --memory {self.mode}) to use memory mode '{self.mode}'"
            )
        if self.model_name and config.tokenizer != self.model_name:
            raise FailedPrecondition(
                f"collection {name!r} was tokenized for {config.tokenizer!r} but the served model is "
                f"{self.model_name!r}; its {self.what} must come from the served model: re-create the collection"
            )
        return config

    def folder_for(self, config) -> str:
        """Where this mode's memory of a collection lives (a folder under its memory folder)."""
        return self.folder

    def memory(self, name: str, config=None):
        """The collection's memory, opened (or created empty) on first use. `config`: the
        collection's, when the caller has already checked it. One object per folder and store."""
        config = config or self.check_collection(name)
        path = self.store.memory_folder(name) / self.folder_for(config)
        key = (str(path), config.created_at)
        opened = _OPENED.setdefault(self.store, {})
        mem = opened.get(key)
        if mem is not None and (Path(mem.path) / MANIFEST).exists() and self.fits(mem):
            return mem
        try:
            mem = self.open_memory(path)
        except FileNotFoundError:
            mem = self.create_memory(path, config)
        except Exception as e:  # noqa: BLE001 - derived data: start over from LMDB
            log.warning("collection %r: %s at %s is unreadable (%s); rebuilding it from the store", name, self.what, path, e)
            shutil.rmtree(path, ignore_errors=True)
            mem = self.create_memory(path, config)
        for k in [k for k in opened if k[0] == key[0]]:  # a dropped namesake's
            del opened[k]
        opened[key] = mem
        return mem

    def fits(self, mem) -> bool:
        """Whether an opened memory is what this manager would build (`open_memory` refuses one
        that is not, and it is rebuilt)."""
        return True

    def forget(self, name: str) -> None:
        """Subclasses drop what they keep loaded of a dropped collection."""

    def drop(self, name: str) -> None:
        """The collection was dropped: forget its memory and delete the folder."""
        folder = str(self.store.memory_folder(name))
        opened = _OPENED.get(self.store, {})
        for k in [k for k in opened if str(Path(k[0]).parent) == folder]:
            del opened[k]
        self.forget(name)
        try:
            self.store.collection_config(name)
            return  # re-created since: its creation cleared the folder, and it is the new one's now
        except NotFound:
            folder = self.store.memory_folder(name)
            shutil.rmtree(folder / self.folder, ignore_errors=True)
            try:
                folder.rmdir()  # the store left it for this mode's folder
            except OSError:
                pass

    # --- keeping in step with LMDB ----------------------------------------------------------

    def compact_if_needed(self, mem) -> bool:
        if len(mem.manifest.segments) > self.settings.max_segments and not getattr(self.store, "stopping", False):
            mem.compact()
            return True
        return False

    def catch_up(self, name: str, config=None, max_segments: Optional[int] = None) -> SyncReport:
        """Bring the memory to the collection's newest acknowledged write by the store's one rule
        for derived data (`memlm.index.derived.bring_up_to_date`; the watermark is the manifest's
        `applied_seq`). In step it costs one LMDB read, whatever the collection's size. Otherwise
        it applies the net change of the oplog entries past its watermark (`_apply`), or, when the
        oplog no longer reaches back (or the watermark is unknown), re-syncs by comparing every
        chunk id (`_sync`). max_segments: build at most this many segments now (the caller
        re-queues the rest, so generations are not kept waiting behind a long build);
        `SyncReport.done` says whether the memory is in step."""
        t0 = time.perf_counter()
        config = config or self.check_collection(name)
        mem = self.memory(name, config)
        target = self.store.last_seq(name)
        report = bring_up_to_date(
            mem.manifest.applied_seq, target, lambda after, upto: self.store.changes(name, after, upto),
            apply=lambda change: self._apply(name, config, mem, change, max_segments),
            rebuild=lambda: self._sync(name, config, mem, max_segments),
        )
        if report is None:  # in step
            if self._reported.get((name, config.created_at)) != target:  # once per process and seq: a memory
                self.store.set_watermark(name, self.mode, target)  # another mode's catch-up built (shared folder)
                self._reported[(name, config.created_at)] = target
            return SyncReport()
        if report.done:
            if self.compact_if_needed(mem):
                report = replace(report, compacted=True)
            mem.set_applied_seq(target)
            self.store.set_watermark(name, self.mode, target)
            self._reported[(name, config.created_at)] = target
        report = replace(report, seconds=time.perf_counter() - t0)
        if report.added_rows or report.removed_chunks or report.compacted:
            log.info("collection %r: %s caught up to seq %d%s: +%d rows (%d documents), -%d chunks%s in %.1f s",
                     name, self.what, target, "" if report.done else " (in part)", report.added_rows,
                     report.built_documents, report.removed_chunks, ", compacted" if report.compacted else "",
                     report.seconds)
        return report

    def _apply(self, name: str, config, mem, change: Change, max_segments: Optional[int]) -> SyncReport:
        """The replay path: tombstone the rows of the chunks the change removed and build the chunks
        it added, never one the memory already holds."""
        known = mem.known_chunks()
        gone = sorted(set(change.removed.tolist()) & known)
        if gone:
            mem.delete(gone)
        new = [c for c in change.added.tolist() if c not in known]
        added, built, done = self.build(name, config, mem, new, max_segments) if new else (0, 0, True)
        return SyncReport(added, built, len(gone), False, 0.0, done)

    def _sync(self, name: str, config, mem, max_segments: Optional[int]) -> SyncReport:
        """The rebuild path: make the memory hold exactly the collection's stored chunks by
        comparing every chunk id (O(collection); only when the oplog cannot say what changed)."""
        stored = self.store.chunk_ids(name)  # ascending
        have = np.unique(mem.chunk_ids())
        extra = np.setdiff1d(have, stored, assume_unique=True)
        missing = np.setdiff1d(stored, have, assume_unique=True)
        if len(extra):
            mem.delete(extra.tolist())
        added, built, done = self.build(name, config, mem, missing.tolist(), max_segments)
        return SyncReport(added, built, len(extra), False, 0.0, done)


class DerivedMemoryModeBase(MemoryModeBase):
    """A mode with a derived memory per collection (`self.memories`, made by `make_manager`, None
    where the store view has no place for it): kept in step after writes, at start-up and on drop."""

    def __init__(self, runtime: ModeRuntime, settings):
        super().__init__(runtime, settings)
        self.memories: Optional[DerivedMemoryManager] = None
        if runtime.store is not None and hasattr(runtime.store, "memory_folder"):
            self.memories = self.make_manager()

    @abstractmethod
    def make_manager(self) -> DerivedMemoryManager:
        """The manager of this mode's memory on `self.runtime.store`."""

    def start(self) -> None:
        if self.memories is None:
            return
        for config in self.runtime.store.list_collections():  # repair what a crash left behind, in the background
            if self.name in config.memory:
                self._schedule(config.name)

    def _schedule(self, name: str) -> None:
        """Catch the collection's memory up on the model worker, one segment per turn: a long
        build goes to the back of the queue after each segment, so generations interleave."""
        def step() -> None:
            try:
                report = self.memories.catch_up(name, max_segments=1)
            except Exception:  # noqa: BLE001 - logged; the next write or read retries
                log.exception("collection %r: building its %s %s failed", name, self.name, self.memories.what)
                return
            if not report.done and not getattr(self.runtime.store, "stopping", False):
                self.runtime.run_on_model(step)

        self.runtime.run_on_model(step)

    def after_write(self, collection: str) -> None:
        if self.memories is None:
            return
        if getattr(self.settings, "ingest_waits_for_memory", False):  # Ingest answers once the memory holds the write
            self.runtime.run_on_model(lambda: self.memories.catch_up(collection)).result()
        else:  # Ingest answers after LMDB; the memory follows on the model worker
            self._schedule(collection)

    def after_drop(self, collection: str) -> None:
        if self.memories is not None:
            self.runtime.run_on_model(lambda: self.memories.drop(collection))
