"""OpenAI's HTTP API as memlm's types: request bodies -> `GenerationRequest`, results -> completion
objects and stream chunks, `memlm.errors` -> OpenAI's error body and an HTTP status.

Pure translation, no I/O (services/http_api.py serves it). What is accepted, following OpenAI's
chat-completions and completions references:
- model, messages / prompt, max_tokens / max_completion_tokens, temperature, top_p, seed, stop
  (a string or a list), stream, stream_options.include_usage; user and a few fields that do not
  change the text (`_IGNORED`) are accepted and ignored;
- fields that would change what comes back are refused with 400 naming the field unless they
  carry their neutral value (`_NEUTRAL`: n=1, logprobs=false, tools=[], response_format text...);
  a field OpenAI does not define is refused too, so a typo ("max_token") is not silently ignored;
- memory per request in the extension field `memlm` ({collection, memory, k, filter, search_mode});
  the reply carries `memlm` ({citations, timings, truncated_prompt_tokens}).
Defaults are memlm's, as over gRPC: temperature 0 (greedy; OpenAI's is 1) and max_tokens the
server's `model.default_max_new_tokens`.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import re
from typing import Any, Callable, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, StrictBool, StrictInt, StrictStr

from memlm.engine import ChatMessage, GenerationRequest, GenerationResult, ModelInfo, SamplingParams
from memlm.errors import InvalidArgument, MemlmError, NotFound, quoted
from memlm.index.filters import parse_filter
from memlm.index.types import SearchHit

MAX_EMBEDDING_INPUTS = 2048  # per /v1/embeddings call, OpenAI's own limit
SEED_MAX = 2**64 - 1  # GenerateRequest.seed is a uint64


class ParamError(InvalidArgument):
    """An InvalidArgument about one request field: OpenAI's error body names it in `param`."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# --- request bodies ---------------------------------------------------------------------------

class MemoryOptions(BaseModel):
    """The body's `memlm` extension field (the openai client: `extra_body={"memlm": {...}}`)."""

    model_config = ConfigDict(extra="forbid")

    collection: Optional[StrictStr] = None
    memory: Optional[StrictStr] = None  # a memory mode's name; None: "none"
    k: Optional[StrictInt] = None  # rag: chunks retrieved; knn: rows per query head and layer
    filter: Optional[dict[str, Any]] = None  # the client's JSON filter forms (memlm.index.filters.parse_filter)
    search_mode: Optional[StrictStr] = None  # "dense" | "lexical" | "hybrid"; None: the store's


class StreamOptions(BaseModel):
    """Accepted on a request that does not stream too (OpenAI and vLLM refuse that; it changes
    nothing, and a client that sets it once for all its calls should not fail the others)."""

    model_config = ConfigDict(extra="forbid")

    include_usage: Optional[StrictBool] = None
    include_obfuscation: Optional[StrictBool] = None  # padding against length side channels; nothing to pad here
    continuous_usage_stats: Optional[StrictBool] = None  # vLLM's: usage on every chunk; only false is served


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: StrictStr
    content: Union[StrictStr, list[TextPart], None] = None
    name: Optional[StrictStr] = None  # a participant's name: accepted, not shown to the model


class _GenerationBody(BaseModel):
    """What chat completions and completions share. Extra fields are kept so they can be judged
    (`check_extra_fields`) rather than dropped."""

    model_config = ConfigDict(extra="allow")

    model: Optional[StrictStr] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    n: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[StrictStr] = None  # an end-user id for abuse tracking: ignored
    memlm: Optional[MemoryOptions] = None


class ChatCompletionBody(_GenerationBody):
    messages: list[ChatMessageIn]
    max_completion_tokens: Optional[StrictInt] = None


class CompletionBody(_GenerationBody):
    prompt: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]


class EmbeddingBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input: Union[StrictStr, list[StrictStr], list[StrictInt], list[list[StrictInt]]]
    model: Optional[StrictStr] = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[StrictInt] = None
    user: Optional[StrictStr] = None


def _is_off(value: Any) -> bool:
    return value in (None, False, 0, "", [], {})


# Fields OpenAI defines that change nothing memlm returns: accepted and ignored.
_IGNORED = frozenset({
    "metadata", "store", "service_tier", "prompt_cache_key", "prompt_cache_retention", "safety_identifier",
    "parallel_tool_calls",  # only means something with tools, which are refused
})
# Fields that would change the reply: accepted only at their neutral value, else 400 naming them.
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tools": (_is_off, "memlm does not call tools"),
    "functions": (_is_off, "memlm does not call functions"),
    "tool_choice": (lambda v: v in (None, "none"), "memlm does not call tools"),
    "function_call": (lambda v: v in (None, "none"), "memlm does not call functions"),
    "logprobs": (_is_off, "log-probabilities are not returned"),
    "top_logprobs": (_is_off, "log-probabilities are not returned"),
    "logit_bias": (_is_off, "logit bias is not applied"),
    "presence_penalty": (_is_off, "penalties are not applied; send 0 or leave it out"),
    "frequency_penalty": (_is_off, "penalties are not applied; send 0 or leave it out"),
    "response_format": (
        lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
        "only plain text is produced (no JSON mode or json_schema); send {\"type\": \"text\"} or leave it out",
    ),
    "modalities": (lambda v: v in (None, ["text"]), "only text is produced"),
    "audio": (_is_off, "only text is produced"),
    "prediction": (_is_off, "predicted outputs are not supported"),
    "web_search_options": (_is_off, "memlm searches its own collections: use the `memlm` field"),
    "reasoning_effort": (lambda v: v in (None, "none"), "the served model does not reason; send \"none\" or leave it out"),
    "verbosity": (lambda v: v in (None, "medium"), "the served model has no verbosity control; send \"medium\" "
                  "(OpenAI's default) or leave it out"),
    "moderation": (_is_off, "no moderation is run"),
    "echo": (_is_off, "the prompt is not echoed"),
    "best_of": (lambda v: v in (None, 1), "one completion is generated per request"),
    "suffix": (_is_off, "insertion (a suffix) is not supported"),
}


# /v1/completions' own meanings: `logprobs` is a count there, and 0 still asks for the log-probability
# of each sampled token (OpenAI's legacy API and vLLM return it), so only null is neutral.
_NEUTRAL_COMPLETIONS = {
    **_NEUTRAL,
    "logprobs": (lambda v: v is None or v is False, "log-probabilities are not returned; leave logprobs out"),
}


def check_extra_fields(body: BaseModel, where: str = "",
                       neutral_values: dict[str, tuple[Callable[[Any], bool], str]] = _NEUTRAL) -> None:
    """400 for a field that is neither supported nor harmless to ignore (ParamError naming it)."""
    for name, value in (body.model_extra or {}).items():
        if name in _IGNORED:
            continue
        rule = neutral_values.get(name)
        if rule is None:
            raise ParamError(where + name, f"unknown field {where + name!r}; memlm's OpenAI-compatible API does not "
                             "define it (see README, \"OpenAI-compatible HTTP API\")")
        neutral, why = rule
        if not neutral(value):
            raise ParamError(where + name, f"{where + name}={quoted(value)} is not supported: {why}")


# --- bodies -> GenerationRequest --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Limits:
    """What the server's settings say about a request's defaults and bounds."""

    default_max_new_tokens: int
    max_new_tokens_limit: int


def _message_text(i: int, m: ChatMessageIn) -> str:
    where = f"messages[{i}].content"
    if isinstance(m.content, str):
        return m.content
    if m.content is None:
        raise ParamError(where, f"{where} is missing; expected the message's text")
    texts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise ParamError(f"{where}[{j}]", f"{where}[{j}] is a {part.type!r} part; memlm reads text parts "
                             "only ({\"type\": \"text\", \"text\": ...})")
        texts.append(part.text)
    return "".join(texts)


def _messages(body: ChatCompletionBody) -> tuple[ChatMessage, ...]:
    out = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role  # OpenAI's newer name for system messages
        if role in ("tool", "function"):
            raise ParamError(f"messages[{i}].role", f"messages[{i}].role={m.role!r}: memlm does not call tools, so "
                             "there are no tool results to send; expected system, user or assistant")
        check_extra_fields_of_message(i, m)
        out.append(ChatMessage(role=role, content=_message_text(i, m)))
    return tuple(out)


def check_extra_fields_of_message(i: int, m: ChatMessageIn) -> None:
    for name, value in (m.model_extra or {}).items():
        if name in ("refusal", "annotations") and _is_off(value):
            continue
        if name in ("tool_calls", "function_call", "tool_call_id", "audio") and _is_off(value):
            continue
        raise ParamError(f"messages[{i}].{name}", f"messages[{i}].{name} is not supported" +
                         (": memlm does not call tools" if "tool" in name or "function" in name else ""))


def _sampling(body: _GenerationBody, max_tokens: Optional[int], limits: Limits) -> SamplingParams:
    if body.n not in (None, 1):
        raise ParamError("n", f"n={body.n} is not supported: memlm generates one choice per request; send n=1 (or "
                         "leave it out) and make separate requests for more")
    if max_tokens is not None and not 1 <= max_tokens <= limits.max_new_tokens_limit:
        chat_field = isinstance(body, ChatCompletionBody) and body.max_completion_tokens is not None
        name = "max_completion_tokens" if chat_field else "max_tokens"
        raise ParamError(name, f"{name}={max_tokens} is out of range; expected 1 <= {name} <= "
                         f"{limits.max_new_tokens_limit} (the server's model.max_new_tokens_limit)")
    if body.seed is not None and not 0 <= body.seed <= SEED_MAX:
        raise ParamError("seed", f"seed={body.seed} is out of range; expected 0 <= seed < 2**64")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    for name, value in (("temperature", body.temperature), ("top_p", body.top_p)):
        if value is not None and not np.isfinite(value):
            raise ParamError(name, f"{name} must be a finite number, got {value}")
    return SamplingParams(
        max_new_tokens=max_tokens if max_tokens is not None else limits.default_max_new_tokens,
        temperature=body.temperature if body.temperature is not None else 0.0,
        top_p=body.top_p if body.top_p is not None else 1.0,
        seed=body.seed,
        stop=stop,
    )


def _memory_fields(opts: Optional[MemoryOptions]) -> dict[str, Any]:
    if opts is None:
        return {"memory": "none"}
    if opts.collection and not opts.memory:
        raise ParamError("memlm.memory", f"memlm.collection={opts.collection!r} is set but memlm.memory is not; name "
                         "the memory mode that reads it (e.g. \"rag\"; GET /v1/models lists them)")
    try:
        filt = parse_filter(opts.filter)
    except InvalidArgument as exc:
        raise ParamError("memlm.filter", f"memlm.filter: {exc}") from None
    return {"collection": opts.collection or None, "memory": opts.memory or "none", "k": opts.k, "filter": filt,
            "search_mode": opts.search_mode or None}


def check_model(requested: Optional[str], info: ModelInfo) -> None:
    if requested is not None and requested != info.name:
        raise ModelNotFound(f"model {requested!r} is not served here; this server serves {info.name!r} "
                            "(GET /v1/models)")


class ModelNotFound(NotFound):
    param = "model"
    openai_code = "model_not_found"


def _check_stream_options(body: _GenerationBody) -> None:
    if body.stream_options is not None and body.stream_options.continuous_usage_stats:
        raise ParamError("stream_options.continuous_usage_stats", "stream_options.continuous_usage_stats=true is not "
                         "supported: usage comes once, in the last chunk (stream_options.include_usage)")


def chat_request(body: ChatCompletionBody, limits: Limits, request_id: str) -> GenerationRequest:
    check_extra_fields(body)
    _check_stream_options(body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return GenerationRequest(messages=_messages(body), sampling=_sampling(body, max_tokens, limits),
                             request_id=request_id, **_memory_fields(body.memlm))


def completion_request(body: CompletionBody, limits: Limits, request_id: str) -> GenerationRequest:
    check_extra_fields(body, neutral_values=_NEUTRAL_COMPLETIONS)
    _check_stream_options(body)
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1 or not isinstance(prompt[0], str):
            what = "token ids" if prompt and not isinstance(prompt[0], str) else f"{len(prompt)} prompts"
            raise ParamError("prompt", f"prompt holds {what}; memlm takes one prompt as text per request")
        prompt = prompt[0]
    return GenerationRequest(prompt=prompt, sampling=_sampling(body, body.max_tokens, limits), request_id=request_id,
                             **_memory_fields(body.memlm))


def embedding_inputs(body: EmbeddingBody) -> list[str]:
    if body.input == [] or (body.input and not isinstance(body.input, str) and not isinstance(body.input[0], str)):
        what = "nothing" if body.input == [] else "token ids"
        raise ParamError("input", f"input holds {what}; expected a string or a list of strings")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if len(texts) > MAX_EMBEDDING_INPUTS:
        raise ParamError("input", f"input holds {len(texts)} strings; the limit is {MAX_EMBEDDING_INPUTS} per request")
    return texts


# --- results -> OpenAI objects ------------------------------------------------------------------

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # "cancelled" never reaches a client


def finish_reason(result: GenerationResult) -> str:
    return FINISH_REASONS.get(result.finish_reason, "stop")


def citation(h: SearchHit) -> dict[str, Any]:
    return {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "score": h.score, "text": h.text, "metadata": h.metadata,
            "chunk_index": h.chunk_index, "start": h.start, "end": h.end}


def memlm_extension(result: GenerationResult) -> dict[str, Any]:
    return {"citations": [citation(h) for h in result.citations], "timings": dataclasses.asdict(result.timings),
            "truncated_prompt_tokens": result.truncated_prompt_tokens}


def usage(result: GenerationResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


@dataclasses.dataclass(frozen=True)
class Reply:
    """Builds one generation's completion object or stream chunks (`chat`: chat.completion's shape)."""

    chat: bool
    id: str
    created: int
    model: str

    def _head(self, chunk: bool) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "system_fingerprint": None}

    def completion(self, result: GenerationResult) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text, "refusal": None},
                      "logprobs": None, "finish_reason": finish_reason(result)}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": None, "finish_reason": finish_reason(result)}
        return {**self._head(False), "choices": [choice], "usage": usage(result), "memlm": memlm_extension(result)}

    def _choice(self, text: Optional[str], finish: Optional[str], role: bool = False) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def first_chunk(self, with_usage: bool) -> Optional[str]:
        """Chat streams open with the assistant role and empty content, as OpenAI's do."""
        return self._sse([self._choice("", None, role=True)], with_usage) if self.chat else None

    def delta_chunk(self, text: str, with_usage: bool) -> str:
        return self._sse([self._choice(text, None)], with_usage)

    def final_chunks(self, result: GenerationResult, with_usage: bool) -> list[str]:
        """The chunk that ends the choice (finish_reason, and the `memlm` extension: citations,
        timings), then with stream_options.include_usage one with no choices and the usage."""
        last = {**self._head(True), "choices": [self._choice(None if self.chat else "", finish_reason(result))],
                "memlm": memlm_extension(result)}
        if with_usage:
            last["usage"] = None
        out = [sse(last)]
        if with_usage:
            out.append(sse({**self._head(True), "choices": [], "usage": usage(result)}))
        return out

    def _sse(self, choices: list[dict[str, Any]], with_usage: bool) -> str:
        chunk = {**self._head(True), "choices": choices}
        if with_usage:
            chunk["usage"] = None  # OpenAI's chunks carry usage: null until the last one
        return sse(chunk)


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


def embedding_list(vectors: np.ndarray, encoding: str, model: str, tokens: int) -> dict[str, Any]:
    """(n, dim) float32 rows -> OpenAI's embedding list; base64: the rows' little-endian float32 bytes."""
    rows = np.ascontiguousarray(vectors, dtype="<f4")  # (n, dim)
    if encoding == "base64":
        data = [base64.b64encode(row.tobytes()).decode("ascii") for row in rows]
    else:
        data = rows.tolist()
    return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# --- errors ---------------------------------------------------------------------------------

# memlm.errors code -> (HTTP status, OpenAI error type). FAILED_PRECONDITION is 400, as Google's
# API design guide and grpc-gateway map it, not 409: the openai client retries a 409 twice, and a
# collection without knn memory or a model without a chat template does not change by retrying.
HTTP_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "FAILED_PRECONDITION": (400, "invalid_request_error"),
    "OUT_OF_RANGE": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ALREADY_EXISTS": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "resource_exhausted_error"),
    "CANCELLED": (499, "cancelled_error"),
    "UNIMPLEMENTED": (501, "not_implemented_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
}
# Statuses the openai client would retry (429, 5xx) whose memlm causes retrying does not cure.
# RESOURCE_EXHAUSTED is not among them: besides configured limits (collections, the LMDB map) it
# is the engine's "model.max_concurrent_requests generations in flight", which a retry with the
# client's backoff does cure.
NO_RETRY = frozenset({"UNIMPLEMENTED", "INTERNAL"})


def error_body(message: str, type_: str, code: Optional[str], param: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# The engine's messages about a sampling field start "name=value"; its OpenAI name goes in `param`.
_ENGINE_PARAM = re.compile(r"^(temperature|top_p|stop|k|max_new_tokens)=")
_PARAM_NAMES = {"k": "memlm.k", "max_new_tokens": "max_tokens"}


def error_reply(exc: MemlmError, message: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, OpenAI error body, headers) for a memlm error; `message` is its bounded text."""
    status, type_ = HTTP_STATUS.get(exc.code, (500, "server_error"))
    status = getattr(exc, "http_status", status)  # a refinement of the code's status (413: a body too large)
    code = getattr(exc, "openai_code", None) or exc.code.lower()
    headers = {"x-should-retry": "false"} if exc.code in NO_RETRY else {}
    if exc.code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = 'Bearer realm="memlm"'
    param = getattr(exc, "param", None)
    if param is None and (m := _ENGINE_PARAM.match(message)):
        param = _PARAM_NAMES.get(m.group(1), m.group(1))
    return status, error_body(message, type_, code, param), headers
