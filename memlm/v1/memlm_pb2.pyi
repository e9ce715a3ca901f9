from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MemoryMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMORY_MODE_UNSPECIFIED: _ClassVar[MemoryMode]
    MEMORY_MODE_NONE: _ClassVar[MemoryMode]
    MEMORY_MODE_RAG: _ClassVar[MemoryMode]
    MEMORY_MODE_KNN: _ClassVar[MemoryMode]
    MEMORY_MODE_LANDMARK: _ClassVar[MemoryMode]
    MEMORY_MODE_RETRO: _ClassVar[MemoryMode]
    MEMORY_MODE_RMT: _ClassVar[MemoryMode]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
MEMORY_MODE_UNSPECIFIED: MemoryMode
MEMORY_MODE_NONE: MemoryMode
MEMORY_MODE_RAG: MemoryMode
MEMORY_MODE_KNN: MemoryMode
MEMORY_MODE_LANDMARK: MemoryMode
MEMORY_MODE_RETRO: MemoryMode
MEMORY_MODE_RMT: MemoryMode
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class ReadChunksRequest(_message.Message):
    __slots__ = ("collection", "chunk_ids", "missing_ok")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_OK_FIELD_NUMBER: _ClassVar[int]
    collection: str
    chunk_ids: _containers.RepeatedScalarFieldContainer[int]
    missing_ok: bool
    def __init__(self, collection: _Optional[str] = ..., chunk_ids: _Optional[_Iterable[int]] = ..., missing_ok: _Optional[bool] = ...) -> None: ...

class StoredChunk(_message.Message):
    __slots__ = ("chunk_id", "found", "doc_id", "chunk_index", "text", "token_ids")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    FOUND_FIELD_NUMBER: _ClassVar[int]
    DOC_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    chunk_id: int
    found: bool
    doc_id: str
    chunk_index: int
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, chunk_id: _Optional[int] = ..., found: _Optional[bool] = ..., doc_id: _Optional[str] = ..., chunk_index: _Optional[int] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReadChunksResponse(_message.Message):
    __slots__ = ("chunks",)
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    chunks: _containers.RepeatedCompositeFieldContainer[StoredChunk]
    def __init__(self, chunks: _Optional[_Iterable[_Union[StoredChunk, _Mapping]]] = ...) -> None: ...

class FollowingChunksRequest(_message.Message):
    __slots__ = ("collection", "chunk_id", "n")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    collection: str
    chunk_id: int
    n: int
    def __init__(self, collection: _Optional[str] = ..., chunk_id: _Optional[int] = ..., n: _Optional[int] = ...) -> None: ...

class FollowingChunksResponse(_message.Message):
    __slots__ = ("chunk_ids",)
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    chunk_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, chunk_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ListChunkIdsRequest(_message.Message):
    __slots__ = ("collection", "after_chunk_id", "limit", "after_set")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    AFTER_CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    AFTER_SET_FIELD_NUMBER: _ClassVar[int]
    collection: str
    after_chunk_id: int
    limit: int
    after_set: bool
    def __init__(self, collection: _Optional[str] = ..., after_chunk_id: _Optional[int] = ..., limit: _Optional[int] = ..., after_set: _Optional[bool] = ...) -> None: ...

class ListChunkIdsResponse(_message.Message):
    __slots__ = ("chunk_ids",)
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    chunk_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, chunk_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ReadChangesRequest(_message.Message):
    __slots__ = ("collection", "after_seq", "upto_seq", "limit")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    UPTO_SEQ_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    after_seq: int
    upto_seq: int
    limit: int
    def __init__(self, collection: _Optional[str] = ..., after_seq: _Optional[int] = ..., upto_seq: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class Change(_message.Message):
    __slots__ = ("seq", "added", "removed")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    added: _containers.RepeatedScalarFieldContainer[int]
    removed: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, seq: _Optional[int] = ..., added: _Optional[_Iterable[int]] = ..., removed: _Optional[_Iterable[int]] = ...) -> None: ...

class ReadChangesResponse(_message.Message):
    __slots__ = ("last_seq", "truncated", "changes")
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    last_seq: int
    truncated: bool
    changes: _containers.RepeatedCompositeFieldContainer[Change]
    def __init__(self, last_seq: _Optional[int] = ..., truncated: _Optional[bool] = ..., changes: _Optional[_Iterable[_Union[Change, _Mapping]]] = ...) -> None: ...

class SetWatermarkRequest(_message.Message):
    __slots__ = ("collection", "mode", "seq")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    collection: str
    mode: str
    seq: int
    def __init__(self, collection: _Optional[str] = ..., mode: _Optional[str] = ..., seq: _Optional[int] = ...) -> None: ...

class SetWatermarkResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CreateCollectionRequest(_message.Message):
    __slots__ = ("name", "embedding_model", "index_factory", "chunk_tokens", "chunk_overlap", "kv_memory", "if_not_exists", "memory")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    INDEX_FACTORY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    KV_MEMORY_FIELD_NUMBER: _ClassVar[int]
    IF_NOT_EXISTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    embedding_model: str
    index_factory: str
    chunk_tokens: int
    chunk_overlap: int
    kv_memory: bool
    if_not_exists: bool
    memory: _containers.RepeatedCompositeFieldContainer[MemoryOptions]
    def __init__(self, name: _Optional[str] = ..., embedding_model: _Optional[str] = ..., index_factory: _Optional[str] = ..., chunk_tokens: _Optional[int] = ..., chunk_overlap: _Optional[int] = ..., kv_memory: _Optional[bool] = ..., if_not_exists: _Optional[bool] = ..., memory: _Optional[_Iterable[_Union[MemoryOptions, _Mapping]]] = ...) -> None: ...

class MemoryOptions(_message.Message):
    __slots__ = ("mode", "options")
    MODE_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    mode: str
    options: _struct_pb2.Struct
    def __init__(self, mode: _Optional[str] = ..., options: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class CreateCollectionResponse(_message.Message):
    __slots__ = ("config", "created")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    config: CollectionConfig
    created: bool
    def __init__(self, config: _Optional[_Union[CollectionConfig, _Mapping]] = ..., created: _Optional[bool] = ...) -> None: ...

class CollectionConfig(_message.Message):
    __slots__ = ("name", "embedding_model", "dimension", "index_factory", "chunk_tokens", "chunk_overlap", "tokenizer", "kv_memory", "created_at", "memory")
    NAME_FIELD_NUMBER: _ClassVar[int]
    EMBEDDING_MODEL_FIELD_NUMBER: _ClassVar[int]
    DIMENSION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FACTORY_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_OVERLAP_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    KV_MEMORY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    name: str
    embedding_model: str
    dimension: int
    index_factory: str
    chunk_tokens: int
    chunk_overlap: int
    tokenizer: str
    kv_memory: bool
    created_at: float
    memory: _containers.RepeatedCompositeFieldContainer[MemoryOptions]
    def __init__(self, name: _Optional[str] = ..., embedding_model: _Optional[str] = ..., dimension: _Optional[int] = ..., index_factory: _Optional[str] = ..., chunk_tokens: _Optional[int] = ..., chunk_overlap: _Optional[int] = ..., tokenizer: _Optional[str] = ..., kv_memory: _Optional[bool] = ..., created_at: _Optional[float] = ..., memory: _Optional[_Iterable[_Union[MemoryOptions, _Mapping]]] = ...) -> None: ...

class CollectionInfo(_message.Message):
    __slots__ = ("config", "documents", "chunks", "index_vectors", "index_trained", "pending_ops", "disk_bytes", "problem", "memory_lag")
    class MemoryLagEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    INDEX_VECTORS_FIELD_NUMBER: _ClassVar[int]
    INDEX_TRAINED_FIELD_NUMBER: _ClassVar[int]
    PENDING_OPS_FIELD_NUMBER: _ClassVar[int]
    DISK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    MEMORY_LAG_FIELD_NUMBER: _ClassVar[int]
    config: CollectionConfig
    documents: int
    chunks: int
    index_vectors: int
    index_trained: bool
    pending_ops: int
    disk_bytes: int
    problem: str
    memory_lag: _containers.ScalarMap[str, int]
    def __init__(self, config: _Optional[_Union[CollectionConfig, _Mapping]] = ..., documents: _Optional[int] = ..., chunks: _Optional[int] = ..., index_vectors: _Optional[int] = ..., index_trained: _Optional[bool] = ..., pending_ops: _Optional[int] = ..., disk_bytes: _Optional[int] = ..., problem: _Optional[str] = ..., memory_lag: _Optional[_Mapping[str, int]] = ...) -> None: ...

class ListCollectionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListCollectionsResponse(_message.Message):
    __slots__ = ("collections",)
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionConfig]
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionConfig, _Mapping]]] = ...) -> None: ...

class DescribeCollectionRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class DropCollectionRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class DropCollectionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReindexCollectionRequest(_message.Message):
    __slots__ = ("collection", "index_factory")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    INDEX_FACTORY_FIELD_NUMBER: _ClassVar[int]
    collection: str
    index_factory: str
    def __init__(self, collection: _Optional[str] = ..., index_factory: _Optional[str] = ...) -> None: ...

class ReindexCollectionResponse(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: CollectionConfig
    def __init__(self, config: _Optional[_Union[CollectionConfig, _Mapping]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("id", "text", "metadata")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata: _struct_pb2.Struct
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class IngestRequest(_message.Message):
    __slots__ = ("collection", "documents", "skip_invalid")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    SKIP_INVALID_FIELD_NUMBER: _ClassVar[int]
    collection: str
    documents: _containers.RepeatedCompositeFieldContainer[Document]
    skip_invalid: bool
    def __init__(self, collection: _Optional[str] = ..., documents: _Optional[_Iterable[_Union[Document, _Mapping]]] = ..., skip_invalid: _Optional[bool] = ...) -> None: ...

class DocumentResult(_message.Message):
    __slots__ = ("id", "status", "chunks", "chunk_ids", "error_code", "message")
    class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATUS_UNSPECIFIED: _ClassVar[DocumentResult.Status]
        CREATED: _ClassVar[DocumentResult.Status]
        REPLACED: _ClassVar[DocumentResult.Status]
        REJECTED: _ClassVar[DocumentResult.Status]
        UNCHANGED: _ClassVar[DocumentResult.Status]
    STATUS_UNSPECIFIED: DocumentResult.Status
    CREATED: DocumentResult.Status
    REPLACED: DocumentResult.Status
    REJECTED: DocumentResult.Status
    UNCHANGED: DocumentResult.Status
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: DocumentResult.Status
    chunks: int
    chunk_ids: _containers.RepeatedScalarFieldContainer[int]
    error_code: str
    message: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[DocumentResult.Status, str]] = ..., chunks: _Optional[int] = ..., chunk_ids: _Optional[_Iterable[int]] = ..., error_code: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class IngestResponse(_message.Message):
    __slots__ = ("results", "created", "replaced", "rejected", "chunks", "took_ms", "unchanged")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    REPLACED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOOK_MS_FIELD_NUMBER: _ClassVar[int]
    UNCHANGED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[DocumentResult]
    created: int
    replaced: int
    rejected: int
    chunks: int
    took_ms: float
    unchanged: int
    def __init__(self, results: _Optional[_Iterable[_Union[DocumentResult, _Mapping]]] = ..., created: _Optional[int] = ..., replaced: _Optional[int] = ..., rejected: _Optional[int] = ..., chunks: _Optional[int] = ..., took_ms: _Optional[float] = ..., unchanged: _Optional[int] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("key", "equals", "any_of")
    KEY_FIELD_NUMBER: _ClassVar[int]
    EQUALS_FIELD_NUMBER: _ClassVar[int]
    ANY_OF_FIELD_NUMBER: _ClassVar[int]
    key: str
    equals: _struct_pb2.Value
    any_of: _struct_pb2.ListValue
    def __init__(self, key: _Optional[str] = ..., equals: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., any_of: _Optional[_Union[_struct_pb2.ListValue, _Mapping]] = ...) -> None: ...

class Filter(_message.Message):
    __slots__ = ("must", "should", "must_not")
    MUST_FIELD_NUMBER: _ClassVar[int]
    SHOULD_FIELD_NUMBER: _ClassVar[int]
    MUST_NOT_FIELD_NUMBER: _ClassVar[int]
    must: _containers.RepeatedCompositeFieldContainer[Condition]
    should: _containers.RepeatedCompositeFieldContainer[Condition]
    must_not: _containers.RepeatedCompositeFieldContainer[Condition]
    def __init__(self, must: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., should: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ..., must_not: _Optional[_Iterable[_Union[Condition, _Mapping]]] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class SearchRequest(_message.Message):
    __slots__ = ("collection", "text", "vector", "k", "filter", "mode")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    collection: str
    text: str
    vector: Vector
    k: int
    filter: Filter
    mode: str
    def __init__(self, collection: _Optional[str] = ..., text: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., mode: _Optional[str] = ...) -> None: ...

class ScoredChunk(_message.Message):
    __slots__ = ("chunk_id", "document_id", "score", "text", "metadata", "chunk_index", "start", "end")
    CHUNK_ID_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    chunk_id: int
    document_id: str
    score: float
    text: str
    metadata: _struct_pb2.Struct
    chunk_index: int
    start: int
    end: int
    def __init__(self, chunk_id: _Optional[int] = ..., document_id: _Optional[str] = ..., score: _Optional[float] = ..., text: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., chunk_index: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class SearchResponse(_message.Message):
    __slots__ = ("hits", "took_ms")
    HITS_FIELD_NUMBER: _ClassVar[int]
    TOOK_MS_FIELD_NUMBER: _ClassVar[int]
    hits: _containers.RepeatedCompositeFieldContainer[ScoredChunk]
    took_ms: float
    def __init__(self, hits: _Optional[_Iterable[_Union[ScoredChunk, _Mapping]]] = ..., took_ms: _Optional[float] = ...) -> None: ...

class GetRequest(_message.Message):
    __slots__ = ("collection", "ids", "missing_ok")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    MISSING_OK_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    missing_ok: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., missing_ok: _Optional[bool] = ...) -> None: ...

class StoredDocument(_message.Message):
    __slots__ = ("id", "text", "metadata", "chunk_ids", "updated_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CHUNK_IDS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    text: str
    metadata: _struct_pb2.Struct
    chunk_ids: _containers.RepeatedScalarFieldContainer[int]
    updated_at: float
    def __init__(self, id: _Optional[str] = ..., text: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., chunk_ids: _Optional[_Iterable[int]] = ..., updated_at: _Optional[float] = ...) -> None: ...

class GetResponse(_message.Message):
    __slots__ = ("documents",)
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[StoredDocument]
    def __init__(self, documents: _Optional[_Iterable[_Union[StoredDocument, _Mapping]]] = ...) -> None: ...

class ListDocumentsRequest(_message.Message):
    __slots__ = ("collection", "filter", "after", "limit", "with_text")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    WITH_TEXT_FIELD_NUMBER: _ClassVar[int]
    collection: str
    filter: Filter
    after: str
    limit: int
    with_text: bool
    def __init__(self, collection: _Optional[str] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., after: _Optional[str] = ..., limit: _Optional[int] = ..., with_text: _Optional[bool] = ...) -> None: ...

class ListDocumentsResponse(_message.Message):
    __slots__ = ("documents", "next_after")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_AFTER_FIELD_NUMBER: _ClassVar[int]
    documents: _containers.RepeatedCompositeFieldContainer[StoredDocument]
    next_after: str
    def __init__(self, documents: _Optional[_Iterable[_Union[StoredDocument, _Mapping]]] = ..., next_after: _Optional[str] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("collection", "ids", "filter", "all")
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    ALL_FIELD_NUMBER: _ClassVar[int]
    collection: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    filter: Filter
    all: bool
    def __init__(self, collection: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., all: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "not_found")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    NOT_FOUND_FIELD_NUMBER: _ClassVar[int]
    deleted: _containers.RepeatedScalarFieldContainer[str]
    not_found: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deleted: _Optional[_Iterable[str]] = ..., not_found: _Optional[_Iterable[str]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ("collection",)
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    collection: str
    def __init__(self, collection: _Optional[str] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("collections", "version", "uptime_s", "model")
    COLLECTIONS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    collections: _containers.RepeatedCompositeFieldContainer[CollectionInfo]
    version: str
    uptime_s: float
    model: ModelInfoResponse
    def __init__(self, collections: _Optional[_Iterable[_Union[CollectionInfo, _Mapping]]] = ..., version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., model: _Optional[_Union[ModelInfoResponse, _Mapping]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "collection", "memory", "k", "filter", "max_new_tokens", "temperature", "top_p", "seed", "stop", "request_id", "search_mode")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    COLLECTION_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    FILTER_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEARCH_MODE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: ChatMessages
    collection: str
    memory: MemoryMode
    k: int
    filter: Filter
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    search_mode: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., collection: _Optional[str] = ..., memory: _Optional[_Union[MemoryMode, str]] = ..., k: _Optional[int] = ..., filter: _Optional[_Union[Filter, _Mapping]] = ..., max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., search_mode: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "truncated_prompt_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    truncated_prompt_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., truncated_prompt_tokens: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("retrieval_ms", "prefill_ms", "decode_ms", "time_to_first_token_ms", "total_ms")
    RETRIEVAL_MS_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    retrieval_ms: float
    prefill_ms: float
    decode_ms: float
    time_to_first_token_ms: float
    total_ms: float
    def __init__(self, retrieval_ms: _Optional[float] = ..., prefill_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., time_to_first_token_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class GenerationDone(_message.Message):
    __slots__ = ("text", "finish_reason", "citations", "usage", "timings")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    CITATIONS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    text: str
    finish_reason: FinishReason
    citations: _containers.RepeatedCompositeFieldContainer[ScoredChunk]
    usage: Usage
    timings: Timings
    def __init__(self, text: _Optional[str] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., citations: _Optional[_Iterable[_Union[ScoredChunk, _Mapping]]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("delta", "done")
    DELTA_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    delta: str
    done: GenerationDone
    def __init__(self, delta: _Optional[str] = ..., done: _Optional[_Union[GenerationDone, _Mapping]] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfoResponse(_message.Message):
    __slots__ = ("name", "context_length", "vocab_size", "layers", "memory_modes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_MODES_FIELD_NUMBER: _ClassVar[int]
    name: str
    context_length: int
    vocab_size: int
    layers: int
    memory_modes: _containers.RepeatedScalarFieldContainer[MemoryMode]
    def __init__(self, name: _Optional[str] = ..., context_length: _Optional[int] = ..., vocab_size: _Optional[int] = ..., layers: _Optional[int] = ..., memory_modes: _Optional[_Iterable[_Union[MemoryMode, str]]] = ...) -> None: ...
