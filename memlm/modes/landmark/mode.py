"""`landmark`: every query head of every memory layer picks its top-k blocks of the collection's
block memory by scoring the blocks' representations with its own query, and attends to those
blocks' keys and values together with the local context in one softmax (Landmark Attention's
random access, training-free: `blocks.BlockKV`; by default a block scores as its best row,
exact, which measured far better than InfLLM-like mean keys or Quest's min/max bounds). Unlike knn's default,
which picks chunks by a text search before the model runs, the model's attention chooses, per
head, per layer, per token.

The block memory is a KV memory in knn's segment format (`memlm.index.kv_memory`), built and kept
in step by the same `KVMemoryManager` (watermark, oplog replay, crash repair, deletes) in the
collection's `kv-landmark/` folder, or in knn's `kv/` when the collection has knn memory with the
same options (one memory for both); a block is one of the store's chunks. A generation catches the
memory up, loads it (cached until its segments or tombstones change) and runs the token loop in
knn's `knn_mode` with `BlockKV` stores at the memory layers. Citations: the chunks whose blocks
were read most: by the share of the decode steps' attention their rows got (heads x layers).
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from memlm.index.types import SearchHit
from memlm.modes.base import GenerationHooks, ReadPlan
from memlm.modes.knn.mode import KVMemoryModeBase
from memlm.modes.landmark.settings import Settings

log = logging.getLogger(__name__)

CITED_BLOCKS = 8
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "train" / "trained" / "landmark-smollm2-cpu"


class Mode(KVMemoryModeBase):
    name = "landmark"
    summary = "each head reads its top-k memory blocks, chosen by its own attention over block representations (Landmark Attention)"
    derives = "block memory: the model's keys and values of every stored token at the memory layers, by chunk"
    k_means = "memory blocks (chunks) each query head reads per layer"
    max_k = 64

    def __init__(self, runtime, settings: Optional[Settings]):
        super().__init__(runtime, settings or Settings())
        self._loaded: OrderedDict = OrderedDict()  # (name, created_at) -> (memory state, (memories, block ids, offset))
        self._landmarks = None  # the trained landmark adapter ("trained"), loaded on first use

    def landmarks(self):
        """The trained landmark adapter for the served model (representation 'trained'), or
        FailedPrecondition naming what is missing."""
        from memlm.errors import FailedPrecondition
        from memlm.model import Llama
        from memlm.train.weights import BaseModelMismatch, folder_fingerprint, load_adapter

        if self._landmarks is None:
            folder = Path(self.settings.weights) if self.settings.weights else SHIPPED_WEIGHTS
            model = self.runtime.model
            if not isinstance(model, Llama):
                raise FailedPrecondition("trained landmarks run on memlm's own Llama (model.model_impl 'memlm')")
            if not (folder / "adapter.json").is_file():
                raise FailedPrecondition(f"landmark.representation 'trained' has no trained weights at {folder} "
                                         "(train them with `memlm train landmark`, then set landmark.weights)")
            if self.runtime.model_dir is None:
                raise FailedPrecondition("trained landmarks need the served model's folder to check their base model")
            try:
                adapter = load_adapter(folder, model, folder_fingerprint(self.runtime.model_dir), attach=False)
            except BaseModelMismatch as e:
                raise FailedPrecondition(f"landmark: {e}") from e
            self._landmarks = adapter.eval().requires_grad_(False)
            log.info("landmark: trained landmarks from %s (%d parameters)", folder,
                     sum(p.numel() for p in adapter.parameters()))
        return self._landmarks

    def validate(self, request, collection) -> None:
        if request.filter is not None:
            from memlm.errors import InvalidArgument

            raise InvalidArgument("landmark reads the blocks its attention picks from the whole collection; "
                                  "`filter` is for rag or chunk-gated knn")
        self.memories.check_collection(request.collection)  # FailedPrecondition: another tokenizer

    async def plan(self, request) -> ReadPlan:
        return ReadPlan()  # the model picks the blocks as it runs; the hooks cite them

    def block_memories(self, name: str):
        """The collection's memory caught up and loaded as blocks: (layer memories, chunk id of each
        block, local offset), cached for `resident_collections` collections."""
        from memlm.modes.landmark.blocks import load_block_memories

        collection = self.memories.check_collection(name)
        self.memories.catch_up(name, collection)
        mem = self.memories.memory(name, collection)
        key = (name, collection.created_at)
        state = (tuple(mem.manifest.segments), tuple(mem.manifest.deleted_chunks))
        cached = self._loaded.pop(key, None)
        if cached is None or cached[0] != state:
            while len(self._loaded) >= self.settings.resident_collections:
                self._loaded.popitem(last=False)
            s = self.settings
            trained = self.landmarks() if s.representation == "trained" else None
            cached = (state, load_block_memories(self.runtime.model, mem, layers=_layers(s.layers), top_k=s.top_k,
                                                 representation=s.representation, positions=s.positions,
                                                 min_memory_position=s.min_memory_position, group=s.group,
                                                 candidates=s.candidates, landmarks=trained))
        self._loaded[key] = cached
        return mem, *cached[1]

    @contextmanager
    def generation(self, request, plan: ReadPlan) -> Iterator[GenerationHooks]:
        from memlm.modes.knn.reading import knn_mode

        t0 = time.perf_counter()
        mem, memories, block_ids, _offset = self.block_memories(request.collection)
        for m in memories.values():
            m.top_k = request.k or self.settings.top_k
            m.store.reads.zero_()
            m.store.mass.zero_()
        hooks = _LandmarkHooks(self, request.collection, memories, block_ids)
        hooks.memory_s = time.perf_counter() - t0  # syncing and loading the block memory
        with knn_mode(self.runtime.model, mem, memories.config, layer_memories=memories):
            yield hooks


def _layers(spec: str):
    from memlm.modes.knn.memories import _layer_spec

    return _layer_spec(spec)


class _LandmarkHooks(GenerationHooks):
    def __init__(self, mode: Mode, collection: str, memories, block_ids):
        self.mode, self.collection, self.memories, self.block_ids = mode, collection, memories, block_ids

    @property
    def citations(self) -> tuple[SearchHit, ...]:
        from memlm.modes.landmark.blocks import blocks_read

        picked = blocks_read(self.memories, self.block_ids, CITED_BLOCKS)
        records = self.mode.runtime.store.read_chunks(self.collection, [c for c, _ in picked], missing_ok=True)
        return tuple(SearchHit(chunk_id=c, doc_id=r.doc_id, score=share, text=r.text, metadata={},
                               chunk_index=r.chunk_index, start=r.start, end=r.end)
                     for (c, share), r in zip(picked, records) if r is not None)
