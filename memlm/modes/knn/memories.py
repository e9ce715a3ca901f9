"""The KV memories of a store's knn collections (created with `--memory knn`), kept in step
with LMDB, and the loaded copies the `knn` mode reads.

One `KVMemory` per collection and mode, in `collections/<name>/kv/` (knn) or `kv-<mode>/`
(landmark: `KVMemoryManager(mode=...)`); a collection with knn and landmark memory on, with the
same options, has one memory in `kv/` that both read (each mode reports its own watermark). Like the FAISS index it is derived
data: LMDB's chunks (with their language-model token ids) are the truth. It follows the one rule
of derived memory (memlm.modes.base): a durable watermark (`manifest.applied_seq`, also reported
to the store, which keeps its oplog back to it), and `catch_up(name)` (the lifecycle every derived
memory shares, `memlm.modes.derived_memory.DerivedMemoryManager`):
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
from collections import OrderedDict
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from memlm.index.kv_memory import KVMemory
from memlm.modes.derived_memory import DerivedMemoryManager
from memlm.modes.knn.settings import BuildSettings, CollectionOptions, Settings
from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
from memlm.modes.knn.reading import (
    PRESETS, ReadConfig, LayerMemory, gated_rows, knn_mode, num_layers, prepare_layer_memories, resolve_layers,
)

log = logging.getLogger(__name__)

KV_FOLDER = "kv"


class KVMemoryManager(DerivedMemoryManager):
    """Builds, repairs and loads the KV memory of every knn collection of one store."""

    what = "KV memory"

    def __init__(self, store, model, settings: Optional[BuildSettings] = None, model_name: str = "", mode: str = "knn"):
        """mode: whose memory this is: the collection option (`config.memory[mode]`, a knn
        `CollectionOptions`), the watermark's name and the folder (`kv/` for knn, `kv-<mode>/`
        otherwise). A knn manager also reads (`knn_context`, from its settings' preset)."""
        settings = settings or Settings()
        super().__init__(store, model, settings, model_name, mode, KV_FOLDER if mode == "knn" else f"{KV_FOLDER}-{mode}")
        self.config = None
        if isinstance(settings, Settings):
            if settings.preset not in PRESETS:
                raise ValueError(f"knn.preset={settings.preset!r} is not one of {sorted(PRESETS)}")
            gating = {name: value for name in ("candidate_chunks", "follow_chunks")
                      if (value := getattr(settings, name)) is not None}
            self.config = ReadConfig.from_name(settings.preset, **gating)  # ValueError for a contradiction
        # (name, created_at) -> (memory state, loaded layer memories, layers read), most recent last
        self._loaded: "OrderedDict[tuple[str, float], tuple[tuple, dict[int, LayerMemory], tuple]]" = OrderedDict()

    # --- what the memory is -----------------------------------------------------------------

    def folder_for(self, config) -> str:
        """Where this mode's memory of a collection lives: knn's `kv/` when the collection also
        has knn memory with the same options (one memory for both modes), else its own folder."""
        if self.mode != "knn" and config.memory.get("knn") == config.memory.get(self.mode):
            return KV_FOLDER
        return self.folder

    def open_memory(self, path: Path) -> KVMemory:
        return KVMemory.open(path)

    def create_memory(self, path: Path, config) -> KVMemory:
        """An empty memory shaped by the collection's knn options (fixed when it was created). Empty,
        it holds every write up to seq 0: catching up replays the whole oplog if the store still
        has it, else compares chunk ids."""
        o = CollectionOptions(**config.memory[self.mode])
        layers = resolve_layers(_layer_spec(o.layers), num_layers(self.model))
        mem = kv_memory_for_model(path, self.model, layers=layers, window=o.window, overlap=o.overlap, dtype=o.dtype)
        mem.set_applied_seq(0)
        return mem

    def forget(self, name: str) -> None:
        for key in [k for k in self._loaded if k[0] == name]:
            del self._loaded[key]

    def build(self, name: str, config, mem: KVMemory, chunk_ids: Sequence[int],
              max_segments: Optional[int] = None) -> tuple[int, int, bool]:
        """Run the model over these chunks, whole documents in chunk order, in segments of about
        `knn.build_batch_tokens` tokens: (tokens added, documents, whether all were built). Chunks
        deleted since their ids were read are skipped (their removal is a later oplog entry)."""
        chunk_overlap = config.chunk_overlap
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
