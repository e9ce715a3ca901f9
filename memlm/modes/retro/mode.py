"""`retro`: the model reads each completed chunk's neighbours from the collection through chunked
cross-attention (RETRO, retro-fitted on the frozen bundled model; `memlm.modes.retro.model`).

A generation: the RETRO adapter (neighbour encoder + CCA layers, `adapter.RetroAdapter`) is
attached to the served model for the request only, so other modes run the plain model (and its
fused decode step) untouched. Before the prefill the prompt's completed chunks get their
neighbours; each time a sampled token completes a chunk, that chunk's neighbours are searched in
the live store (the chunk's text; the request's filter and search mode apply; each hit brings the
chunk after it as its continuation) before the pass that feeds the token, and encoded once in it.
Nothing earlier is recomputed. The chunk grid ends at the prompt's last token
(`retro.align_prompt_end`), so a question shorter than a chunk still has neighbours when the answer
starts. Citations: every neighbour chunk read. Deleting a document removes it from the next search.

The base model's states of each neighbour are kept across generations by their token ids
(`state_cache.NeighbourStateCache`, `retro.state_cache_mb`): a chunk read again skips its base pass.
A collection made with retro memory on (`--memory retro`) also keeps every chunk's states on disk
(`memory.NeighbourStateMemory`, built after each acknowledged write on the model worker, in step
by the lifecycle of `memlm.modes.derived_memory`): a retrieval then reads them instead of running
the base pass (`memory.StoredFirst`). A chunk not built yet is computed as without them.

Store reads run on a thread of the mode's own: the model worker's thread keeps one FAISS thread.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from memlm.errors import FailedPrecondition, InvalidArgument
from memlm.modes.base import GenerationHooks, ModeRuntime, ReadPlan
from memlm.modes.derived_memory import DerivedMemoryModeBase
from memlm.modes.retro.settings import Settings
from memlm.modes.retro.state_cache import NeighbourStateCache

log = logging.getLogger(__name__)

SHIPPED_WEIGHTS = Path(__file__).resolve().parents[2] / "train" / "trained" / "retro-smollm2-cpu"


class Mode(DerivedMemoryModeBase):
    name = "retro"
    summary = "each completed 64-token chunk's neighbours from the collection, read through chunked cross-attention (RETRO)"
    derives = "neighbour states: the base model's states of every stored chunk and its continuation at the CCA layers"
    memory_required = False  # without them, a read computes the states
    k_means = "neighbours per chunk"
    max_k = 16

    def __init__(self, runtime: ModeRuntime, settings: Optional[Settings]):
        self._adapter = None
        self._why_not: Optional[str] = None
        super().__init__(runtime, settings or Settings())
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="memlm-retro-read")
        self.state_cache = NeighbourStateCache(self.settings.state_cache_mb << 20)

    def make_manager(self):
        from memlm.modes.retro.memory import NeighbourStateManager

        r = self.runtime
        return NeighbourStateManager(r.store, r.model, self.settings, lambda: self.adapter().config, model_name=r.model_name)

    def state_source(self, collection: str):
        """Where a generation over `collection` finds its neighbours' base states: the cache, in
        front of the collection's stored states when it has retro memory on (model worker only)."""
        if self.memories is None or not collection:
            return self.state_cache
        config = self.runtime.store.collection_config(collection)
        if self.name not in config.memory:
            return self.state_cache
        from memlm.modes.retro.memory import StoredFirst

        return StoredFirst(self.state_cache, self.memories.memory(collection, config))

    @property
    def weights_folder(self) -> Path:
        return Path(self.settings.weights) if self.settings.weights else SHIPPED_WEIGHTS

    def adapter(self):
        """The RETRO adapter for the served model (loaded once), or FailedPrecondition."""
        if self._adapter is None and self._why_not is None:
            self._why_not = self._load()
        if self._why_not is not None:
            raise FailedPrecondition(self._why_not)
        return self._adapter

    def _load(self) -> Optional[str]:
        from memlm.model import Llama
        from memlm.train.weights import BaseModelMismatch, folder_fingerprint, load_adapter

        model = self.runtime.model
        if not isinstance(model, Llama):
            return f"memory mode 'retro' runs on memlm's own Llama (model.model_impl 'memlm'); the served model is {type(model).__name__}"
        if not (self.weights_folder / "adapter.json").is_file():
            return (f"memory mode 'retro' has no trained weights at {self.weights_folder} (train them with "
                    "`memlm train retro`, then set retro.weights to the run folder)")
        if self.runtime.model_dir is None:
            return "memory mode 'retro' needs the served model's folder to check its weights were trained on it"
        try:
            adapter = load_adapter(self.weights_folder, model, folder_fingerprint(self.runtime.model_dir), attach=False)
        except BaseModelMismatch as e:
            return f"memory mode 'retro': {e}"
        adapter.eval().requires_grad_(False)
        self._adapter = adapter
        log.info("retro: adapter from %s (%d parameters, CCA at layers %s)", self.weights_folder,
                 sum(p.numel() for p in adapter.parameters()), list(adapter.config.layers))
        return None

    def unavailable(self) -> Optional[str]:
        why = super().unavailable()
        if why is None:
            try:
                self.adapter()
            except FailedPrecondition as e:
                return str(e)
        return why

    def validate(self, request, collection) -> None:
        m = self.adapter().config.chunk_tokens
        if collection is not None and collection.chunk_tokens != m:
            raise FailedPrecondition(f"collection {collection.name!r} has chunks of {collection.chunk_tokens} tokens; "
                                     f"retro reads neighbours of {m}-token chunks (create the collection with chunk_tokens={m})")
        if request.k and request.k > self.max_k:
            raise InvalidArgument(f"k={request.k} neighbours per chunk is above retro's limit of {self.max_k}")

    async def plan(self, request) -> ReadPlan:
        return ReadPlan()  # neighbours are searched as chunks complete; the hooks collect the citations

    @contextmanager
    def generation(self, request, plan: ReadPlan) -> Iterator[GenerationHooks]:
        adapter, model = self.adapter(), self.runtime.model
        hooks = _RetroHooks(self, adapter, request)
        adapter.attach(model)
        try:
            yield hooks
        finally:
            adapter.slot.state = None
            adapter.detach(model)

    def close(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)


class _RetroHooks(GenerationHooks):
    def __init__(self, mode: Mode, adapter, request):
        self.mode, self.adapter, self.request = mode, adapter, request
        self.config = adapter.config
        self.chunk_tokens = self.config.chunk_tokens
        self.k = request.k or mode.settings.neighbours or self.config.neighbours
        self.state = None
        self.next_chunk = 0  # the first chunk whose neighbours are not searched yet
        self.read_s = 0.0
        self.chunks_read = 0
        self._cited: dict[int, object] = {}

    @property
    def memory_s(self) -> float:  # searching and encoding neighbours
        return self.read_s + (self.state.encode_s if self.state is not None else 0.0)

    @property
    def citations(self) -> tuple:
        return tuple(self._cited.values())

    def chunk_phase(self, prompt_ids: Sequence[int]) -> int:
        m = self.chunk_tokens
        phase = (-len(prompt_ids)) % m if self.mode.settings.align_prompt_end else 0
        self.state = self.adapter.new_state(self.mode.runtime.model, phase, self.mode.state_source(self.request.collection))
        self.adapter.slot.state = self.state
        return phase

    def on_chunk(self, token_ids: Sequence[int], end: int) -> None:
        import dataclasses

        from memlm.modes.retro.neighbours import search_neighbours

        t0 = time.perf_counter()
        m, state = self.chunk_tokens, self.state
        last = (end + state.phase) // m  # chunks [next_chunk, last) are complete
        chunks = list(range(self.next_chunk, last))
        self.next_chunk = last
        tokenizer = self.mode.runtime.tokenizer
        texts = {u: tokenizer.decode(list(token_ids[slice(*state.chunk_span(u))]), skip_special_tokens=True) for u in chunks}
        chunks = [u for u in chunks if texts[u].strip()]  # nothing to search with: the chunk reads nothing
        if not chunks:
            self.read_s += time.perf_counter() - t0
            return
        r = self.request
        config = dataclasses.replace(self.config, neighbours=self.k)
        found = self.mode._reader.submit(
            search_neighbours, self.mode.runtime.store, r.collection, [texts[u] for u in chunks], config,
            filter=r.filter, mode=r.search_mode or self.mode.settings.search_mode or None).result()
        for u, (ids, valid, hits) in zip(chunks, found):
            state.set_neighbours(u, torch.from_numpy(ids)[None], torch.from_numpy(valid)[None])
            for h in hits:
                self._cited.setdefault(h.chunk_id, h)
        self.chunks_read += len(chunks)
        self.read_s += time.perf_counter() - t0
