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
"""
from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import grpc
import numpy as np

from memlm import wire
from memlm.engine import GenerationResult
from memlm.errors import InvalidArgument, error_for_code
from memlm.index.types import CollectionConfig, CollectionStats, DocumentResult, Filter, SearchHit, StoredDocument
from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc

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
                if msg.WhichOneof("event") == "delta":
                    yield msg.delta
                else:
                    self._result = wire.done_from_pb(msg.done)
        except grpc.RpcError as err:
            _raise_from(err)

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

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
        opts = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        creds = grpc.ssl_channel_credentials(root_certificates=root_certificates) if tls or root_certificates else None
        if creds is not None:
            self._channel = grpc.secure_channel(address, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(address, options=opts)
        self._channel_args = (address, creds, opts)
        self._aio: Optional[tuple[asyncio.AbstractEventLoop, Any, pb_grpc.MemoryStub]] = None  # (loop, channel, stub)
        self.address = address
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
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

    def _aio_memory(self) -> pb_grpc.MemoryStub:
        """The Memory stub over a grpc.aio channel of the running event loop, for the async calls.
        Made on first use; a channel belongs to one loop, so another loop (a second asyncio.run)
        gets a channel of its own."""
        loop = asyncio.get_running_loop()
        if self._aio is None or self._aio[0] is not loop:
            address, creds, opts = self._channel_args
            if creds is not None:
                channel = grpc.aio.secure_channel(address, creds, options=opts)
            else:
                channel = grpc.aio.insecure_channel(address, options=opts)
            self._aio = (loop, channel, pb_grpc.MemoryStub(channel))
        return self._aio[2]

    async def aclose(self) -> None:
        """Close the async channel this event loop made (the blocking one stays open: `close()`)."""
        if self._aio is not None and self._aio[0] is asyncio.get_running_loop():
            await self._aio[1].close()
        self._aio = None

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
        given = dict(index_factory=index_factory, embedding_model=embedding_model, chunk_tokens=chunk_tokens,
                     chunk_overlap=chunk_overlap, kv_memory=kv_memory)
        request = pb.CreateCollectionRequest(
            name=name, if_not_exists=if_not_exists, **{k: v for k, v in given.items() if v is not None}
        )
        if memory is not None:
            modes = {m: None for m in memory} if not isinstance(memory, Mapping) else dict(memory)
            request.memory.extend(wire.memory_to_pb(modes))
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
        if batch_size < 1:
            raise InvalidArgument(f"batch_size must be at least 1, got {batch_size}")
        bar = None
        if progress is True:
            from tqdm import tqdm

            if total is None and isinstance(docs, Sequence):
                total = len(docs)
            bar = tqdm(total=total, unit="doc", desc=f"ingest {collection}")
        results: list[DocumentResult] = []
        it = iter(docs)
        start = 0
        try:
            while batch := list(itertools.islice(it, batch_size)):
                msgs = []
                for i, doc in enumerate(batch):
                    doc_id, text, metadata = _document_fields(doc, start + i)
                    msgs.append(pb.Document(id=doc_id, text=text, metadata=wire.dict_to_struct(metadata)))
                request = pb.IngestRequest(collection=collection, documents=msgs, skip_invalid=skip_invalid)
                if before_batch is not None:
                    before_batch(start, len(batch))
                try:
                    reply = self._call(self._memory.Ingest, iter([request]), timeout)
                except Exception as exc:
                    if start:
                        exc.args = (f"{exc} (documents {start}..{start + len(batch) - 1}; the {start} before are stored)",)
                    raise
                results.extend(wire.result_from_pb(r) for r in reply.results)
                start += len(batch)
                if bar is not None:
                    bar.update(len(batch))
                elif callable(progress):
                    progress(start)
        finally:
            if bar is not None:
                bar.close()
        return IngestReport(results=results)

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
        """`search` for asyncio code: the same request over a grpc.aio channel, so the event
        loop keeps running while the server searches (no thread is held)."""
        request = _search_request(query, collection, k, filter, mode)
        try:
            reply = await self._aio_memory().Search(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:  # grpc.aio.AioRpcError is one
            _raise_from(err)
        return [wire.hit_from_pb(h) for h in reply.hits]

    def get(self, ids: Union[str, Sequence[str]], *, collection: str, timeout: Optional[float] = None) -> list[StoredDocument]:
        ids = [ids] if isinstance(ids, str) else list(ids)
        reply = self._call(self._memory.Get, pb.GetRequest(collection=collection, ids=ids), timeout)
        return [wire.stored_from_pb(d) for d in reply.documents]

    def delete(self, ids: Union[str, Sequence[str]], *, collection: str, timeout: Optional[float] = None) -> list[str]:
        """Delete documents; returns the ids that existed and are now gone."""
        ids = [ids] if isinstance(ids, str) else list(ids)
        reply = self._call(self._memory.Delete, pb.DeleteRequest(collection=collection, ids=ids), timeout)
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
        call = self._generation.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return GenerationStream(call)

    def model_info(self, *, timeout: Optional[float] = None) -> pb.ModelInfoResponse:
        return self._call(self._generation.ModelInfo, pb.ModelInfoRequest(), timeout)
