"""`ModelHost`: the in-process `EngineClient` that owns the language model.

One model, one worker thread. The model is memlm's own `memlm.model.Llama` for a Llama folder (the
bundled SmolLM2 included), else a transformers causal LM (`memlm.models.loading.load_model`); the
host reads only its `ModelFacts` (vocab size, layers, context length, EOS ids), and the token loop
and the modes deal with the class. `generate()` does the work every request shares (validation of
the prompt and sampling, the collection check), then hands the request to its memory mode
(memlm.modes, looked up in the registry by name: the host names no mode): the mode validates it
and plans its reads off the event loop; the plan carries the citations. A `_Job` then goes to the
worker thread, which builds the prompt (with the plan's prompt chunks, if any), enters the mode's
generation context, runs the token loop (`memlm.generation.generate_tokens`) with the mode's hooks
and posts events back with `loop.call_soon_threadsafe` onto the request's `asyncio.Queue`. The
event loop never runs model work.

Batching: on memlm's own model (memlm.model.Llama) the worker hands jobs of batchable modes
(`MemoryModeBase.batchable`: none and rag, which run the plain model) to a `BatchScheduler`
(memlm.scheduler: continuous batching, chunked prefill, prefix reuse) and steps the running batch
once per loop; a job of another mode (knn, landmark, retro: their generation context changes the
model for one request) or a mode's model work (`_Call`) runs alone between two steps, the batch
waiting meanwhile. Without batching (a transformers model, `model.batching = false`) jobs run one
at a time in arrival order. More than `model.max_concurrent_requests` generations in flight: the
next is refused RESOURCE_EXHAUSTED.

Closing the iterator early (aclose, task cancellation, a deadline) sets the job's cancel event:
a queued job is skipped, a running one stops before its next forward pass.

Derived memory: a store in this process reports every acknowledged write
(`add_write_listener`); the host forwards it to each mode whose memory the collection has on
(`MemoryModeBase.after_write`), and calls every mode's `start()` once (crash repair). Modes run
their model work on the worker through `ModeRuntime.run_on_model`.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Mapping, Optional

import faiss
import torch
from pydantic import BaseModel

from memlm import modes as registry
from memlm.config import ModelSettings
from memlm.engine import (
    EngineClient,
    GenerationEvent,
    GenerationRequest,
    GenerationResult,
    MemoryReader,
    ModelInfo,
    TextDelta,
    Timings,
)
from memlm import metrics
from memlm.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from memlm.generation import GenerationOutcome, eos_token_ids, generate_tokens
from memlm.model import Llama
from memlm.prefix_cache import PrefixCache
from memlm.scheduler import BatchRequest, BatchScheduler
from memlm.models.loading import BUNDLED_MODEL_NAME, load_model, load_tokenizer, model_facts, resolve_model_dir
from memlm.modes.base import MemoryModeBase, ModeRuntime, ReadPlan
from memlm.prompts import BuiltPrompt, build_prompt, prompt_budget, query_text
from memlm.openmp import release_thread_pool

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class _Job:
    """One request as the worker thread sees it."""

    request: GenerationRequest
    mode: MemoryModeBase
    plan: ReadPlan
    budget: int
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
    memory_s: float = 0.0  # the mode getting its memory ready (knn: syncing and loading the KV memory)
    citations: tuple = ()  # chunks the mode read during the generation (retro's neighbours)


@dataclass
class _Call:
    """Any other model work (a mode building derived memory): run `fn` on the worker, answer through `future`."""

    fn: Callable[[], object]
    future: Future


_STOP = object()  # the worker's stop signal in its inbox


class _ModelWorker:
    """The one thread that touches the model. Jobs of batchable modes go to the batch scheduler
    (when there is one: memlm's own model with batching on) and are stepped together; any other
    job, and any `_Call`, runs alone between two steps, in arrival order."""

    def __init__(self, model, tokenizer, eos_ids: frozenset[int], settings: ModelSettings):
        self._model, self._tokenizer, self._eos_ids = model, tokenizer, eos_ids
        self._torch_threads = settings.torch_threads
        self._inbox: "queue.Queue[object]" = queue.Queue()
        self._stopping = False
        self.batch: Optional[BatchScheduler] = None
        if settings.batching and isinstance(model, Llama):
            prefix = PrefixCache(settings.prefix_cache_mb << 20) if settings.prefix_cache_mb else None
            self.batch = BatchScheduler(model, tokenizer, eos_ids, settings.max_batch_size, settings.max_batched_tokens,
                                        settings.kv_cache_mb << 20, prefix)
        self._alone = 0  # jobs running outside the batch (0 or 1)
        self._thread = threading.Thread(target=self._serve, name="memlm-model", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        self._inbox.put(job)

    def call(self, fn: Callable[[], object]) -> Future:
        """Run `fn()` on the worker after the jobs queued before it; the future holds its result."""
        future: Future = Future()
        if self._stopping:
            future.set_exception(FailedPrecondition("the model host is closed"))
        else:
            self._inbox.put(_Call(fn, future))
        return future

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(_STOP)

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    def _serve(self) -> None:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)  # also here: OpenMP settings are per thread
        # knn's FAISS searches run on this thread between torch ops: one OpenMP thread, as for the
        # store's searches (StoreSettings.faiss_threads), so FAISS's pool does not fight torch's. This
        # thread may never make a store call that would set it: in a restarted server, ungated knn
        # answers took 36 s and 22 s instead of 5 and 1.6 (and its KV catch-up 10 s instead of 3).
        faiss.omp_set_num_threads(1)
        batch = self.batch
        while True:
            # Wait only when the batch has nothing to do; take every batchable job that came in,
            # and at most one other item (it runs now, alone), then step the batch once.
            idle = batch is None or batch.idle
            try:
                item = self._inbox.get() if idle else self._inbox.get_nowait()
            except queue.Empty:
                item = None
            while isinstance(item, _Job) and self._batchable(item):
                self._submit_to_batch(item)
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    item = None
            if item is _STOP:
                break
            if item is not None:
                self._run_alone(item)
            if batch is not None and not batch.idle:
                batch.step()
            self._report()
        if batch is not None:
            batch.cancel_all()
        while True:  # stopped: nobody will run what is still queued
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, _Call):
                item.future.set_exception(FailedPrecondition("the model host is closed"))
            elif isinstance(item, _Job):
                item.post(_Done(None, GenerationOutcome("", (), "cancelled")))
        self._report()

    def _report(self) -> None:
        batch = self.batch
        metrics.REQUESTS_RUNNING.set(self._alone + (len(batch.running) if batch else 0))
        metrics.REQUESTS_WAITING.set(self._inbox.qsize() + (len(batch.waiting) if batch else 0))

    def _batchable(self, job: _Job) -> bool:
        return self.batch is not None and job.mode.batchable

    def _build(self, job: _Job) -> BuiltPrompt:
        r, chunks = job.request, job.plan.prompt_chunks
        return build_prompt(self._tokenizer, job.budget, prompt=r.prompt, messages=r.messages,
                            hits=chunks or (), rag=chunks is not None)

    def _submit_to_batch(self, job: _Job) -> None:
        if job.cancel.is_set():
            job.post(_Done(None, GenerationOutcome("", (), "cancelled")))
            return
        try:
            built = self._build(job)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            job.post(exc)
            return
        self.batch.submit(BatchRequest(
            list(built.input_ids), job.request.sampling, job.cancel,
            on_text=lambda text: job.post(TextDelta(text)),
            on_done=lambda outcome: job.post(_Done(built, outcome)),
            on_error=job.post,
        ))

    def _run_alone(self, item: "_Job | _Call") -> None:
        if isinstance(item, _Call):
            if item.future.set_running_or_notify_cancel():
                try:
                    item.future.set_result(item.fn())
                except BaseException as exc:  # noqa: BLE001 - handed to whoever waits
                    item.future.set_exception(exc)
            return
        self._alone = 1
        self._report()
        try:
            self._run(item)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
            log.exception("generation failed")
            item.post(exc)
        finally:
            self._alone = 0

    def _run(self, job: _Job) -> None:
        if job.cancel.is_set():
            job.post(_Done(None, GenerationOutcome("", (), "cancelled")))
            return
        r, plan = job.request, job.plan
        built = self._build(job)
        with job.mode.generation(r, plan) as hooks:
            for event in generate_tokens(self._model, self._tokenizer, list(built.input_ids), r.sampling, job.cancel,
                                         self._eos_ids, hooks=hooks):
                if isinstance(event, TextDelta):
                    job.post(event)
                else:
                    job.post(_Done(built, event, hooks.memory_s, tuple(hooks.citations)))


def _observe(mode: str, result: GenerationResult, outcome: GenerationOutcome) -> None:
    """A finished generation's figures into the engine's metrics (memlm.metrics)."""
    metrics.REQUEST_SUCCESS.labels(mode, result.finish_reason).inc()
    metrics.PROMPT_TOKENS.labels(mode).inc(result.prompt_tokens)
    metrics.GENERATION_TOKENS.labels(mode).inc(result.completion_tokens)
    t = result.timings
    metrics.E2E_LATENCY.labels(mode).observe(t.total_ms / 1000)
    if outcome.first_token_at is not None:
        metrics.TIME_TO_FIRST_TOKEN.labels(mode).observe(t.time_to_first_token_ms / 1000)
        waited = (t.time_to_first_token_ms - t.retrieval_ms - t.prefill_ms) / 1000
        metrics.QUEUE_TIME.labels(mode).observe(max(0.0, waited))
    if result.completion_tokens > 1:
        metrics.TIME_PER_OUTPUT_TOKEN.labels(mode).observe(t.decode_ms / 1000 / (result.completion_tokens - 1))


def _model_dir(tokenizer) -> Optional[Path]:
    """The folder the tokenizer (and so the model) was loaded from, when it is one."""
    path = Path(str(getattr(tokenizer, "name_or_path", "") or ""))
    return path if str(path) and path.is_dir() else None


class ModelHost(EngineClient):
    """Serves one causal LM (memlm.model.Llama or a transformers model) in every registered memory
    mode, streamed."""

    def __init__(
        self,
        model,
        tokenizer,
        settings: Optional[ModelSettings] = None,
        memory: Optional[MemoryReader] = None,
        name: str = BUNDLED_MODEL_NAME,
        mode_settings: Optional[Mapping[str, BaseModel]] = None,
    ):
        """memory: the store modes read (a `MemoryStore` in this process, or any `StoreView`);
        mode_settings: {mode name: its settings section} (`Settings.modes()`); absent: the defaults."""
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or ModelSettings()
        self.memory = memory
        self.name = name
        self._closed = False
        self._active: set[threading.Event] = set()
        self._worker = _ModelWorker(model, tokenizer, eos_token_ids(model, tokenizer), self.settings)
        in_process = memory is not None and hasattr(memory, "add_write_listener")  # a MemoryStore: it reports writes
        runtime = ModeRuntime(
            model=model, tokenizer=tokenizer,
            model_name=Path(str(getattr(tokenizer, "name_or_path", "") or name)).name,
            store=memory, run_on_model=self._worker.call, model_dir=_model_dir(tokenizer),
        )
        mode_settings = dict(mode_settings or {})
        self.modes: dict[str, MemoryModeBase] = {}
        for mode_name in registry.MODES:
            mode_cls = registry.mode_class(mode_name)
            if mode_cls.batchable and mode_cls.generation is not MemoryModeBase.generation:
                raise TypeError(f"memory mode {mode_name!r} is batchable but has a generation context; a batched "
                                "request runs the plain model (MemoryModeBase.batchable)")
            section = mode_settings.get(mode_name)
            if section is None and (cls := registry.settings_class(mode_name)) is not None:
                section = cls()
            self.modes[mode_name] = mode_cls(runtime, section)
        facts = model_facts(model)
        limits = [n for n in (facts.context_length, self.settings.max_context_tokens) if n]
        self.context_length = int(min(limits)) if limits else 2048  # 2048: a model that states no limit
        self._info = ModelInfo(
            name=name,
            context_length=self.context_length,
            vocab_size=facts.vocab_size,
            layers=facts.layers,
            supported_memory_modes=tuple(n for n, m in self.modes.items() if m.unavailable() is None),
        )
        if in_process:
            memory.add_write_listener(self._after_write)
        for mode in self.modes.values():
            if mode.unavailable() is None:
                mode.start()
        # Loading the model and the modes' weights ran torch on this thread: its OpenMP team would
        # stay beside the model worker's and slow every decode step (memlm.openmp).
        release_thread_pool()

    def _after_write(self, collection: str, memory: Mapping[str, Any], dropped: bool = False) -> None:
        """The store's write listener: each mode whose memory `collection` has brings it in step
        (or, after a drop, drops it)."""
        if self._closed:
            return
        for mode_name in memory:
            mode = self.modes.get(mode_name)
            if mode is not None and mode.unavailable() is None:
                mode.after_drop(collection) if dropped else mode.after_write(collection)

    @classmethod
    def load(
        cls,
        settings: Optional[ModelSettings] = None,
        memory: Optional[MemoryReader] = None,
        cache_dir: Optional[Path] = None,
        mode_settings: Optional[Mapping[str, BaseModel]] = None,
        tokenizer=None,
    ) -> "ModelHost":
        """Load `settings.path` (None = the bundled SmolLM2, converted once into `cache_dir`).
        tokenizer: the model's, when the caller has already loaded it."""
        settings = settings or ModelSettings()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model_dir = resolve_model_dir(settings.path, cache_dir)
        t0 = time.perf_counter()
        model = load_model(model_dir, settings.dtype, settings.model_impl, settings.weights, settings.kv_cache_dtype)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_dir)
        name = BUNDLED_MODEL_NAME if settings.path in (None, "", "bundled") else Path(model_dir).name
        log.info("loaded %s from %s in %.1f s (%s)", name, model_dir, time.perf_counter() - t0,
                 "memlm.model" if model_facts(model).owned else "transformers")
        return cls(model, tokenizer, settings, memory, name, mode_settings)

    def info(self) -> ModelInfo:
        return self._info

    # --- validation ------------------------------------------------------------------------

    def _validate(self, request: GenerationRequest) -> tuple[MemoryModeBase, int]:
        """Raise a `memlm.errors` exception for a bad request; return (its mode, prompt budget)."""
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
        mode = self.modes[registry.parse_mode(request.memory)]  # InvalidArgument / Unimplemented
        collection = None
        if mode.reads_collection:
            if not request.collection:
                raise InvalidArgument(f"memory mode {mode.name!r} needs a `collection` to read memory from")
        problem = mode.unavailable()
        if problem:
            raise FailedPrecondition(problem)
        if mode.reads_collection:
            if request.k is not None and not 1 <= request.k <= mode.max_k:
                raise InvalidArgument(f"k={request.k} is out of range; expected 1 <= k <= {mode.max_k}"
                                      + (f" ({mode.k_means})" if mode.k_means else ""))
            if registry.collection_options_class(mode.name) is not None:  # the mode derives memory per collection
                collection = self.memory.collection_config(request.collection)  # NotFound
                if mode.name not in collection.memory and mode.memory_required:
                    raise FailedPrecondition(
                        f"collection {request.collection!r} has no {mode.name} memory; create one with it on "
                        f"(CLI: memlm create-collection NAME --memory {mode.name}) to use memory mode {mode.name!r}")
            if request.messages is not None:
                query_text(None, request.messages)  # raises when there is no user message to search for
        mode.validate(request, collection)
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
        limit = self.settings.max_concurrent_requests
        if len(self._active) >= limit:
            raise ResourceExhausted(f"the model host has {len(self._active)} generations in flight (limit "
                                    f"{limit}, model.max_concurrent_requests); retry later")
        plan = await mode.plan(request)
        job = _Job(request=request, mode=mode, plan=plan, budget=budget, cancel=threading.Event(),
                   loop=asyncio.get_running_loop(), events=asyncio.Queue())
        self._active.add(job.cancel)
        self._worker.submit(job)
        try:
            while True:
                item = await job.events.get()
                if isinstance(item, TextDelta):
                    yield item
                elif isinstance(item, _Done):
                    result = self._result(item, plan, t0)
                    _observe(mode.name, result, item.outcome)
                    yield result
                    return
                else:
                    raise item
        finally:
            # Early exit (aclose, cancellation, deadline) or done: either way the worker may stop.
            job.cancel.set()
            self._active.discard(job.cancel)

    @staticmethod
    def _result(done: _Done, plan: ReadPlan, t0: float) -> GenerationResult:
        outcome, built = done.outcome, done.prompt
        first = outcome.first_token_at
        # Chunks put into the prompt: those that fitted (prompt building drops the rest).
        citations = (built.citations if built else ()) if plan.prompt_chunks is not None else plan.citations
        seen = {h.chunk_id for h in citations}
        citations = tuple(citations) + tuple(h for h in done.citations if h.chunk_id not in seen)
        return GenerationResult(
            text=outcome.text,
            finish_reason=outcome.finish_reason,
            citations=citations,
            prompt_tokens=len(built.input_ids) if built else 0,
            completion_tokens=outcome.completion_tokens,
            truncated_prompt_tokens=built.truncated_prompt_tokens if built else 0,
            timings=Timings(
                retrieval_ms=plan.retrieval_ms + done.memory_s * 1000,
                prefill_ms=outcome.prefill_s * 1000,
                decode_ms=outcome.decode_s * 1000,
                time_to_first_token_ms=(first - t0) * 1000 if first is not None else 0.0,
                total_ms=(time.perf_counter() - t0) * 1000,
            ),
        )

    @property
    def batch(self) -> Optional[BatchScheduler]:
        """The continuous-batching scheduler (None: requests run one at a time)."""
        return self._worker.batch if self._worker is not None else None

    async def close(self) -> None:
        """Cancel queued and running generations, stop the worker thread, drop the model."""
        if self._closed:
            return
        self._closed = True
        for cancel in list(self._active):
            cancel.set()
        for mode in self.modes.values():
            mode.close()
        self._worker.stop()
        await asyncio.to_thread(self._worker.join)
        self._worker = None
        self.model = None
        self.tokenizer = None
