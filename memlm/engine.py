"""The one interface between servers and the language-model engine (cf. vLLM's `EngineClient`).

Servicers build a `GenerationRequest`, iterate `EngineClient.generate()` and translate what comes
back; they never touch the model. The engine reads memory through `MemoryReader`, which the
in-process `MemoryStore` implements and a remote store client can implement too, so the same
engine code serves one machine and a sharded deployment. Memory modes (memlm.modes) plug in
behind `generate()` without changing any servicer; batching concurrent requests is likewise the
engine's business.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import AsyncIterator, Optional, Protocol, Sequence, Union

import numpy as np

from memlm.index.types import Filter, SearchHit


class MemoryReader(Protocol):
    """What the engine needs from memory. `MemoryStore` implements it in-process."""

    def search(
        self,
        collection: str,
        query: Optional[str] = None,
        vector: Optional[np.ndarray] = None,
        k: int = 10,
        filter: Optional[Filter] = None,
        mode: Optional[str] = None,
    ) -> list[SearchHit]: ...


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: Optional[int] = None  # same seed + same request = same text
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence of any of these


@dataclass(frozen=True)
class GenerationRequest:
    """Exactly one of `prompt` / `messages`. `collection` is required for every mode but NONE."""

    prompt: Optional[str] = None
    messages: Optional[tuple[ChatMessage, ...]] = None
    collection: Optional[str] = None
    memory: str = "none"  # a registered memory mode's name (memlm.modes.MODES)
    k: Optional[int] = None  # rag: chunks retrieved (None: 4); knn: memory rows per query head and layer
    filter: Optional[Filter] = None
    sampling: SamplingParams = SamplingParams()
    request_id: str = ""
    search_mode: Optional[str] = None  # rag / gated knn: "dense" | "lexical" | "hybrid"; None: the store's


@dataclass(frozen=True)
class TextDelta:
    """New text since the previous delta (never splits a UTF-8 character)."""

    text: str


@dataclass(frozen=True)
class Timings:
    retrieval_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    time_to_first_token_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class GenerationResult:
    """The last thing `generate()` yields."""

    text: str
    finish_reason: str  # "stop" (stop sequence), "eos", "length", "cancelled"
    citations: tuple[SearchHit, ...] = ()  # rag: chunks put into the prompt, in order; gated knn: chunks read, best first
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated_prompt_tokens: int = 0  # tokens dropped from the start of an over-long prompt
    timings: Timings = field(default_factory=Timings)


GenerationEvent = Union[TextDelta, GenerationResult]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    context_length: int
    vocab_size: int
    layers: int
    supported_memory_modes: tuple[str, ...]  # registered modes this host can serve


class EngineClient(abc.ABC):
    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationEvent]:
        """Yield `TextDelta`s as tokens are made, then one `GenerationResult`.

        Runs model work off the event loop. Closing the iterator early (the caller was cancelled
        or its deadline passed) stops generation at the next token. Raises `memlm.errors`
        exceptions for bad requests before yielding anything.
        """

    @abc.abstractmethod
    def info(self) -> ModelInfo: ...

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish or cancel in-flight work and release the model."""
