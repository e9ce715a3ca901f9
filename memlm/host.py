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
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Optional

import torch

from memlm.config import ModelSettings
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

SUPPORTED_MODES = (MemoryMode.NONE, MemoryMode.RAG)
MAX_K = 100  # chunks one rag request may retrieve; more would not fit a small model's context anyway
CHAT_ROLES = ("system", "user", "assistant")


@dataclass
class _Job:
    """One request as the worker thread sees it."""

    prompt: Optional[str]
    messages: Optional[tuple]
    hits: tuple[SearchHit, ...]
    rag: bool
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


class _ModelWorker:
    """The one thread that touches the model; runs jobs in arrival order."""

    def __init__(self, model, tokenizer, eos_ids: frozenset[int], torch_threads: Optional[int]):
        self._model, self._tokenizer, self._eos_ids = model, tokenizer, eos_ids
        self._torch_threads = torch_threads
        self._jobs: "queue.Queue[Optional[_Job]]" = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name="memlm-model", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def stop(self) -> None:
        self._jobs.put(None)

    def join(self, timeout: Optional[float] = None) -> None:
        self._thread.join(timeout)

    def _serve(self) -> None:
        if self._torch_threads:
            torch.set_num_threads(self._torch_threads)  # also here: OpenMP settings are per thread
        while (job := self._jobs.get()) is not None:
            try:
                self._run(job)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises
                log.exception("generation failed")
                job.post(exc)

    def _run(self, job: _Job) -> None:
        if job.cancel.is_set():
            job.post(_Done(None, GenerationOutcome("", (), "cancelled")))
            return
        built = build_prompt(
            self._tokenizer, job.budget, prompt=job.prompt, messages=job.messages, hits=job.hits, rag=job.rag
        )
        for event in generate_tokens(
            self._model, self._tokenizer, list(built.input_ids), job.sampling, job.cancel, self._eos_ids
        ):
            if isinstance(event, TextDelta):
                job.post(event)
            else:
                job.post(_Done(built, event))


class ModelHost(EngineClient):
    """Serves one causal LM: plain and rag generation, streamed."""

    def __init__(
        self,
        model,
        tokenizer,
        settings: Optional[ModelSettings] = None,
        memory: Optional[MemoryReader] = None,
        name: str = BUNDLED_MODEL_NAME,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.settings = settings or ModelSettings()
        self.memory = memory
        self.name = name
        config = model.config
        limits = [n for n in (getattr(config, "max_position_embeddings", None), self.settings.max_context_tokens) if n]
        self.context_length = int(min(limits)) if limits else 2048  # 2048: a model that states no limit
        self._info = ModelInfo(
            name=name,
            context_length=self.context_length,
            vocab_size=int(config.vocab_size),
            layers=int(config.num_hidden_layers),
            supported_memory_modes=SUPPORTED_MODES,
        )
        self._active: set[threading.Event] = set()
        self._closed = False
        self._worker = _ModelWorker(model, tokenizer, eos_token_ids(model, tokenizer), self.settings.torch_threads)

    @classmethod
    def load(
        cls, settings: Optional[ModelSettings] = None, memory: Optional[MemoryReader] = None, cache_dir: Optional[Path] = None
    ) -> "ModelHost":
        """Load `settings.path` (None = the bundled SmolLM2, converted once into `cache_dir`)."""
        settings = settings or ModelSettings()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        model_dir = resolve_model_dir(settings.path, cache_dir)
        t0 = time.perf_counter()
        model = load_causal_lm(model_dir, settings.dtype)
        tokenizer = load_tokenizer(model_dir)
        name = BUNDLED_MODEL_NAME if settings.path in (None, "", "bundled") else Path(model_dir).name
        log.info("loaded %s from %s in %.1f s", name, model_dir, time.perf_counter() - t0)
        return cls(model, tokenizer, settings, memory, name)

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
            if not 1 <= request.k <= MAX_K:
                raise InvalidArgument(f"k={request.k} is out of range; expected 1 <= k <= {MAX_K}")
        if request.messages is not None and mode is MemoryMode.RAG:
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
        if mode is MemoryMode.RAG:
            query = query_text(request.prompt, request.messages)
            hits = tuple(
                await asyncio.to_thread(
                    self.memory.search, request.collection, query=query, k=request.k, filter=request.filter
                )
            )
            retrieval_ms = (time.perf_counter() - t0) * 1000
        loop = asyncio.get_running_loop()
        job = _Job(
            prompt=request.prompt,
            messages=tuple(request.messages) if request.messages is not None else None,
            hits=hits,
            rag=mode is MemoryMode.RAG,
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
                    yield self._result(item, t0, retrieval_ms)
                    return
                else:
                    raise item
        finally:
            # Early exit (aclose, cancellation, deadline) or done: either way the worker may stop.
            job.cancel.set()
            self._active.discard(job.cancel)

    @staticmethod
    def _result(done: _Done, t0: float, retrieval_ms: float) -> GenerationResult:
        outcome, built = done.outcome, done.prompt
        first = outcome.first_token_at
        return GenerationResult(
            text=outcome.text,
            finish_reason=outcome.finish_reason,
            citations=built.citations if built else (),
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
