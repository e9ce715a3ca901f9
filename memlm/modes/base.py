"""What a memory mode implements, and what the host gives it.

A request's path: servicer -> `ModelHost.generate` (common checks) -> the mode's `validate`, then
`plan` (reads the store, off the model thread; the plan carries the citations: every chunk the
generation reads) -> on the model worker, the prompt from `plan.prompt_chunks`, then the token
loop inside the mode's `generation` context, which yields the `GenerationHooks` the loop calls.
The host never names a mode; the token loop never knows which one runs.

Derived memory (knn's KV memory; later landmark blocks, RETRO neighbours, product keys): a mode
with `CollectionOptions` keeps something per collection that has it on, with one rule for every
such structure (as the store's own FAISS index): a durable applied-seq watermark; it applies the
store's change log (`StoreView.changes`) past it, or rebuilds from the stored chunks when the log no
longer reaches back; it reports the watermark (`set_watermark`), and the store keeps the log back
to the lowest. The host forwards every acknowledged write into such a collection to `after_write`
(and a drop to `after_drop`) and calls `start` once (crash repair). A read in the mode catches up
first, so a generation sees every write acknowledged before it.

`StoreView` is everything a mode may read from the store. `MemoryStore` implements it in process;
a remote store must implement it too (today a host with a remote store offers the modes whose
`unavailable()` is None: none and rag).
"""
from __future__ import annotations

import abc
import asyncio
import time
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional, Protocol, Sequence

import numpy as np

from memlm.index.types import CollectionConfig, Filter, SearchHit

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel

    from memlm.engine import GenerationRequest


class StoreView(Protocol):
    """What a mode may read from the memory store."""

    def collection_config(self, name: str) -> CollectionConfig: ...

    def list_collections(self) -> list[CollectionConfig]: ...

    def search(self, collection: str, query: Optional[str] = None, vector: Optional[np.ndarray] = None,
               k: int = 10, filter: Optional[Filter] = None, mode: Optional[str] = None) -> list[SearchHit]: ...

    def chunk_ids(self, collection: str) -> np.ndarray: ...  # (n,) int64, ascending: every stored chunk

    def read_chunks(self, collection: str, chunk_ids: Sequence[int]) -> list[Any]: ...  # ChunkRecords, in order

    def following_chunks(self, collection: str, chunk_id: int, n: int) -> list[int]: ...

    # The change log, for derived memory kept in step by watermark (Chroma's max_seqid rule):
    def last_seq(self, collection: str) -> int: ...  # the newest acknowledged write's seq

    def changes(self, collection: str, after_seq: int, upto_seq: int) -> Optional[list[tuple[int, list[int], list[int]]]]:
        ...  # (seq, added chunk ids, removed chunk ids) after after_seq; None: truncated, rebuild

    def set_watermark(self, collection: str, mode: str, seq: int) -> None: ...  # durably applied up to seq


@dataclass(frozen=True)
class ReadPlan:
    """What a request reads, decided before the model runs."""

    citations: tuple[SearchHit, ...] = ()  # every chunk the generation reads, best first
    prompt_chunks: Optional[tuple[SearchHit, ...]] = None  # put into the prompt (rag); None: the plain prompt
    retrieval_ms: float = 0.0
    data: Any = None  # the mode's own (knn: the ranked chunk ids whose memory it reads)


class GenerationHooks:
    """How a mode takes part in the token loop (memlm.generation.generate_tokens). The defaults
    do nothing; a mode overrides what it needs.

    - `prefix_embeds(input_ids)`: extra input embeddings placed before the prompt (RMT's memory
      tokens), (1, P, dim), or None.
    - `chunk_tokens` / `on_chunk(token_ids, end)`: `on_chunk` gets all ids so far whenever the
      sequence (prompt + generated) completes chunks of `chunk_tokens`, before the forward pass
      that feeds the chunk's last token: once before the prefill (end: the prompt's completed
      chunks), then each time a sampled token completes one (not for a token that ends the
      generation: it is never fed). RETRO fetches the completed chunk's neighbours here. 0: never.
    - `chunk_phase(prompt_ids)`: where the chunk grid starts: chunks end at positions e with
      (e + phase) % chunk_tokens == 0 (0: the first chunk starts at position 0). Called once,
      before anything else runs, when chunk_tokens is set.
    - `on_token(token_id, position)`: after each sampled token.
    - `memory_s`: seconds the mode spent getting its memory ready (reported as retrieval time).
    - `citations`: chunks read during the generation (RETRO's neighbours), after the plan's.
    """

    chunk_tokens: int = 0
    memory_s: float = 0.0
    citations: tuple[SearchHit, ...] = ()

    def chunk_phase(self, prompt_ids: Sequence[int]) -> int:
        return 0

    def prefix_embeds(self, input_ids: Sequence[int]) -> "Optional[torch.Tensor]":
        return None

    def on_chunk(self, token_ids: Sequence[int], end: int) -> None:
        pass

    def on_token(self, token_id: int, position: int) -> None:
        pass


NO_HOOKS = GenerationHooks()


@dataclass
class ModeRuntime:
    """What the host gives every mode it starts."""

    model: Any  # the served model: memlm.model.Llama or a transformers causal LM (memlm.models.loading.load_model)
    tokenizer: Any
    model_name: str  # what collections record as their tokenizer (the model folder's name)
    store: Optional[StoreView]  # None: the host serves without memory
    run_on_model: Callable[[Callable[[], Any]], Future]  # run work on the model worker, after queued jobs
    model_dir: Optional[Path] = None  # the served model's folder (trained modes check their weights against it)


async def search_for_prompt(store: StoreView, request: "GenerationRequest", k: int) -> tuple[tuple[SearchHit, ...], float]:
    """The collection's `k` best chunks for the request's prompt (the last user message of a chat),
    searched off the event loop with the request's filter and search mode: (hits, milliseconds).
    rag puts them into the prompt; chunk-gated knn reads their keys and values."""
    from memlm.prompts import query_text

    t0 = time.perf_counter()
    query = query_text(request.prompt, request.messages)
    # `mode` only when the request names one: a StoreView without search modes still works
    mode_arg = {"mode": request.search_mode} if request.search_mode else {}
    hits = await asyncio.to_thread(store.search, request.collection, query=query, k=k, filter=request.filter, **mode_arg)
    return tuple(hits), (time.perf_counter() - t0) * 1000


class MemoryModeBase(abc.ABC):
    """One memory mode. Subclasses set the class attributes and implement `plan`."""

    name: ClassVar[str]
    summary: ClassVar[str]  # one line for `memlm modes`
    reads_collection: ClassVar[bool] = True  # requests must name a collection
    derives: ClassVar[str] = ""  # what it keeps per collection, in words ("" : nothing)
    # Whether its reads need the collection to have its memory on (a mode with `CollectionOptions`);
    # False: the memory only makes reads cheaper (retro's stored neighbour states).
    memory_required: ClassVar[bool] = True
    max_k: ClassVar[int] = 100
    k_means: ClassVar[str] = ""  # what a request's `k` counts, for errors and docs
    # Its requests may share the running batch (memlm.scheduler): the mode reads memory only into
    # the prompt and runs the plain model, so it leaves `generation` as it is (no hooks). Others
    # run alone, between the batch's steps.
    batchable: ClassVar[bool] = False

    def __init__(self, runtime: ModeRuntime, settings: "Optional[BaseModel]"):
        self.runtime, self.settings = runtime, settings

    # --- serving ---------------------------------------------------------------------------

    def unavailable(self) -> Optional[str]:
        """Why this host cannot serve the mode (FAILED_PRECONDITION), or None."""
        if self.reads_collection and self.runtime.store is None:
            return f"memory mode {self.name!r} needs a memory store, and this model host has none"
        return None

    def validate(self, request: "GenerationRequest", collection: Optional[CollectionConfig]) -> None:
        """Raise a memlm.errors exception for a request this mode cannot serve. The host has checked
        the prompt, the sampling, that the collection exists and, for a mode with collection
        options, that the collection has this mode's memory on."""

    @abc.abstractmethod
    async def plan(self, request: "GenerationRequest") -> ReadPlan:
        """Decide what the request reads; runs on the event loop, store reads off it (to_thread)."""

    @contextmanager
    def generation(self, request: "GenerationRequest", plan: ReadPlan) -> Iterator[GenerationHooks]:
        """The context the token loop runs in, on the model worker: put the model in this mode,
        yield the hooks, and leave the model as it was (also after an exception)."""
        yield NO_HOOKS

    # --- derived memory --------------------------------------------------------------------

    def start(self) -> None:
        """Once, after the host is up: repair what a crash left behind (queue it; do not block)."""

    def after_write(self, collection: str) -> None:
        """A write into a collection with this mode's memory on was acknowledged by the store;
        bring the derived memory in step (called on the writing thread)."""

    def after_drop(self, collection: str) -> None:
        """The collection was dropped: delete this mode's derived memory of it."""

    def close(self) -> None:
        """The host is closing."""
