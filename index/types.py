"""Plain data types the memory store takes and returns; the wire format maps onto these.

Everything here is a frozen-ish dataclass with no behaviour beyond validation, so the store, the
engine, the servicers and the tests share one vocabulary.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Union

# A metadata value is a JSON scalar or a list of JSON scalars (a document's tags, say).
Scalar = Union[str, int, float, bool]
Metadata = dict[str, Any]


@dataclass(frozen=True)
class Document:
    """What a user ingests. `id` is the user's key: re-ingesting it replaces the document."""

    id: str
    text: str
    metadata: Metadata = field(default_factory=dict)


@dataclass(frozen=True)
class CollectionConfig:
    """Fixed at creation; stored in LMDB with the collection."""

    name: str
    embedding_model: str = "all-MiniLM-L6-v2"
    dim: int = 384
    index_factory: str = "Flat"  # a FAISS factory string; metric is always inner product
    chunk_tokens: int = 64  # RETRO's chunk size, in language-model tokens
    chunk_overlap: int = 0  # tokens shared by consecutive chunks of one document
    tokenizer: str = "SmolLM2-135M-Instruct"
    # The memory modes that derive something from this collection, with the options each fixed at
    # creation ({"knn": {"layers": ..., "window": ...}}; memlm.modes.collection_memory fills them).
    # Modes that read the store as it is (rag) need no entry.
    memory: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    created_at: float = 0.0  # unix seconds

    @property
    def kv_memory(self) -> bool:
        """Whether the collection keeps a KV memory (the knn mode's); the older name for `"knn" in memory`."""
        return "knn" in self.memory

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> "CollectionConfig":
        """From `dataclasses.asdict` output, also as written before `memory` existed (`kv_memory: bool`)."""
        obj = dict(obj)
        if obj.pop("kv_memory", False) and "memory" not in obj:
            obj["memory"] = {"knn": {}}
        return cls(**obj)


@dataclass(frozen=True)
class CollectionStats:
    config: CollectionConfig
    documents: int
    chunks: int
    index_vectors: int  # vectors in the FAISS index (equals `chunks` when consistent)
    index_trained: bool
    pending_ops: int  # index operations logged in LMDB but not yet in the index snapshot on disk
    disk_bytes: int  # LMDB share is approximate: LMDB is one file for all collections
    problem: Optional[str] = None  # why the collection cannot serve searches and writes; None: it can
    memory_lag: dict[str, int] = field(default_factory=dict)  # mode -> oplog entries its derived memory has yet to apply


@dataclass(frozen=True)
class DocumentResult:
    """Per-document outcome of an ingest call."""

    id: str
    status: Literal["created", "replaced", "unchanged", "rejected"]  # unchanged: same text and metadata stored
    chunks: int = 0
    chunk_ids: tuple[int, ...] = ()
    error_code: str = ""  # a memlm.errors code name when rejected, e.g. "INVALID_ARGUMENT"
    message: str = ""


@dataclass(frozen=True)
class StoredDocument:
    id: str
    text: str
    metadata: Metadata
    chunk_ids: tuple[int, ...]
    updated_at: float


@dataclass(frozen=True)
class DocumentPage:
    """One page of `MemoryStore.list_documents`: documents in id order (their text "" when listed
    without it), and the cursor that continues after them."""

    documents: list[StoredDocument]
    next_after: Optional[str]  # pass as `after` for the next page; None: this page is the last


@dataclass(frozen=True)
class Chunk:
    """A span of one document: [start, end) in characters and its language-model token ids."""

    text: str
    token_ids: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SearchHit:
    chunk_id: int
    doc_id: str
    score: float  # inner product of unit vectors: cosine similarity
    text: str
    metadata: Metadata
    chunk_index: int  # position of the chunk within its document
    start: int
    end: int


@dataclass(frozen=True)
class Condition:
    """One metadata test. Exactly one of `equals` / `any_of` is set.

    A document matches `equals=x` when its value at `key` is x, or is a list containing x;
    `any_of=(x, y)` when it matches `equals` for at least one of them. Booleans, numbers and
    strings never equal each other (`True` is not `1`, `1` is not `"1"`); `1` equals `1.0`.
    """

    key: str
    equals: Scalar | None = None
    any_of: tuple[Scalar, ...] | None = None


@dataclass(frozen=True)
class Filter:
    """Qdrant-style boolean filter: all of `must`, at least one of `should` (when any are
    given), none of `must_not`. An empty filter matches everything."""

    must: tuple[Condition, ...] = ()
    should: tuple[Condition, ...] = ()
    must_not: tuple[Condition, ...] = ()

    def is_empty(self) -> bool:
        return not (self.must or self.should or self.must_not)
