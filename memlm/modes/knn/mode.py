"""`knn`: the model attends to its own keys and values of the collection's text.

The read plan (chunk-gated presets, the default): the collection's `candidate_chunks` best chunks
for the prompt by the store's search (the request's filter applies), each bringing the
`follow_chunks` chunks after it; the citations are the chunks found. The generation context syncs
the collection's KV memory with the store, loads those chunks' rows (or, ungated, the whole memory)
and runs the token loop inside `reading.knn_mode`. The derived memory is kept in step by
`memories.KVMemoryManager` on the model worker, by watermark (`catch_up`): after every
acknowledged write (`knn.ingest_waits_for_memory`: Ingest answers after the memory is built, or
right after LMDB with the build queued), once per knn collection at start-up (crash repair), and
at the start of every knn generation (so it reads every write acknowledged before it).

The KV memory lives in the store view's `memory_folder(collection)`: beside the store's files
for a MemoryStore in this process, in the host's own folder for a RemoteStore (then writes are
not pushed: the catch-up at the start of each knn generation finds them).
It runs on Llama models: memlm's own `Llama` (the default for a Llama folder) or, with
`model.model_impl = "transformers"`, transformers' LlamaForCausalLM.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

from memlm.errors import InvalidArgument
from memlm.modes.base import GenerationHooks, ModeRuntime, ReadPlan, search_for_prompt
from memlm.modes.derived_memory import DerivedMemoryModeBase
from memlm.modes.knn.settings import Settings


class KVMemoryModeBase(DerivedMemoryModeBase):
    """A mode that reads a per-collection KV memory (`memories.KVMemoryManager` for `self.name`):
    the memory kept in step with the store (after writes, at start-up, on drop: the lifecycle of
    `memlm.modes.derived_memory`) and the checks that the served model can build it. knn's `Mode`;
    landmark's."""

    def make_manager(self):
        from memlm.modes.knn.memories import KVMemoryManager

        runtime = self.runtime
        return KVMemoryManager(runtime.store, runtime.model, self.settings, model_name=runtime.model_name, mode=self.name)

    def unavailable(self) -> Optional[str]:
        from memlm.models.loading import model_facts

        architecture = model_facts(self.runtime.model).architecture
        if architecture != "LlamaForCausalLM":
            return f"memory mode {self.name!r} runs on Llama models (LlamaForCausalLM); the served model is {architecture}"
        if self.memories is None:
            return super().unavailable() or (
                f"memory mode {self.name!r} needs a store view with a place for its KV memory (a MemoryStore in this "
                "process, or memlm.remote_store.RemoteStore), and this model host has another")
        return None


class Mode(KVMemoryModeBase):
    name = "knn"
    summary = "attention over the model's own keys and values of the collection's text (Memorizing Transformers)"
    derives = "KV memory: the model's keys and values of every stored token at the memory layers"
    k_means = "memory rows each query head retrieves per layer"

    def __init__(self, runtime: ModeRuntime, settings: Optional[Settings]):
        super().__init__(runtime, settings or Settings())

    def validate(self, request, collection) -> None:
        if request.filter is not None and not self.memories.candidate_chunks:
            raise InvalidArgument("this server's knn reads the whole collection's KV memory (knn preset "
                                  f"{self.settings.preset!r}, candidate_chunks=0); `filter` needs "
                                  "chunk-gated knn (knn.candidate_chunks > 0, preset 'default') or rag")
        self.memories.check_collection(request.collection)  # FailedPrecondition: another tokenizer

    async def plan(self, request) -> ReadPlan:
        n = self.memories.candidate_chunks
        if not n:  # ungated: every row of the memory; nothing to cite
            return ReadPlan()
        hits, ms = await search_for_prompt(self.runtime.store, request, n)
        return ReadPlan(citations=hits, retrieval_ms=ms, data=[h.chunk_id for h in hits])

    @contextmanager
    def generation(self, request, plan: ReadPlan) -> Iterator[GenerationHooks]:
        t0 = time.perf_counter()
        context = self.memories.knn_context(request.collection, request.k, chunks=plan.data)
        hooks = GenerationHooks()
        hooks.memory_s = time.perf_counter() - t0  # syncing and loading the KV memory
        with context:
            yield hooks
