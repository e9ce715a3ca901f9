"""`ModelHost`: the in-process `EngineClient` that owns the language model.

One model, one worker thread. `generate()` validates the request, retrieves memory (rag) off the
event loop, then hands a `_Job` to the worker thread, which builds the prompt, runs the token loop
(`memlm.generation.generate_tokens`) and posts events back with `loop.call_soon_threadsafe`
onto the request's `asyncio.Queue`. The event loop never runs model work.

Jobs wait in a FIFO and run one at a time. Batching concurrent requests later means replacing
`_ModelWorker._serve` with a scheduler that drains several jobs and steps them together; jobs,
events and `generate()` stay as they are.

Closing the iterator early (aclose, task cancellation, a deadline) sets the job's cancel event:
a queued job is skipped, a running one stops before its next forward pass.

The `knn` mode (when the memory is a `MemoryStore`): `memlm.kv_memories.KVMemories` keeps each
kv collection's KV memory in step with the store. Its work runs on the same worker thread, as
`_Call`s: the store's write listener (after each ingest/delete, waited for, so Ingest returns with
the memory built), one sync per kv collection at start-up (crash repair), and the sync + load at
the start of every knn job. A knn job runs `generate_tokens` inside `knn_mode`. With
`knn.candidate_chunks` = M > 0 (chunk-gated knn), `generate()` first searches the collection for
the prompt like rag does (M chunks, `filter` applies) and the job's memory is only those chunks'
rows and those of the `follow_chunks` chunks after each in its document (the default preset;
"ungated" reads the whole memory); the result cites the M chunks found.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Optional

import torch

from memlm.config import KnnSettings, ModelSettings
from memlm.engine import (
    EngineClient,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    MemoryMode,
    MemoryReader,
    ModelInfo,
    SamplingParams,
    TextDelta,
    Timings,
)
from memlm.errors import FailedPrecondition, InvalidArgument, Unimplemented
from memlm.generation import GenerationOutcome, eos_token_ids, generate_tokens
from memlm.index.types import SearchHit
from memlm.models.loading import BUNDLED_MODEL_NAME, load_causal_lm, load_tokenizer, resolve_model_dir
from memlm.prompts import BuiltPrompt, build_prompt, prompt_budget, query_text

log = logging.getLogger(__name__)

SUPPORTED_MODES = (MemoryMode.NONE, MemoryMode.RAG, MemoryMode.KNN)  # KNN when the memory is a MemoryStore
MAX_K = 100  # rag: chunks (more would not fit a small model's context); knn: memory rows per head and layer
RAG_DEFAULT_K = 4
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class _Job:
    """One request as the worker thread sees it."""

    prompt: Optional[str]
    messages: Optional[tuple]
    hits: tuple[SearchHit, ...]
    rag: bool
    memory: Optional[Callable[[], AbstractContextManager]]  # knn: the context to generate in
    budget: int
    sampling: SamplingParams
    cancel: threading.Event
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue  # of TextDelta | _Done | BaseException

    def post(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening
            self.cancel.set()


@dataclass(frozen=True)
class _Done:
    prompt: Optional[BuiltPrompt]  # None when the job was cancelled before it started
    outcome: GenerationOutcome
    memory_s: float = 0.0  # knn: syncing and loading the KV memory


@dataclass
class _Call:
    """Any other model work (building KV memory): run `fn` on the worker, answer through `future`."""

    fn: Callable[[], object]
    future: Future


class _ModelWorker:
    """The one thread that touches the model; runs jobs in arrival order."""

    def __init__(self, model, tokenizer, eos_ids: frozenset[int], torch_threads: Optional[int]):
        self._model, self._tokenizer, self._eos_ids = model, tokenizer, eos_ids
        self._torch_threads = torch_threads
        self._jobs: "queue.Queue[Optional[_Job | _Call]]" = queue.Queue()
        self._stopping = False
        self._thread = threading.Thread(target=self._serve, name="memlm-model", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the worker after the jobs queued before it; the future holds its result."""
        future: Future = Future()
        if self._stopping:
            future.set_exception(FailedPrecondition("the model host is closed"))
        else:
            self._jobs.put(_Call(fn, future))
        return future

    def stop(self) -> None:
        self._stopping = True
        self._jobs.put(None)

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    def _serve(self) -> None:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)  # also here: OpenMP settings are per thread
        while (job := self._jobs.get()) is not None:
            if isinstance(job, _Call):
                if job.future.set_running_or_notify_cancel():
                    try:
                        job.future.set_result(job.fn())
                    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                        job.future.set_exception(exc)
                continue
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
                log.exception("generation failed")
                job.post(exc)
        while True:  # stopped: nobody will run what is still queued
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                return
            if isinstance(job, _Call):
                job.future.set_exception(FailedPrecondition("the model host is closed"))
            elif job is not None:
                job.post(_Done(None, GenerationOutcome("", (), "cancelled")))

    def _run(self, job: _Job) -> None:
        if job.cancel.is_set():
            job.post(_Done(None, GenerationOutcome("", (), "cancelled")))
            return
        built = build_prompt(
            self._tokenizer, job.budget, prompt=job.prompt, messages=job.messages, hits=job.hits, rag=job.rag
        )
        t0 = time.perf_counter()
        context = job.memory() if job.memory is not None else nullcontext()
        memory_s = time.perf_counter() - t0
        with context:
            for event in generate_tokens(
                self._model, self._tokenizer, list(built.input_ids), job.sampling, job.cancel, self._eos_ids
            ):
                if isinstance(event, TextDelta):
                    job.post(event)
                else:
                    job.post(_Done(built, event, memory_s))


class ModelHost(EngineClient):
    """Serves one causal LM: plain, rag and knn generation, streamed."""

    def __init__(
        self,
        model,
        tokenizer,
        settings: Optional[ModelSettings] = None,
        memory: Optional[MemoryReader] = None,
        name: str = BUNDLED_MODEL_NAME,
        knn: Optional[KnnSettings] = None,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or ModelSettings()
        self.memory = memory
        self.name = name
        self.kv_memories = None
        if memory is not None and hasattr(memory, "add_write_listener"):  # a MemoryStore, in process
            from memlm.kv_memories import KVMemories

            tokenizer_name = Path(str(getattr(tokenizer, "name_or_path", "") or name)).name
            self.kv_memories = KVMemories(memory, model, knn or KnnSettings(), model_name=tokenizer_name)
        modes = SUPPORTED_MODES if self.kv_memories is not None else tuple(m for m in SUPPORTED_MODES if m is not MemoryMode.KNN)
        config = model.config
        limits = [n for n in (getattr(config, "max_position_embeddings", None), self.settings.max_context_tokens) if n]
        self.context_length = int(min(limits)) if limits else 2048  # 2048: a model that states no limit
        self._info = ModelInfo(
            name=name,
            context_length=self.context_length,
            vocab_size=int(config.vocab_size),
            layers=int(config.num_hidden_layers),
            supported_memory_modes=modes,
        )
        self._active: set[threading.Event] = set()
        self._closed = False
        self._worker = _ModelWorker(model, tokenizer, eos_token_ids(model, tokenizer), self.settings.torch_threads)
        if self.kv_memories is not None:
            memory.add_write_listener(self._kv_sync_now)
            for config in memory.list_collections():  # repair what a crash left behind, in the background
                if config.kv_memory:
                    self._worker.call(lambda name=config.name: self._kv_sync_quietly(name))

    def _kv_sync_quietly(self, name: str) -> None:
        try:
            self.kv_memories.sync(name)
        except Exception:  # noqa: BLE001 - logged; the next write or knn request retries
            log.exception("collection %r: building its KV memory failed", name)

    def _kv_sync_now(self, name: str) -> None:
        """The store's write listener: bring `name`'s KV memory in step and wait for it."""
        if not self._closed:
            self._worker.call(lambda: self.kv_memories.sync(name)).result()

    @classmethod
    def load(
        cls,
        settings: Optional[ModelSettings] = None,
        memory: Optional[MemoryReader] = None,
        cache_dir: Optional[Path] = None,
        knn: Optional[KnnSettings] = None,
        tokenizer=None,
    ) -> "ModelHost":
        """Load `settings.path` (None = the bundled SmolLM2, converted once into `cache_dir`).
        tokenizer: the model's, when the caller has already loaded it."""
        settings = settings or ModelSettings()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model_dir = resolve_model_dir(settings.path, cache_dir)
        t0 = time.perf_counter()
        model = load_causal_lm(model_dir, settings.dtype)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        name = BUNDLED_MODEL_NAME if settings.path in (None, "", "bundled") else Path(model_dir).name
        log.info("loaded %s from %s in %.1f s", name, model_dir, time.perf_counter() - t0)
        return cls(model, tokenizer, settings, memory, name, knn)

    def info(self) -> ModelInfo:
        return self._info

    # --- validation ------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> tuple[MemoryMode, int]:
        """Raise a `memlm.errors` exception for a bad request; return (mode, prompt budget)."""
        if self._closed:
            raise FailedPrecondition("the model host is closed")
        if (request.prompt is None) == (request.messages is None):
            raise InvalidArgument("expected exactly one of `prompt` and `messages`, got "
                                  + ("both" if request.prompt is not None else "neither"))
        if request.prompt is not None and not request.prompt.strip():
            raise InvalidArgument("`prompt` is empty; expected some text to continue")
        if request.messages is not None:
            if not request.messages:
                raise InvalidArgument("`messages` is empty; expected at least one message")
            for m in request.messages:
                if m.role not in CHAT_ROLES:
                    raise InvalidArgument(f"message role {m.role!r} is not one of {', '.join(CHAT_ROLES)}")
        mode = MemoryMode.parse(request.memory)
        if mode not in SUPPORTED_MODES:
            raise Unimplemented(
                f"memory mode {mode.value!r} is not implemented yet; supported: "
                + ", ".join(m.value for m in SUPPORTED_MODES)
            )
        if mode is not MemoryMode.NONE:
            if not request.collection:
                raise InvalidArgument(f"memory mode {mode.value!r} needs a `collection` to read memory from")
            if self.memory is None:
                raise FailedPrecondition(f"memory mode {mode.value!r} needs a memory store, and this model host has none")
            if request.k is not None and not 1 <= request.k <= MAX_K:
                raise InvalidArgument(f"k={request.k} is out of range; expected 1 <= k <= {MAX_K}")
        if mode is MemoryMode.KNN:
            if self.kv_memories is None:
                raise FailedPrecondition("memory mode 'knn' needs the in-process memory store, and this model host has another")
            if request.filter is not None and not self.kv_memories.candidate_chunks:
                raise InvalidArgument("this server's knn reads the whole collection's KV memory (knn preset "
                                      f"{self.kv_memories.settings.preset!r}, candidate_chunks=0); `filter` needs "
                                      "chunk-gated knn (knn.candidate_chunks > 0, preset 'default') or rag")
            self.kv_memories.check_collection(request.collection)  # NotFound / FailedPrecondition
        if request.messages is not None and self._searches(mode):
            query_text(None, request.messages)  # raises when there is no user message to search for
        s = request.sampling
        limit = self.settings.max_new_tokens_limit
        if not 1 <= s.max_new_tokens <= limit:
            raise InvalidArgument(f"max_new_tokens={s.max_new_tokens} is out of range; expected 1 <= max_new_tokens <= {limit}")
        if not s.temperature >= 0.0:  # also rejects NaN
            raise InvalidArgument(f"temperature={s.temperature} is out of range; expected temperature >= 0")
        if not 0.0 < s.top_p <= 1.0:
            raise InvalidArgument(f"top_p={s.top_p} is out of range; expected 0 < top_p <= 1")
        if any(not stop for stop in s.stop):
            raise InvalidArgument(f"stop={s.stop!r} contains an empty string; expected non-empty stop sequences")
        return mode, prompt_budget(self.context_length, s.max_new_tokens)

    # --- generation ------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        t0 = time.perf_counter()
        mode, budget = self._validate(request)
        hits: tuple[SearchHit, ...] = ()
        retrieval_ms = 0.0
        if self._searches(mode):  # rag: the chunks for the prompt; gated knn: the chunks whose memory it reads
            query = query_text(request.prompt, request.messages)
            k = request.k or RAG_DEFAULT_K if mode is MemoryMode.RAG else self.kv_memories.candidate_chunks
            # `mode` only when the request names one: a MemoryReader without search modes still works
            mode_arg = {"mode": request.search_mode} if request.search_mode else {}
            hits = tuple(
                await asyncio.to_thread(self.memory.search, request.collection, query=query, k=k,
                                        filter=request.filter, **mode_arg)
            )
            retrieval_ms = (time.perf_counter() - t0) * 1000
        knn_chunks = [h.chunk_id for h in hits] if mode is MemoryMode.KNN and self._searches(mode) else None
        loop = asyncio.get_running_loop()
        job = _Job(
            prompt=request.prompt,
            messages=tuple(request.messages) if request.messages is not None else None,
            hits=hits,
            rag=mode is MemoryMode.RAG,
            memory=(lambda: self.kv_memories.knn_context(request.collection, request.k, chunks=knn_chunks))
            if mode is MemoryMode.KNN else None,
            budget=budget,
            sampling=request.sampling,
            cancel=threading.Event(),
            loop=loop,
            events=asyncio.Queue(),
        )
        self._active.add(job.cancel)
        self._worker.submit(job)
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, TextDelta):
                    yield item
                elif isinstance(item, _Done):
                    citations = hits if mode is MemoryMode.KNN else None  # knn: the chunks it read
                    yield self._result(item, t0, retrieval_ms + item.memory_s * 1000, citations)
                    return
                else:
                    raise item
        finally:
            # Early exit (aclose, cancellation, deadline) or done: either way the worker may stop.
            job.cancel.set()
            self._active.discard(job.cancel)

    def _searches(self, mode: MemoryMode) -> bool:
        """Whether a request in `mode` starts with a search of the collection (store.search_mode)."""
        return mode is MemoryMode.RAG or (mode is MemoryMode.KNN and bool(self.kv_memories.candidate_chunks))

    @staticmethod
    def _result(done: _Done, t0: float, retrieval_ms: float,
                citations: Optional[tuple[SearchHit, ...]] = None) -> GenerationResult:
        outcome, built = done.outcome, done.prompt
        first = outcome.first_token_at
        if citations is None:
            citations = built.citations if built else ()
        return GenerationResult(
            text=outcome.text,
            finish_reason=outcome.finish_reason,
            citations=citations,
            prompt_tokens=len(built.input_ids) if built else 0,
            completion_tokens=outcome.completion_tokens,
            truncated_prompt_tokens=built.truncated_prompt_tokens if built else 0,
            timings=Timings(
                retrieval_ms=retrieval_ms,
                prefill_ms=outcome.prefill_s * 1000,
                decode_ms=outcome.decode_s * 1000,
                time_to_first_token_ms=(first - t0) * 1000 if first is not None else 0.0,
                total_ms=(time.perf_counter() - t0) * 1000,
            ),
        )

    async def close(self) -> None:
        """Cancel queued and running generations, stop the worker thread, drop the model."""
        if self._closed:
            return
        self._closed = True
        for cancel in list(self._active):
            cancel.set()
        self._worker.stop()
        await asyncio.to_thread(self._worker.join)
        self._worker = None
        self.model = None
        self.tokenizer = None
