"""The KV memories of a store's knn collections (created with `--memory knn`), kept in step
with LMDB, and the loaded copies the `knn` mode reads.

One `KVMemory` per collection and mode, in `collections/<name>/kv/` (knn) or `kv-<mode>/`
(landmark: `KVMemoryManager(mode=...)`); a collection with knn and landmark memory on, with the
same options, has one memory in `kv/` that both read (each mode reports its own watermark). Like the FAISS index it is derived
data: LMDB's chunks (with their language-model token ids) are the truth. It follows the one rule
of derived memory (memlm.modes.base): a durable watermark (`manifest.applied_seq`, also reported
to the store, which keeps its oplog back to it), and `catch_up(name)`:
- in step (watermark == the store's last seq): one LMDB record read, whatever the collection's size;
- behind: the oplog entries past the watermark are applied: rows of removed chunks (deleted or
  replaced documents) tombstoned, added chunks run through the model, document by document in
  chunk order, appended as segments of about `knn.build_batch_tokens` tokens (a chunk the memory
  already knows is never built twice);
- when the oplog no longer reaches back (truncated, a memory written before watermarks, a lost
  folder rebuilt empty): every chunk id is compared with LMDB's (`_sync`), once;
- a memory with more than `knn.max_segments` segments is compacted.
The knn mode runs it on the model worker after each acknowledged write (waited for or queued one
segment per turn, `knn.ingest_waits_for_memory`), at start-up for every knn collection, and at the
start of every knn generation. The store never runs the model: it only reports writes.

Threading: everything here runs on the model host's one worker thread; the model is never shared.
Chunk-gated knn (preset "default": 8 candidate chunks, 2 following chunks each): a generation
reads only those chunks' rows, memory-mapped from the segment files per generation; nothing stays
loaded. Ungated (preset "ungated"): the whole memory is loaded into FAISS stores
(`prepare_layer_memories`), cached for the `knn.resident_collections` most recently used
collections and extended or reloaded when the memory's segments or tombstones change.
"""
from __future__ import annotations

import logging
import shutil
import time
import weakref
from collections import OrderedDict
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from memlm.errors import FailedPrecondition, NotFound
from memlm.index.derived import Change, bring_up_to_date
from memlm.index.kv_memory import MANIFEST, KVMemory
from memlm.modes.knn.settings import BuildSettings, CollectionOptions, Settings
from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
from memlm.modes.knn.reading import (
    PRESETS, ReadConfig, LayerMemory, gated_rows, knn_mode, num_layers, prepare_layer_memories, resolve_layers,
)

log = logging.getLogger(__name__)

KV_FOLDER = "kv"
# store -> {(folder, created_at): KVMemory}: every manager of a store (one per mode) opens a
# folder's memory once, so two modes sharing a folder see one manifest.
_OPENED: "weakref.WeakKeyDictionary[object, dict[tuple[str, float], KVMemory]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class SyncReport:
    added_rows: int = 0  # memory tokens built
    built_documents: int = 0
    removed_chunks: int = 0  # chunks whose rows were tombstoned
    compacted: bool = False
    seconds: float = 0.0
    done: bool = True  # False: a bounded catch-up left work for the next call


class KVMemoryManager:
    """Builds, repairs and loads the KV memory of every knn collection of one store."""

    def __init__(self, store, model, settings: Optional[BuildSettings] = None, model_name: str = "", mode: str = "knn"):
        """mode: whose memory this is: the collection option (`config.memory[mode]`, a knn
        `CollectionOptions`), the watermark's name and the folder (`kv/` for knn, `kv-<mode>/`
        otherwise). A knn manager also reads (`knn_context`, from its settings' preset)."""
        settings = settings or Settings()
        self.store, self.model, self.settings = store, model, settings
        self.model_name, self.mode = model_name, mode
        self.folder = KV_FOLDER if mode == "knn" else f"{KV_FOLDER}-{mode}"
        self.config = None
        if isinstance(settings, Settings):
            if settings.preset not in PRESETS:
                raise ValueError(f"knn.preset={settings.preset!r} is not one of {sorted(PRESETS)}")
            gating = {name: value for name in ("candidate_chunks", "follow_chunks")
                      if (value := getattr(settings, name)) is not None}
            self.config = ReadConfig.from_name(settings.preset, **gating)  # ValueError for a contradiction
        self._reported: dict[tuple[str, float], int] = {}  # (name, created_at) -> the watermark last set
        # (name, created_at) -> (memory state, loaded layer memories, layers read), most recent last
        self._loaded: "OrderedDict[tuple[str, float], tuple[tuple, dict[int, LayerMemory], tuple]]" = OrderedDict()

    # --- opening ---------------------------------------------------------------------------

    def check_collection(self, name: str):
        """The collection's config if knn can read it; FailedPrecondition naming why not."""
        config = self.store.collection_config(name)  # NotFound
        if self.mode not in config.memory:
            raise FailedPrecondition(
                f"collection {name!r} has no {self.mode} memory; create it with it on (memory={{'{self.mode}': {{}}}}; "
                f"CLI: memlm ingest PATH --collection NEW_NAME --memory {self.mode}) to use memory mode '{self.mode}'"
            )
        if self.model_name and config.tokenizer != self.model_name:
            raise FailedPrecondition(
                f"collection {name!r} was tokenized for {config.tokenizer!r} but the served model is "
                f"{self.model_name!r}; its KV memory must come from the served model: re-create the collection"
            )
        return config

    def folder_for(self, config) -> str:
        """Where this mode's memory of a collection lives: knn's `kv/` when the collection also
        has knn memory with the same options (one memory for both modes), else its own folder."""
        if self.mode != "knn" and config.memory.get("knn") == config.memory.get(self.mode):
            return KV_FOLDER
        return self.folder

    def memory(self, name: str, config=None) -> KVMemory:
        """The collection's KV memory, opened (or created empty) on first use. `config`: the
        collection's, when the caller has already checked it. One object per folder and store:
        the managers of two modes sharing a folder share it (they run on the one model worker)."""
        config = config or self.check_collection(name)
        path = self.store.memory_folder(name) / self.folder_for(config)
        key = (str(path), config.created_at)
        opened = _OPENED.setdefault(self.store, {})
        mem = opened.get(key)
        if mem is not None and (mem.path / MANIFEST).exists():
            return mem
        try:
            mem = KVMemory.open(path)
        except FileNotFoundError:
            mem = self._create(path, config)
        except Exception as e:  # noqa: BLE001 - derived data: start over from LMDB
            log.warning("collection %r: KV memory at %s is unreadable (%s); rebuilding it from the store", name, path, e)
            shutil.rmtree(path, ignore_errors=True)
            mem = self._create(path, config)
        for k in [k for k in opened if k[0] == key[0]]:  # a dropped namesake's
            del opened[k]
        opened[key] = mem
        return mem

    def _create(self, path: Path, config) -> KVMemory:
        """An empty memory shaped by the collection's knn options (fixed when it was created). Empty,
        it holds every write up to seq 0: catching up replays the whole oplog if the store still
        has it, else compares chunk ids."""
        o = CollectionOptions(**config.memory[self.mode])
        layers = resolve_layers(_layer_spec(o.layers), num_layers(self.model))
        mem = kv_memory_for_model(path, self.model, layers=layers, window=o.window, overlap=o.overlap, dtype=o.dtype)
        mem.set_applied_seq(0)
        return mem

    def drop(self, name: str) -> None:
        """The collection was dropped: forget its memory and delete the folder."""
        folder = str(self.store.memory_folder(name))
        opened = _OPENED.get(self.store, {})
        for k in [k for k in opened if str(Path(k[0]).parent) == folder]:
            del opened[k]
        for key in [k for k in self._loaded if k[0] == name]:
            del self._loaded[key]
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
            if len(mem.manifest.segments) > self.settings.max_segments and not getattr(self.store, "stopping", False):
                mem.compact()
                report = replace(report, compacted=True)
            mem.set_applied_seq(target)
            self.store.set_watermark(name, self.mode, target)
            self._reported[(name, config.created_at)] = target
        report = replace(report, seconds=time.perf_counter() - t0)
        if report.added_rows or report.removed_chunks or report.compacted:
            log.info("collection %r: KV memory caught up to seq %d%s: +%d tokens (%d documents), -%d chunks%s in %.1f s",
                     name, target, "" if report.done else " (in part)", report.added_rows, report.built_documents,
                     report.removed_chunks, ", compacted" if report.compacted else "", report.seconds)
        return report

    def _apply(self, name: str, config, mem: KVMemory, change: Change, max_segments: Optional[int]) -> SyncReport:
        """The replay path: tombstone the rows of the chunks the change removed and build the chunks
        it added, never one the memory already holds."""
        known = mem.known_chunks()
        gone = sorted(set(change.removed.tolist()) & known)
        if gone:
            mem.delete(gone)
        new = [c for c in change.added.tolist() if c not in known]
        added, built, done = self._build(name, mem, new, config.chunk_overlap, max_segments) if new else (0, 0, True)
        return SyncReport(added, built, len(gone), False, 0.0, done)

    def _sync(self, name: str, config, mem: KVMemory, max_segments: Optional[int]) -> SyncReport:
        """The rebuild path: make the memory hold exactly the collection's stored chunks by
        comparing every chunk id (O(collection); only when the oplog cannot say what changed)."""
        stored = self.store.chunk_ids(name)  # ascending
        have = np.unique(mem.chunk_ids())
        extra = np.setdiff1d(have, stored, assume_unique=True)
        missing = np.setdiff1d(stored, have, assume_unique=True)
        if len(extra):
            mem.delete(extra.tolist())
        added, built, done = self._build(name, mem, missing.tolist(), config.chunk_overlap, max_segments)
        return SyncReport(added, built, len(extra), False, 0.0, done)

    def _build(self, name: str, mem: KVMemory, chunk_ids: Sequence[int], chunk_overlap: int,
               max_segments: Optional[int] = None) -> tuple[int, int, bool]:
        """Run the model over these chunks, whole documents in chunk order, in segments of about
        `knn.build_batch_tokens` tokens: (tokens added, documents, whether all were built). Chunks
        deleted since their ids were read are skipped (their removal is a later oplog entry)."""
        docs: dict[str, list[tuple[int, int, np.ndarray]]] = {}
        for cid, rec in zip(chunk_ids, self.store.read_chunks(name, list(chunk_ids), missing_ok=True)):
            if rec is not None:
                docs.setdefault(rec.doc_id, []).append((rec.chunk_index, int(cid), rec.token_ids))
        batch: list[tuple[np.ndarray, int, int]] = []  # (token ids, chunk id, document number)
        size = added = segments = 0
        for d, (_doc_id, chunks) in enumerate(sorted(docs.items())):
            chunks.sort()
            for j, (_index, cid, toks) in enumerate(chunks):
                # Overlapping chunks repeat their predecessor's last tokens: each token is stored once.
                toks = toks[chunk_overlap:] if j > 0 and chunk_overlap else toks
                batch.append((toks, cid, d))
                size += len(toks)
            if size >= self.settings.build_batch_tokens or d == len(docs) - 1:  # whole documents per segment
                if getattr(self.store, "stopping", False):  # shutting down: the next start builds the rest
                    log.info("collection %r: KV memory build stopped for shutdown; it resumes at the next start", name)
                    return added, len(docs), False
                if max_segments is not None and segments >= max_segments:
                    return added, len(docs), False
                toks, cids, doc_numbers = zip(*batch)
                added += build_kv_memory(mem, self.model, list(toks), list(cids), documents=list(doc_numbers))
                segments += 1
                batch, size = [], 0
        return added, len(docs), True

    # --- reading ----------------------------------------------------------------------------

    @property
    def candidate_chunks(self) -> int:
        """Chunks whose rows a knn generation reads (0: all; see ReadConfig.candidate_chunks), at most
        the store's largest search (`store.max_k`)."""
        settings = getattr(self.store, "settings", None)  # an in-process store: its largest search
        return min(self.config.candidate_chunks, settings.max_k) if settings is not None else self.config.candidate_chunks

    def knn_context(self, name: str, top_k: Optional[int] = None,
                    chunks: Optional[Sequence[int]] = None) -> AbstractContextManager:
        """Sync the memory, load it (cached), and return the `knn_mode` context for one generation.
        chunks: read only these chunks' rows (chunk-gated knn; the caller ranked them for the prompt)."""
        collection = self.check_collection(name)
        self.catch_up(name, collection)  # every write acknowledged before this request (one LMDB read when in step)
        mem = self.memory(name, collection)
        # Read the preset's layers that this memory stores (built with its collection's `layers` option).
        wanted = resolve_layers(self.config.layers, num_layers(self.model))
        layers = tuple(l for l in wanted if l in mem.layers) or tuple(mem.layers)
        config = replace(self.config, layers=layers, top_k=top_k or self.settings.top_k or self.config.top_k)
        if bool(config.candidate_chunks) != (chunks is not None):
            raise ValueError(f"knn config reads {config.candidate_chunks or 'all'} chunks; got chunks={chunks!r}")
        if chunks is not None:  # a few chunks' rows, read from disk per generation: nothing stays resident
            rows = gated_rows(self.model, mem, config, chunks, lambda c, n: self.store.following_chunks(name, c, n))
            return knn_mode(self.model, mem, config, layer_memories=rows)
        key = (name, collection.created_at)
        state = (tuple(mem.manifest.segments), tuple(mem.manifest.deleted_chunks))
        cached = self._loaded.pop(key, None)
        if cached is not None and cached[0] == state and cached[2] == layers:
            layer_memories = cached[1]
        else:
            while len(self._loaded) >= self.settings.resident_collections:
                self._loaded.popitem(last=False)
            # Extends the previous load in place when the memory only gained segments/tombstones.
            previous = cached[1] if cached is not None and cached[2] == layers else None
            layer_memories = prepare_layer_memories(self.model, mem, config, previous=previous)
        self._loaded[key] = (state, layer_memories, layers)
        for m in layer_memories.values():
            m.top_k = config.top_k
        return knn_mode(self.model, mem, config, layer_memories=layer_memories)


def _layer_spec(spec: str):
    """The `layers` collection option: a preset name, or comma-separated layer indices."""
    spec = spec.strip()
    if spec and all(part.strip().isdigit() for part in spec.split(",")):
        return tuple(int(part) for part in spec.split(","))
    return spec
