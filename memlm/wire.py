"""Translation between the wire messages (memlm.v1) and memlm's own types.

The servicers and the client both use these, so each field is mapped in one place. Struct-typed
metadata: protobuf stores every number as a double, so integral values come back as ints.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

from google.protobuf import struct_pb2

from memlm.engine import ChatMessage, GenerationRequest, GenerationResult, SamplingParams
from memlm.errors import InvalidArgument
from memlm.index.types import (
    CollectionConfig, CollectionStats, Condition, DocumentResult, Filter, SearchHit, StoredDocument,
)
from memlm.v1 import memlm_pb2 as pb

_MODE_PREFIX = "MEMORY_MODE_"
_FINISH_TO_PB = {
    "stop": pb.FINISH_REASON_STOP,
    "eos": pb.FINISH_REASON_EOS,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}
_STATUS_TO_PB = {
    "created": pb.DocumentResult.CREATED,
    "replaced": pb.DocumentResult.REPLACED,
    "rejected": pb.DocumentResult.REJECTED,
    "unchanged": pb.DocumentResult.UNCHANGED,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}


# --- metadata --------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _value_to_plain(value: struct_pb2.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "struct_value":
        return struct_to_dict(value.struct_value)
    if kind == "list_value":
        return [_value_to_plain(v) for v in value.list_value.values]
    if kind == "number_value":
        return _plain(value.number_value)
    return None if kind in (None, "null_value") else getattr(value, kind)


def struct_to_dict(struct: struct_pb2.Struct) -> dict[str, Any]:
    """A Struct as plain Python. Read field by field, not through JSON: NaN and infinities come
    through as floats (json_format refuses them with a ValueError, an INTERNAL to the caller), so
    the store can reject them naming the document and key."""
    return {k: _value_to_plain(v) for k, v in struct.fields.items()}


def dict_to_struct(data: Optional[Mapping[str, Any]]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    if data:
        try:
            struct.update(dict(data))
        except (ValueError, TypeError) as exc:
            raise InvalidArgument(f"metadata must be a JSON object of scalars and lists: {exc}") from None
    return struct


def _value_to_python(value: struct_pb2.Value, where: str) -> Any:
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "number_value":
        return _plain(value.number_value)
    raise InvalidArgument(f"{where} must be a string, number or boolean, got {kind or 'nothing'}")


def _python_to_value(value: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    if isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, (int, float)):
        out.number_value = value
    elif isinstance(value, str):
        out.string_value = value
    else:
        raise InvalidArgument(f"filter values must be strings, numbers or booleans, got {value!r}")
    return out


# --- filters ---------------------------------------------------------------------------------

def filter_from_pb(msg: pb.Filter, present: bool = True) -> Optional[Filter]:
    if not present:
        return None

    def conditions(items, group: str) -> tuple[Condition, ...]:
        out = []
        for i, c in enumerate(items):
            where = f"filter.{group}[{i}]"
            if not c.key:
                raise InvalidArgument(f"{where}.key is empty; expected a metadata key")
            which = c.WhichOneof("match")
            if which == "equals":
                out.append(Condition(key=c.key, equals=_value_to_python(c.equals, f"{where}.equals")))
            elif which == "any_of":
                if not c.any_of.values:
                    raise InvalidArgument(f"{where}.any_of is empty; expected at least one value")
                vals = tuple(_value_to_python(v, f"{where}.any_of[{j}]") for j, v in enumerate(c.any_of.values))
                out.append(Condition(key=c.key, any_of=vals))
            else:
                raise InvalidArgument(f"{where} sets neither equals nor any_of")
        return tuple(out)

    f = Filter(
        must=conditions(msg.must, "must"),
        should=conditions(msg.should, "should"),
        must_not=conditions(msg.must_not, "must_not"),
    )
    return None if f.is_empty() else f


def filter_to_pb(f: Filter) -> pb.Filter:
    def cond(c: Condition) -> pb.Condition:
        out = pb.Condition(key=c.key)
        if c.any_of is not None:
            out.any_of.values.extend(_python_to_value(v) for v in c.any_of)
        else:
            out.equals.CopyFrom(_python_to_value(c.equals))
        return out

    return pb.Filter(
        must=[cond(c) for c in f.must], should=[cond(c) for c in f.should], must_not=[cond(c) for c in f.must_not]
    )


# --- collections, documents, hits --------------------------------------------------------------

def config_to_pb(c: CollectionConfig) -> pb.CollectionConfig:
    return pb.CollectionConfig(
        name=c.name, embedding_model=c.embedding_model, dimension=c.dim, index_factory=c.index_factory,
        chunk_tokens=c.chunk_tokens, chunk_overlap=c.chunk_overlap, tokenizer=c.tokenizer,
        kv_memory=c.kv_memory, created_at=c.created_at, memory=memory_to_pb(c.memory),
    )


def memory_to_pb(memory: Mapping[str, Optional[Mapping[str, Any]]]) -> list[pb.MemoryOptions]:
    """{mode: options} -> MemoryOptions messages."""
    return [pb.MemoryOptions(mode=mode, options=dict_to_struct(options or {})) for mode, options in memory.items()]


def memory_from_pb(items: Sequence[pb.MemoryOptions]) -> dict[str, dict[str, Any]]:
    """MemoryOptions messages -> {mode: options}; InvalidArgument for a mode named twice or not at all."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if not item.mode:
            raise InvalidArgument("MemoryOptions.mode is empty; expected a memory mode name such as 'knn'")
        if item.mode in out:
            raise InvalidArgument(f"memory mode {item.mode!r} is named twice")
        out[item.mode] = struct_to_dict(item.options)
    return out


def collection_settings_from_pb(m: pb.CreateCollectionRequest) -> dict[str, Any]:
    """The settings a CreateCollectionRequest sets, as MemoryStore.create_collection keywords; an
    unset field (and, as before these were optional, "" or chunk_tokens 0) is left out: the default."""
    out: dict[str, Any] = {}
    for name in ("embedding_model", "index_factory", "chunk_tokens", "chunk_overlap", "kv_memory"):
        if m.HasField(name):
            out[name] = getattr(m, name)
    for name in ("embedding_model", "index_factory", "chunk_tokens"):
        if not out.get(name, True):
            del out[name]
    if m.memory:
        out["memory"] = memory_from_pb(m.memory)
    return out


def config_from_pb(m: pb.CollectionConfig) -> CollectionConfig:
    return CollectionConfig(
        name=m.name, embedding_model=m.embedding_model, dim=m.dimension, index_factory=m.index_factory,
        chunk_tokens=m.chunk_tokens, chunk_overlap=m.chunk_overlap, tokenizer=m.tokenizer,
        memory=memory_from_pb(m.memory) or ({"knn": {}} if m.kv_memory else {}), created_at=m.created_at,
    )


def stats_to_pb(s: CollectionStats) -> pb.CollectionInfo:
    return pb.CollectionInfo(
        config=config_to_pb(s.config), documents=s.documents, chunks=s.chunks, index_vectors=s.index_vectors,
        index_trained=s.index_trained, pending_ops=s.pending_ops, disk_bytes=s.disk_bytes, problem=s.problem or "",
        memory_lag=dict(s.memory_lag),
    )


def stats_from_pb(m: pb.CollectionInfo) -> CollectionStats:
    return CollectionStats(
        config=config_from_pb(m.config), documents=m.documents, chunks=m.chunks, index_vectors=m.index_vectors,
        index_trained=m.index_trained, pending_ops=m.pending_ops, disk_bytes=m.disk_bytes, problem=m.problem or None,
        memory_lag=dict(m.memory_lag),
    )


def stored_chunk_to_pb(chunk_id: int, rec: Any) -> pb.StoredChunk:
    """A ChunkRecord (or None: not stored) -> StoredChunk."""
    if rec is None:
        return pb.StoredChunk(chunk_id=chunk_id, found=False)
    return pb.StoredChunk(chunk_id=chunk_id, found=True, doc_id=rec.doc_id, chunk_index=rec.chunk_index, text=rec.text,
                          token_ids=rec.token_ids.tolist())


def hit_to_pb(h: SearchHit) -> pb.ScoredChunk:
    return pb.ScoredChunk(
        chunk_id=h.chunk_id, document_id=h.doc_id, score=h.score, text=h.text,
        metadata=dict_to_struct(h.metadata), chunk_index=h.chunk_index, start=h.start, end=h.end,
    )


def hit_from_pb(m: pb.ScoredChunk) -> SearchHit:
    return SearchHit(
        chunk_id=m.chunk_id, doc_id=m.document_id, score=m.score, text=m.text,
        metadata=struct_to_dict(m.metadata), chunk_index=m.chunk_index, start=m.start, end=m.end,
    )


def result_to_pb(r: DocumentResult) -> pb.DocumentResult:
    return pb.DocumentResult(
        id=r.id, status=_STATUS_TO_PB[r.status], chunks=r.chunks, chunk_ids=list(r.chunk_ids),
        error_code=r.error_code, message=r.message,
    )


def result_from_pb(m: pb.DocumentResult) -> DocumentResult:
    return DocumentResult(
        id=m.id, status=_STATUS_FROM_PB.get(m.status, "rejected"), chunks=m.chunks, chunk_ids=tuple(m.chunk_ids),
        error_code=m.error_code, message=m.message,
    )


def stored_to_pb(d: StoredDocument) -> pb.StoredDocument:
    return pb.StoredDocument(
        id=d.id, text=d.text, metadata=dict_to_struct(d.metadata), chunk_ids=list(d.chunk_ids), updated_at=d.updated_at
    )


def stored_from_pb(m: pb.StoredDocument) -> StoredDocument:
    return StoredDocument(
        id=m.id, text=m.text, metadata=struct_to_dict(m.metadata), chunk_ids=tuple(m.chunk_ids), updated_at=m.updated_at
    )


# --- generation ------------------------------------------------------------------------------

def memory_mode_to_pb(mode: str) -> int:
    """A memory mode name -> its MemoryMode enum value (by name: "knn" -> MEMORY_MODE_KNN)."""
    name = str(mode).strip().lower()
    try:
        return pb.MemoryMode.Value(_MODE_PREFIX + name.upper())
    except ValueError:
        names = ", ".join(n.removeprefix(_MODE_PREFIX).lower() for n in pb.MemoryMode.keys() if n != _MODE_PREFIX + "UNSPECIFIED")
        raise InvalidArgument(f"unknown memory mode {mode!r}; expected one of: {names}") from None


def memory_mode_from_pb(value: int) -> str:
    """A MemoryMode enum value -> the mode's name (UNSPECIFIED: "none"); the engine checks that it is registered."""
    if value == pb.MEMORY_MODE_UNSPECIFIED:
        return "none"
    try:
        return pb.MemoryMode.Name(value).removeprefix(_MODE_PREFIX).lower()
    except ValueError:
        names = ", ".join(n for n in pb.MemoryMode.keys())
        raise InvalidArgument(f"unknown memory mode {value}; expected one of: {names}") from None


def generation_request_from_pb(m: pb.GenerateRequest, *, default_max_new_tokens: int) -> GenerationRequest:
    which = m.WhichOneof("input")
    if which is None:
        raise InvalidArgument("GenerateRequest needs a prompt or messages; got neither")
    messages = None
    if which == "messages":
        messages = tuple(ChatMessage(role=x.role, content=x.content) for x in m.messages.messages)
    for name in ("temperature", "top_p"):
        if m.HasField(name) and not math.isfinite(getattr(m, name)):
            raise InvalidArgument(f"{name} must be a finite number, got {getattr(m, name)}")
    sampling = SamplingParams(
        max_new_tokens=m.max_new_tokens if m.max_new_tokens != 0 else default_max_new_tokens,
        temperature=m.temperature if m.HasField("temperature") else 0.0,
        top_p=m.top_p if m.HasField("top_p") else 1.0,
        seed=m.seed if m.HasField("seed") else None,
        stop=tuple(m.stop),
    )
    return GenerationRequest(
        prompt=m.prompt if which == "prompt" else None,
        messages=messages,
        collection=m.collection or None,
        memory=memory_mode_from_pb(m.memory),
        k=m.k if m.k != 0 else None,  # the engine knows each mode's default
        filter=filter_from_pb(m.filter, m.HasField("filter")),
        sampling=sampling,
        request_id=m.request_id,
        search_mode=m.search_mode or None,
    )


def done_to_pb(r: GenerationResult) -> pb.GenerationDone:
    t = r.timings
    return pb.GenerationDone(
        text=r.text,
        finish_reason=_FINISH_TO_PB.get(r.finish_reason, pb.FINISH_REASON_UNSPECIFIED),
        citations=[hit_to_pb(h) for h in r.citations],
        usage=pb.Usage(
            prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
            truncated_prompt_tokens=r.truncated_prompt_tokens,
        ),
        timings=pb.Timings(
            retrieval_ms=t.retrieval_ms, prefill_ms=t.prefill_ms, decode_ms=t.decode_ms,
            time_to_first_token_ms=t.time_to_first_token_ms, total_ms=t.total_ms,
        ),
    )


def done_from_pb(m: pb.GenerationDone) -> GenerationResult:
    from memlm.engine import Timings

    t = m.timings
    return GenerationResult(
        text=m.text,
        finish_reason=_FINISH_FROM_PB.get(m.finish_reason, "unspecified"),
        citations=tuple(hit_from_pb(h) for h in m.citations),
        prompt_tokens=m.usage.prompt_tokens,
        completion_tokens=m.usage.completion_tokens,
        truncated_prompt_tokens=m.usage.truncated_prompt_tokens,
        timings=Timings(
            retrieval_ms=t.retrieval_ms, prefill_ms=t.prefill_ms, decode_ms=t.decode_ms,
            time_to_first_token_ms=t.time_to_first_token_ms, total_ms=t.total_ms,
        ),
    )
