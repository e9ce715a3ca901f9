"""The asyncio client: `memlm.AsyncClient(address)`, the calls of `memlm.Client` over grpc.aio.

    async with memlm.AsyncClient("127.0.0.1:50051") as client:
        await client.create_collection("docs", if_not_exists=True)
        await client.ingest([{"id": "a", "text": "...", "metadata": {"lang": "en"}}], collection="docs")
        hits = await client.search("question", collection="docs", k=5, filter={"lang": "en"})
        stream = client.generate("question", collection="docs", memory="rag")
        async for piece in stream:
            print(piece, end="")
        print((await stream.result()).citations)

Requests are built and replies read by the same functions as the blocking client's
(memlm/client.py), so the two cannot drift apart. No call holds a thread: the event loop runs on
while the server works. A grpc.aio channel belongs to one event loop, so the channel is opened
on first use inside the running loop, and a later loop (a second `asyncio.run`) gets one of its
own. Errors are the same `memlm.errors` exceptions as the blocking client's.
"""
from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable, Iterable, Mapping, Optional, Sequence, Union

import grpc
import grpc.aio
import numpy as np

from memlm import wire
from memlm.client import (
    DEFAULT_ADDRESS, DocumentHit, DocumentLike, FilterLike, IngestReport, _auth_metadata,
    _by_document, _channel_options, _create_collection_request, _credentials, _delete_request, _document_hits,
    _document_page, _generate_request, _generation_event, _ids, _IngestRun, _list_documents_request, _raise_from,
    _search_request, _wants_more,
)
from memlm.engine import GenerationResult
from memlm.errors import InvalidArgument
from memlm.index.types import CollectionConfig, CollectionStats, DocumentPage, SearchHit, StoredDocument
from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc


class AsyncGenerationStream:
    """`async for piece in stream` yields the generated text piece by piece; `await stream.result()`
    then gives the citations, token counts and timings (called early, it drains the rest).
    `stream.cancel()` stops generation on the server; so does leaving an `async with stream:`
    block early or cancelling the task that iterates."""

    def __init__(self, call: grpc.aio.UnaryStreamCall):
        self._call = call
        self._messages = call.__aiter__()
        self._result: Optional[GenerationResult] = None
        self._cancelled = False
        self._finished = False

    def __aiter__(self) -> "AsyncGenerationStream":
        return self

    async def __anext__(self) -> str:
        while not self._finished:
            try:
                msg = await self._messages.__anext__()
            except StopAsyncIteration:
                self._finished = True
                break
            except asyncio.CancelledError:
                if not self._cancelled:  # the task itself was cancelled: stop the server too
                    self._call.cancel()
                    raise
                self._finished = True  # our own cancel(): the stream just ends
                break
            except grpc.RpcError as err:
                self._finished = True
                if self._cancelled and err.code() == grpc.StatusCode.CANCELLED:
                    break
                _raise_from(err)
            event = _generation_event(msg)
            if isinstance(event, str):
                return event
            self._result = event
        raise StopAsyncIteration

    @property
    def done(self) -> bool:
        """True once the final result has arrived."""
        return self._result is not None

    async def result(self) -> GenerationResult:
        async for _ in self:
            pass
        if self._result is None:
            raise RuntimeError("the stream ended without a final result (it was cancelled)")
        return self._result

    async def text(self) -> str:
        return (await self.result()).text

    def cancel(self) -> None:
        """Stop generation on the server; iterating afterwards ends the stream."""
        if not self._finished:
            self._cancelled = True
            self._call.cancel()

    async def __aenter__(self) -> "AsyncGenerationStream":
        return self

    async def __aexit__(self, *exc) -> None:
        if self._result is None:
            self.cancel()


class AsyncClient:
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
        self.address = address
        self.timeout = timeout
        self._options = _channel_options(max_message_bytes)
        self._creds = _credentials(tls, root_certificates)
        self._metadata = _auth_metadata(api_key)
        # (loop, channel, Memory stub, Generation stub) of the loop that opened the channel.
        self._bound: Optional[tuple[asyncio.AbstractEventLoop, grpc.aio.Channel, pb_grpc.MemoryStub,
                                    pb_grpc.GenerationStub]] = None

    # --- plumbing ---

    def _stubs(self) -> tuple[pb_grpc.MemoryStub, pb_grpc.GenerationStub]:
        loop = asyncio.get_running_loop()  # RuntimeError outside a coroutine: these calls need a loop
        if self._bound is None or self._bound[0] is not loop:
            # A channel of a loop that has ended cannot be closed from this one; it went with its loop.
            if self._creds is not None:
                channel = grpc.aio.secure_channel(self.address, self._creds, options=self._options)
            else:
                channel = grpc.aio.insecure_channel(self.address, options=self._options)
            self._bound = (loop, channel, pb_grpc.MemoryStub(channel), pb_grpc.GenerationStub(channel))
        return self._bound[2], self._bound[3]

    @property
    def _memory(self) -> pb_grpc.MemoryStub:
        return self._stubs()[0]

    async def _call(self, method, request, timeout: Optional[float]):
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as err:  # grpc.aio.AioRpcError is one
            _raise_from(err)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        """Wait until the server accepts connections (raises Unavailable after `timeout`)."""
        self._stubs()
        try:
            await asyncio.wait_for(self._bound[1].channel_ready(), timeout)
        except asyncio.TimeoutError:
            from memlm.errors import error_for_code

            raise error_for_code("UNAVAILABLE", f"no memlm server at {self.address} after {timeout} s") from None

    async def close(self) -> None:
        """Close the channel if this event loop opened it (a later call opens a new one)."""
        if self._bound is not None:
            loop, channel = self._bound[0], self._bound[1]
            self._bound = None
            if loop is asyncio.get_running_loop():
                await channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    # --- collections ---

    async def create_collection(
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
        """`Client.create_collection`."""
        request = _create_collection_request(
            name, index_factory=index_factory, embedding_model=embedding_model, chunk_tokens=chunk_tokens,
            chunk_overlap=chunk_overlap, memory=memory, kv_memory=kv_memory, if_not_exists=if_not_exists,
        )
        reply = await self._call(self._memory.CreateCollection, request, timeout)
        return wire.config_from_pb(reply.config)

    async def list_collections(self, *, timeout: Optional[float] = None) -> list[CollectionConfig]:
        reply = await self._call(self._memory.ListCollections, pb.ListCollectionsRequest(), timeout)
        return [wire.config_from_pb(c) for c in reply.collections]

    async def describe_collection(self, name: str, *, timeout: Optional[float] = None) -> CollectionStats:
        reply = await self._call(self._memory.DescribeCollection, pb.DescribeCollectionRequest(collection=name), timeout)
        return wire.stats_from_pb(reply)

    async def drop_collection(self, name: str, *, timeout: Optional[float] = None) -> None:
        await self._call(self._memory.DropCollection, pb.DropCollectionRequest(collection=name), timeout)

    async def reindex_collection(
        self, name: str, index_factory: str = "", *, timeout: Optional[float] = None
    ) -> CollectionConfig:
        """`Client.reindex_collection`."""
        request = pb.ReindexCollectionRequest(collection=name, index_factory=index_factory)
        return wire.config_from_pb((await self._call(self._memory.ReindexCollection, request, timeout)).config)

    async def stats(self, collection: str = "", *, timeout: Optional[float] = None) -> pb.StatsResponse:
        return await self._call(self._memory.Stats, pb.StatsRequest(collection=collection), timeout)

    # --- documents ---

    async def ingest(
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
        """`Client.ingest`: upsert in batches, one atomic Ingest call per batch, durable on return."""
        run = _IngestRun(docs, collection=collection, batch_size=batch_size, skip_invalid=skip_invalid,
                         progress=progress, total=total, before_batch=before_batch)
        try:
            for request in run.requests():
                try:
                    reply = await self._call(self._memory.Ingest, iter([request]), timeout)
                except Exception as exc:
                    run.failed(exc)
                    raise
                run.answered(reply)
        finally:
            report = run.close()
        return report

    async def search(
        self,
        query: Union[str, Sequence[float], np.ndarray],
        *,
        collection: str,
        k: int = 10,
        filter: FilterLike = None,
        mode: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> list[SearchHit]:
        """`Client.search`: ranked chunks for a text or vector query."""
        reply = await self._call(self._memory.Search, _search_request(query, collection, k, filter, mode), timeout)
        return [wire.hit_from_pb(h) for h in reply.hits]

    async def search_documents(
        self,
        query: Union[str, Sequence[float], np.ndarray],
        *,
        collection: str,
        k: int = 10,
        filter: FilterLike = None,
        mode: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> list[DocumentHit]:
        """`Client.search_documents`: the k best documents, whole, each scored by its best chunk."""
        fetch = k
        hits = await self.search(query, collection=collection, k=fetch, filter=filter, mode=mode, timeout=timeout)
        groups = _by_document(hits)
        while (more := _wants_more(groups, hits, fetch, k)) is not None:
            try:
                hits = await self.search(query, collection=collection, k=more, filter=filter, mode=mode, timeout=timeout)
            except InvalidArgument:  # past the server's max_k: the chunks so far must do
                break
            fetch, groups = more, _by_document(hits)
        stored = await self.get(list(groups)[:k], collection=collection, missing_ok=True, timeout=timeout) if groups else []
        return _document_hits(groups, stored, k)

    async def get(
        self, ids: Union[str, Sequence[str]], *, collection: str, missing_ok: bool = False,
        timeout: Optional[float] = None,
    ) -> list[StoredDocument]:
        """`Client.get`: documents in the order asked; `missing_ok` leaves out ids not stored."""
        request = pb.GetRequest(collection=collection, ids=_ids(ids), missing_ok=missing_ok)
        return [wire.stored_from_pb(d) for d in (await self._call(self._memory.Get, request, timeout)).documents]

    async def list_documents(
        self, *, collection: str, filter: FilterLike = None, with_text: bool = True, page_size: Optional[int] = None,
        timeout: Optional[float] = None,
    ) -> AsyncIterator[StoredDocument]:
        """`Client.list_documents`: `async for doc in client.list_documents(collection=...)`, a page
        per ListDocuments call as the loop asks for more."""
        after = None
        while True:
            page = await self.list_documents_page(collection=collection, filter=filter, after=after, limit=page_size,
                                                  with_text=with_text, timeout=timeout)
            for doc in page.documents:
                yield doc
            if page.next_after is None:
                return
            after = page.next_after

    async def list_documents_page(
        self, *, collection: str, filter: FilterLike = None, after: Optional[str] = None, limit: Optional[int] = None,
        with_text: bool = True, timeout: Optional[float] = None,
    ) -> DocumentPage:
        """`Client.list_documents_page`: one page, and the `after` of the next (None: the last)."""
        request = _list_documents_request(collection, filter, after, limit, with_text)
        return _document_page(await self._call(self._memory.ListDocuments, request, timeout))

    async def delete(
        self, ids: Union[None, str, Sequence[str]] = None, *, collection: str, filter: FilterLike = None,
        all: bool = False, timeout: Optional[float] = None,
    ) -> list[str]:
        """`Client.delete`: by id, by filter, or `all=True`; returns the ids that existed and are now gone."""
        reply = await self._call(self._memory.Delete, _delete_request(ids, collection, filter, all), timeout)
        return list(reply.deleted)

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
    ) -> AsyncGenerationStream:
        """`Client.generate`, streamed: a plain call (no await) that starts the RPC and returns the
        stream to `async for` over; it must be made inside the running event loop."""
        request = _generate_request(
            prompt, messages=messages, collection=collection, memory=memory, k=k, filter=filter,
            max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop,
            search_mode=search_mode,
        )
        generation = self._stubs()[1]
        return AsyncGenerationStream(generation.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata))

    async def model_info(self, *, timeout: Optional[float] = None) -> pb.ModelInfoResponse:
        return await self._call(self._stubs()[1].ModelInfo, pb.ModelInfoRequest(), timeout)
