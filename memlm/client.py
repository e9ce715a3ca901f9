"""The Python client: `memlm.Client(address)` over gRPC.

Every call carries a deadline (`timeout`, per call or the client's default). Server errors are
raised as `memlm.errors` exceptions carrying the gRPC status name in `.code` (NotFound,
InvalidArgument, ResourceExhausted, ...), so callers catch what they mean rather than RpcError.

    with memlm.Client("127.0.0.1:50051") as client:
        client.create_collection("docs", if_not_exists=True)
        client.ingest([{"id": "a", "text": "...", "metadata": {"lang": "en"}}], collection="docs")
        hits = client.search("question", collection="docs", k=5, filter={"lang": "en"})
        stream = client.generate("question", collection="docs", memory="rag")
        for piece in stream:
            print(piece, end="")
        print(stream.result.citations)

`memlm.AsyncClient` (memlm/async_client.py) makes the same calls over a grpc.aio channel; both
build their requests and read their replies with the functions below, so a field is mapped once.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import grpc
import numpy as np

from memlm import wire
from memlm.engine import GenerationResult
from memlm.errors import InvalidArgument, NotFound, error_for_code
from memlm.index.types import (
    CollectionConfig, CollectionStats, DocumentPage, DocumentResult, Filter, SearchHit, StoredDocument,
)
from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from memlm.async_client import AsyncClient

DEFAULT_ADDRESS = "127.0.0.1:50051"
FilterLike = Union[Filter, Mapping[str, Any], None]
DocumentLike = Union[Mapping[str, Any], Any]


@dataclass(frozen=True)
class IngestReport:
    results: list[DocumentResult]  # one per document, in the order given

    @property
    def created(self) -> int:
        return sum(r.status == "created" for r in self.results)

    @property
    def replaced(self) -> int:
        return sum(r.status == "replaced" for r in self.results)

    @property
    def unchanged(self) -> int:
        """Documents already stored with the same text and metadata: not re-embedded or rewritten."""
        return sum(r.status == "unchanged" for r in self.results)

    @property
    def rejected(self) -> list[DocumentResult]:
        return [r for r in self.results if r.status == "rejected"]

    @property
    def chunks(self) -> int:
        return sum(r.chunks for r in self.results)


def _raise_from(err: grpc.RpcError) -> None:
    code = err.code().name if err.code() is not None else "UNKNOWN"
    raise error_for_code(code, err.details() or code) from None


def _to_filter(filter: FilterLike) -> Optional[pb.Filter]:
    if filter is None:
        return None
    if not isinstance(filter, Filter):
        from memlm.index.filters import parse_filter

        filter = parse_filter(filter)
    return None if filter is None or filter.is_empty() else wire.filter_to_pb(filter)


def content_id(text: str, metadata: Mapping[str, Any]) -> str:
    """A stable id for a document that has none: a hash of its text and metadata (as LangChain's
    indexing API derives one), so ingesting the same loader output again replaces, not duplicates."""
    key = json.dumps({"text": text, "metadata": metadata}, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def _document_fields(doc: DocumentLike, position: int) -> tuple[str, str, Mapping[str, Any]]:
    """Accept dicts `{id, text, metadata}` and objects such as LangChain (`id`, `page_content`) or
    LlamaIndex (`id_`, `text`) documents. No id at all (None or absent) means `content_id()`; an
    empty one is an error."""
    if isinstance(doc, Mapping):
        get = doc.get
    else:
        def get(name, default=None):
            return getattr(doc, name, default)
    doc_id = next((v for v in (get("id"), get("id_"), get("doc_id")) if v is not None), None)
    text = get("text")
    if text is None:
        text = get("page_content")
    if not isinstance(text, str):
        raise InvalidArgument(f"document {position} ({doc_id!r}) has no text string (expected `text` or `page_content`)")
    metadata = dict(get("metadata") or {})
    if doc_id is None:
        doc_id = content_id(text, metadata)
    elif str(doc_id) == "":
        raise InvalidArgument(f"document {position} has an empty id; expected a non-empty string, or no id for a content hash")
    return str(doc_id), text, metadata


def _search_request(query, collection: str, k: int, filter: FilterLike, mode: Optional[str]) -> pb.SearchRequest:
    request = pb.SearchRequest(collection=collection, k=k, mode=mode or "")
    if isinstance(query, str):
        request.text = query
    else:
        request.vector.values.extend(np.asarray(query, dtype=np.float32).ravel().tolist())
    if (f := _to_filter(filter)) is not None:
        request.filter.CopyFrom(f)
    return request


# How the store's NotFound for Get names missing documents (index/memory_store.py), as against an
# unknown collection ("collection 'x' does not exist"): the wire has no field that tells them apart.


def _ids(ids: Union[str, Sequence[str]]) -> list[str]:
    return [ids] if isinstance(ids, str) else list(ids)


def _delete_request(ids: Union[None, str, Sequence[str]], collection: str, filter: FilterLike,
                    all: bool) -> pb.DeleteRequest:
    """A filter given but empty goes as a set, empty filter, which the server refuses (it would match
    every document): deleting everything takes `all`, so no empty dict can do it by mistake."""
    if ids is None and filter is None and not all:
        raise InvalidArgument("delete needs ids, a filter, or all=True (to delete every document)")
    request = pb.DeleteRequest(collection=collection, ids=_ids(ids) if ids is not None else [], all=all)
    if filter is not None:
        request.filter.SetInParent()
        if (f := _to_filter(filter)) is not None:
            request.filter.CopyFrom(f)
    return request


def _list_documents_request(collection: str, filter: FilterLike, after: Optional[str], limit: Optional[int],
                            with_text: bool) -> pb.ListDocumentsRequest:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise InvalidArgument(f"limit must be a positive integer (or None: the server's page size), got {limit!r}")
    request = pb.ListDocumentsRequest(collection=collection, after=after or "", limit=limit or 0, with_text=with_text)
    if (f := _to_filter(filter)) is not None:
        request.filter.CopyFrom(f)
    return request


def _document_page(reply: pb.ListDocumentsResponse) -> DocumentPage:
    return DocumentPage([wire.stored_from_pb(d) for d in reply.documents], reply.next_after or None)


def _create_collection_request(
    name: str, *, index_factory: Optional[str], embedding_model: Optional[str], chunk_tokens: Optional[int],
    chunk_overlap: Optional[int], memory: Union[None, Sequence[str], Mapping[str, Optional[Mapping[str, Any]]]],
    kv_memory: Optional[bool], if_not_exists: bool,
) -> pb.CreateCollectionRequest:
    given = dict(index_factory=index_factory, embedding_model=embedding_model, chunk_tokens=chunk_tokens,
                 chunk_overlap=chunk_overlap, kv_memory=kv_memory)
    request = pb.CreateCollectionRequest(
        name=name, if_not_exists=if_not_exists, **{k: v for k, v in given.items() if v is not None}
    )
    if memory is not None:
        modes = {m: None for m in memory} if not isinstance(memory, Mapping) else dict(memory)
        request.memory.extend(wire.memory_to_pb(modes))
    return request


def _generate_request(
    prompt: Optional[str], *, messages: Optional[Sequence[Mapping[str, str]]], collection: str, memory: str, k: int,
    filter: FilterLike, max_new_tokens: int, temperature: Optional[float], top_p: Optional[float],
    seed: Optional[int], stop: Sequence[str], search_mode: Optional[str],
) -> pb.GenerateRequest:
    mode = wire.memory_mode_to_pb(memory)  # InvalidArgument for a name the wire does not know
    if mode not in (pb.MEMORY_MODE_NONE, pb.MEMORY_MODE_UNSPECIFIED) and not collection:
        raise InvalidArgument(f"memory={memory!r} reads a collection: pass collection=...")
    request = pb.GenerateRequest(
        collection=collection, memory=mode, k=k, max_new_tokens=max_new_tokens,
        stop=list(stop), search_mode=search_mode or "",
    )
    if (prompt is None) == (messages is None):
        raise InvalidArgument("pass exactly one of prompt or messages")
    if prompt is not None:
        request.prompt = prompt
    else:
        request.messages.messages.extend(pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages)
    if temperature is not None:
        request.temperature = temperature
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    if (f := _to_filter(filter)) is not None:
        request.filter.CopyFrom(f)
    return request


def _generation_event(msg: pb.GenerateResponse) -> Union[str, GenerationResult]:
    """One streamed message: a text delta, or the final result."""
    if msg.WhichOneof("event") == "delta":
        return msg.delta
    return wire.done_from_pb(msg.done)


class _IngestRun:
    """What `ingest` does around its calls, for the blocking and the async client alike: batches
    of requests in, replies and progress out, and the message of a failed batch."""

    def __init__(self, docs: Iterable[DocumentLike], *, collection: str, batch_size: int, skip_invalid: bool,
                 progress: Union[bool, Callable[[int], None]], total: Optional[int],
                 before_batch: Optional[Callable[[int, int], None]]):
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be at least 1, got {batch_size}")
        self.collection, self.batch_size, self.skip_invalid = collection, batch_size, skip_invalid
        self.progress, self.before_batch = progress, before_batch
        self.bar = None
        if progress is True:
            from tqdm import tqdm

            if total is None and isinstance(docs, Sequence):
                total = len(docs)
            self.bar = tqdm(total=total, unit="doc", desc=f"ingest {collection}")
        self.docs = iter(docs)
        self.start = 0  # documents answered so far
        self.size = 0  # documents in the batch in flight
        self.results: list[DocumentResult] = []

    def requests(self) -> Iterator[pb.IngestRequest]:
        """One IngestRequest per batch; the next is made after `answered()` took the last reply."""
        while batch := list(itertools.islice(self.docs, self.batch_size)):
            msgs = []
            for i, doc in enumerate(batch):
                doc_id, text, metadata = _document_fields(doc, self.start + i)
                msgs.append(pb.Document(id=doc_id, text=text, metadata=wire.dict_to_struct(metadata)))
            self.size = len(batch)
            if self.before_batch is not None:
                self.before_batch(self.start, self.size)
            yield pb.IngestRequest(collection=self.collection, documents=msgs, skip_invalid=self.skip_invalid)

    def failed(self, exc: BaseException) -> None:
        """Name the failed batch in `exc` and say what was stored before it."""
        if self.start:
            exc.args = (f"{exc} (documents {self.start}..{self.start + self.size - 1}; the {self.start} before are stored)",)

    def answered(self, reply: pb.IngestResponse) -> None:
        self.results.extend(wire.result_from_pb(r) for r in reply.results)
        self.start += self.size
        if self.bar is not None:
            self.bar.update(self.size)
        elif callable(self.progress):
            self.progress(self.start)

    def close(self) -> IngestReport:
        if self.bar is not None:
            self.bar.close()
        return IngestReport(results=self.results)


@dataclass(frozen=True)
class DocumentHit:
    """A whole document found by `search_documents`: its stored text and metadata, the score of its
    best chunk, and the chunks of it that the search returned (best first)."""

    id: str
    text: str
    metadata: dict[str, Any]
    score: float
    chunks: tuple[SearchHit, ...]


# search_documents asks for more chunks while several of one document fill the k: at most this
# many times k, and never past the server's max_k (the first refusal ends the growing).
_DOCUMENT_FETCH_GROWTH = 4
_DOCUMENT_FETCH_MAX_FACTOR = 16


def _by_document(hits: Sequence[SearchHit]) -> dict[str, list[SearchHit]]:
    """Hits grouped by document, documents in the order of their best hit (hits come best first)."""
    groups: dict[str, list[SearchHit]] = {}
    for h in hits:
        groups.setdefault(h.doc_id, []).append(h)
    return groups


def _wants_more(groups: Mapping[str, list], hits: Sequence[SearchHit], fetch: int, k: int) -> Optional[int]:
    """The next, larger number of chunks to ask for, or None when these hits settle the k documents."""
    if len(groups) >= k or len(hits) < fetch or fetch >= k * _DOCUMENT_FETCH_MAX_FACTOR:
        return None
    return min(fetch * _DOCUMENT_FETCH_GROWTH, k * _DOCUMENT_FETCH_MAX_FACTOR)


def _document_hits(groups: Mapping[str, list[SearchHit]], stored: Sequence[StoredDocument], k: int) -> list[DocumentHit]:
    found = {d.id: d for d in stored}  # a document deleted since the search is left out
    return [
        DocumentHit(id=doc_id, text=found[doc_id].text, metadata=dict(found[doc_id].metadata), score=hits[0].score,
                    chunks=tuple(hits))
        for doc_id, hits in list(groups.items())[:k] if doc_id in found
    ]


class GenerationStream:
    """Iterates the generated text piece by piece; `.result` then holds the citations, token
    counts and timings. Reading `.result` early drains the rest of the stream."""

    def __init__(self, call):
        self._call = call
        self._result: Optional[GenerationResult] = None
        self._pieces = self._iterate()

    def _iterate(self) -> Iterator[str]:
        try:
            for msg in self._call:
                event = _generation_event(msg)
                if isinstance(event, str):
                    yield event
                else:
                    self._result = event
        except grpc.RpcError as err:
            _raise_from(err)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def done(self) -> bool:
        """True once the final result has arrived."""
        return self._result is not None

    @property
    def result(self) -> GenerationResult:
        for _ in self._pieces:
            pass
        if self._result is None:
            raise RuntimeError("the stream ended without a final result (it was cancelled)")
        return self._result

    @property
    def text(self) -> str:
        return self.result.text

    def cancel(self) -> None:
        """Stop generation on the server."""
        self._call.cancel()


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
    ]


def _credentials(tls: bool, root_certificates: Optional[bytes]) -> Optional[grpc.ChannelCredentials]:
    return grpc.ssl_channel_credentials(root_certificates=root_certificates) if tls or root_certificates else None


def _auth_metadata(api_key: Optional[str]) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        api_key: Optional[str] = None,
        timeout: float = 60.0,
        tls: bool = False,
        root_certificates: Optional[bytes] = None,
        max_message_bytes: int = 64 * 1024 * 1024,
    ):
        opts = _channel_options(max_message_bytes)
        creds = _credentials(tls, root_certificates)
        if creds is not None:
            self._channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(address, options=opts)
        # What `aio` needs to open the same connection over grpc.aio.
        self._settings = dict(address=address, api_key=api_key, timeout=timeout, tls=tls,
                              root_certificates=root_certificates, max_message_bytes=max_message_bytes)
        self._aio = None  # the AsyncClient of `aio`, made on first use
        self.address = address
        self.timeout = timeout
        self._metadata = _auth_metadata(api_key)
        self._memory = pb_grpc.MemoryStub(self._channel)
        self._generation = pb_grpc.GenerationStub(self._channel)

    # --- plumbing ---

    def _call(self, method, request, timeout: Optional[float]):
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:
            _raise_from(err)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the server accepts connections (raises Unavailable after `timeout`)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise error_for_code("UNAVAILABLE", f"no memlm server at {self.address} after {timeout} s") from None

    @property
    def aio(self) -> "AsyncClient":
        """An `AsyncClient` to the same server with the same key, deadline and TLS settings, for
        asyncio code that holds this client (the LangChain and LlamaIndex adapters' async calls).
        Its grpc.aio channel belongs to the event loop that first uses it; another loop (a second
        asyncio.run) gets a channel of its own."""
        if self._aio is None:
            from memlm.async_client import AsyncClient

            self._aio = AsyncClient(**self._settings)
        return self._aio

    async def aclose(self) -> None:
        """Close the async channel this event loop made (the blocking one stays open: `close()`)."""
        if self._aio is not None:
            await self._aio.close()

    def close(self) -> None:
        self._aio = None  # an async channel's loop closes it; it cannot be awaited from here
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- collections ---

    def create_collection(
        self,
        name: str,
        *,
        index_factory: Optional[str] = None,
        embedding_model: Optional[str] = None,
        chunk_tokens: Optional[int] = None,
        chunk_overlap: Optional[int] = None,
        memory: Union[None, Sequence[str], Mapping[str, Optional[Mapping[str, Any]]]] = None,
        kv_memory: Optional[bool] = None,
        if_not_exists: bool = False,
        timeout: Optional[float] = None,
    ) -> CollectionConfig:
        """Create a collection; a setting left None takes the server's default. If it exists:
        AlreadyExists, or with `if_not_exists` the existing one, provided it agrees with every
        setting given here (AlreadyExists names those that differ).
        memory: the memory modes to derive memory for, as names (["knn"]) or {mode: options}
        ({"knn": {"window": 512}}; `memlm modes` lists them); kv_memory=True means ["knn"]."""
        request = _create_collection_request(
            name, index_factory=index_factory, embedding_model=embedding_model, chunk_tokens=chunk_tokens,
            chunk_overlap=chunk_overlap, memory=memory, kv_memory=kv_memory, if_not_exists=if_not_exists,
        )
        reply = self._call(self._memory.CreateCollection, request, timeout)
        return wire.config_from_pb(reply.config)

    def list_collections(self, *, timeout: Optional[float] = None) -> list[CollectionConfig]:
        reply = self._call(self._memory.ListCollections, pb.ListCollectionsRequest(), timeout)
        return [wire.config_from_pb(c) for c in reply.collections]

    def describe_collection(self, name: str, *, timeout: Optional[float] = None) -> CollectionStats:
        reply = self._call(self._memory.DescribeCollection, pb.DescribeCollectionRequest(collection=name), timeout)
        return wire.stats_from_pb(reply)

    def drop_collection(self, name: str, *, timeout: Optional[float] = None) -> None:
        self._call(self._memory.DropCollection, pb.DropCollectionRequest(collection=name), timeout)

    def reindex_collection(
        self, name: str, index_factory: str = "", *, timeout: Optional[float] = None
    ) -> CollectionConfig:
        """Rebuild the collection's index from its stored vectors, with `index_factory` ("" keeps
        its own): repairs an unavailable collection (`describe_collection(name).problem`)."""
        request = pb.ReindexCollectionRequest(collection=name, index_factory=index_factory)
        return wire.config_from_pb(self._call(self._memory.ReindexCollection, request, timeout).config)

    def stats(self, collection: str = "", *, timeout: Optional[float] = None) -> pb.StatsResponse:
        return self._call(self._memory.Stats, pb.StatsRequest(collection=collection), timeout)

    # --- documents ---

    def ingest(
        self,
        docs: Iterable[DocumentLike],
        *,
        collection: str,
        batch_size: int = 64,
        skip_invalid: bool = False,
        progress: Union[bool, Callable[[int], None]] = False,
        total: Optional[int] = None,
        before_batch: Optional[Callable[[int, int], None]] = None,
        timeout: Optional[float] = None,
    ) -> IngestReport:
        """Upsert documents in batches of `batch_size`, one atomic Ingest call per batch.

        When this returns, every document reported "created"/"replaced" is durable. If a batch
        fails, earlier batches stay stored; the exception says which batch failed.
        `progress=True` shows a progress bar; a callable gets the count of documents done.
        `before_batch(first, size)` is called as each batch is sent (the server then embeds and
        stores it, and builds the derived memory of a collection with any (knn's KV memory), before it answers).
        A document without an id (a LangChain loader's or splitter's, say) gets `content_id()`.
        """
        run = _IngestRun(docs, collection=collection, batch_size=batch_size, skip_invalid=skip_invalid,
                         progress=progress, total=total, before_batch=before_batch)
        try:
            for request in run.requests():
                try:
                    reply = self._call(self._memory.Ingest, iter([request]), timeout)
                except Exception as exc:
                    run.failed(exc)
                    raise
                run.answered(reply)
        finally:
            report = run.close()
        return report

    def search(
        self,
        query: Union[str, Sequence[float], np.ndarray],
        *,
        collection: str,
        k: int = 10,
        filter: FilterLike = None,
        mode: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> list[SearchHit]:
        """Text (embedded by the server) or vector query. `filter`: `{"lang": "en", "tag": ["a", "b"]}`
        (equality; a list means any of) or the explicit `{"must": [...], "should": [...], "must_not": [...]}`.
        `mode`: "dense", "lexical" (BM25) or "hybrid"; None = the server's default (a vector: dense)."""
        reply = self._call(self._memory.Search, _search_request(query, collection, k, filter, mode), timeout)
        return [wire.hit_from_pb(h) for h in reply.hits]

    def search_documents(
        self,
        query: Union[str, Sequence[float], np.ndarray],
        *,
        collection: str,
        k: int = 10,
        filter: FilterLike = None,
        mode: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> list[DocumentHit]:
        """The k best documents, whole: `search` ranks chunks, this ranks each document by its best
        chunk and returns its stored text (what the LangChain and LlamaIndex vector stores hand
        back). When several chunks of one document fill the k, it asks for more chunks (up to 16 k,
        and no more than the server's max_k); a document deleted meanwhile is left out."""
        fetch = k
        hits = self.search(query, collection=collection, k=fetch, filter=filter, mode=mode, timeout=timeout)
        groups = _by_document(hits)
        while (more := _wants_more(groups, hits, fetch, k)) is not None:
            try:
                hits = self.search(query, collection=collection, k=more, filter=filter, mode=mode, timeout=timeout)
            except InvalidArgument:  # past the server's max_k: the chunks so far must do
                break
            fetch, groups = more, _by_document(hits)
        stored = self.get(list(groups)[:k], collection=collection, missing_ok=True, timeout=timeout) if groups else []
        return _document_hits(groups, stored, k)

    async def asearch(
        self,
        query: Union[str, Sequence[float], np.ndarray],
        *,
        collection: str,
        k: int = 10,
        filter: FilterLike = None,
        mode: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> list[SearchHit]:
        """`search` for asyncio code: `self.aio.search`, the same request over a grpc.aio channel,
        so the event loop keeps running while the server searches (no thread is held)."""
        return await self.aio.search(query, collection=collection, k=k, filter=filter, mode=mode, timeout=timeout)

    def get(
        self, ids: Union[str, Sequence[str]], *, collection: str, missing_ok: bool = False,
        timeout: Optional[float] = None,
    ) -> list[StoredDocument]:
        """Documents by id, in the order asked. An id not stored: NotFound naming it, or with
        `missing_ok` it is left out of the answer (the server skips it: one call either way)."""
        request = pb.GetRequest(collection=collection, ids=_ids(ids), missing_ok=missing_ok)
        return [wire.stored_from_pb(d) for d in self._call(self._memory.Get, request, timeout).documents]

    def list_documents(
        self, *, collection: str, filter: FilterLike = None, with_text: bool = True, page_size: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> Iterator[StoredDocument]:
        """Every document (or every one whose metadata matches `filter`, as in `search`), in id
        order, read a page at a time as the iterator is consumed (`page_size` per ListDocuments
        call; None: the server's, 100). Each page is one consistent snapshot; a write between pages
        shows in the pages after it. `with_text=False`: ids, metadata and chunk ids only (text "")."""
        after = None
        while True:
            page = self.list_documents_page(collection=collection, filter=filter, after=after, limit=page_size,
                                            with_text=with_text, timeout=timeout)
            yield from page.documents
            if page.next_after is None:
                return
            after = page.next_after

    def list_documents_page(
        self, *, collection: str, filter: FilterLike = None, after: Optional[str] = None, limit: Optional[int] = None,
        with_text: bool = True, timeout: Optional[float] = None,
    ) -> DocumentPage:
        """One ListDocuments call: up to `limit` documents (None: the server's page size, 100) with
        ids after `after` (None: from the first), in id order, and `next_after`, the `after` of the
        next page (None: this is the last)."""
        request = _list_documents_request(collection, filter, after, limit, with_text)
        return _document_page(self._call(self._memory.ListDocuments, request, timeout))

    def delete(
        self, ids: Union[None, str, Sequence[str]] = None, *, collection: str, filter: FilterLike = None,
        all: bool = False, timeout: Optional[float] = None,
    ) -> list[str]:
        """Delete documents by id, by metadata filter (`{"source": "a.pdf"}`, as in `search`; with ids
        too: those of the ids that match), or every one of the collection with `all=True` (the
        collection and its settings stay); returns the ids that existed and are now gone. One
        durable transaction on the server: all of them go, or (an error) none. An empty filter is
        refused (InvalidArgument) rather than deleting everything."""
        reply = self._call(self._memory.Delete, _delete_request(ids, collection, filter, all), timeout)
        return list(reply.deleted)

    # --- what a model host in another process reads (memlm.remote_store.RemoteStore) ---

    def read_chunks(self, chunk_ids: Sequence[int], *, collection: str, missing_ok: bool = False,
                    timeout: Optional[float] = None) -> list[pb.StoredChunk]:
        request = pb.ReadChunksRequest(collection=collection, chunk_ids=list(chunk_ids), missing_ok=missing_ok)
        return list(self._call(self._memory.ReadChunks, request, timeout).chunks)

    def following_chunks(self, chunk_id: int, n: int, *, collection: str, timeout: Optional[float] = None) -> list[int]:
        request = pb.FollowingChunksRequest(collection=collection, chunk_id=chunk_id, n=n)
        return list(self._call(self._memory.FollowingChunks, request, timeout).chunk_ids)

    def chunk_ids_page(self, *, collection: str, after: Optional[int] = None, limit: int = 0,
                       timeout: Optional[float] = None) -> np.ndarray:
        request = pb.ListChunkIdsRequest(collection=collection, after_chunk_id=after or 0, after_set=after is not None,
                                         limit=limit)
        return np.array(self._call(self._memory.ListChunkIds, request, timeout).chunk_ids, dtype=np.int64)

    def read_changes(self, *, collection: str, after_seq: int, upto_seq: int = 0, limit: int = 0,
                     timeout: Optional[float] = None) -> pb.ReadChangesResponse:
        request = pb.ReadChangesRequest(collection=collection, after_seq=after_seq, upto_seq=upto_seq, limit=limit)
        return self._call(self._memory.ReadChanges, request, timeout)

    def set_watermark(self, collection: str, mode: str, seq: int, *, timeout: Optional[float] = None) -> None:
        self._call(self._memory.SetWatermark, pb.SetWatermarkRequest(collection=collection, mode=mode, seq=seq), timeout)

    # --- generation ---

    def generate(
        self,
        prompt: Optional[str] = None,
        *,
        messages: Optional[Sequence[Mapping[str, str]]] = None,
        collection: str = "",
        memory: str = "rag",
        k: int = 0,
        filter: FilterLike = None,
        max_new_tokens: int = 0,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: Sequence[str] = (),
        search_mode: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> GenerationStream:
        """Stream a completion. `memory="rag"` needs a collection; `memory="none"` does not.
        0 for `k` / `max_new_tokens` means the server's default. `search_mode`: how rag and
        chunk-gated knn search the collection ("dense", "lexical", "hybrid"; None: the server's)."""
        request = _generate_request(
            prompt, messages=messages, collection=collection, memory=memory, k=k, filter=filter,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
            search_mode=search_mode,
        )
        call = self._generation.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return GenerationStream(call)

    def model_info(self, *, timeout: Optional[float] = None) -> pb.ModelInfoResponse:
        return self._call(self._generation.ModelInfo, pb.ModelInfoRequest(), timeout)
