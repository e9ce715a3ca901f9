"""`memlm.v1.Memory`: translates wire messages to `MemoryStore` calls and back, nothing more.

The store is blocking (LMDB, FAISS, the embedder), so every call runs in the server's thread pool;
the event loop stays free for other calls while an ingest embeds or a search scans.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import Executor
from typing import AsyncIterator, Callable

import grpc

from memlm import wire
from memlm.errors import InvalidArgument, ResourceExhausted
from memlm.index.types import Document, Filter
from memlm.services.rpc import unary
from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc


class MemoryServicer(pb_grpc.MemoryServicer):
    def __init__(self, store, executor: Executor, *, max_ingest_call_bytes: int, stats_extra: Callable[[], dict]):
        self._store = store
        self._executor = executor
        self._max_call_bytes = max_ingest_call_bytes
        self._stats_extra = stats_extra  # version, uptime and model info, from the server

    async def _run(self, fn, *args, **kwargs):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: fn(*args, **kwargs))

    @unary
    async def CreateCollection(self, request: pb.CreateCollectionRequest, context) -> pb.CreateCollectionResponse:
        settings = wire.collection_settings_from_pb(request)  # only the fields the request sets
        if request.if_not_exists:
            config, created = await self._run(self._store.ensure_collection, request.name, **settings)
        else:
            config, created = await self._run(self._store.create_collection, request.name, **settings), True
        return pb.CreateCollectionResponse(config=wire.config_to_pb(config), created=created)

    @unary
    async def ListCollections(self, request, context) -> pb.ListCollectionsResponse:
        configs = await self._run(self._store.list_collections)
        return pb.ListCollectionsResponse(collections=[wire.config_to_pb(c) for c in configs])

    @unary
    async def DescribeCollection(self, request: pb.DescribeCollectionRequest, context) -> pb.CollectionInfo:
        return wire.stats_to_pb(await self._run(self._store.describe, request.collection))

    @unary
    async def DropCollection(self, request: pb.DropCollectionRequest, context) -> pb.DropCollectionResponse:
        await self._run(self._store.drop, request.collection)
        return pb.DropCollectionResponse()

    @unary
    async def ReindexCollection(self, request: pb.ReindexCollectionRequest, context) -> pb.ReindexCollectionResponse:
        config = await self._run(self._store.reindex, request.collection, request.index_factory or None)
        return pb.ReindexCollectionResponse(config=wire.config_to_pb(config))

    @unary
    async def Ingest(self, request_iterator: AsyncIterator[pb.IngestRequest], context) -> pb.IngestResponse:
        started = time.perf_counter()
        collection, skip_invalid, docs, total_bytes = "", False, [], 0
        async for i, msg in _enumerate(request_iterator):
            if i == 0:
                if not msg.collection:
                    raise InvalidArgument("the first IngestRequest must name the collection")
                collection, skip_invalid = msg.collection, msg.skip_invalid
            elif msg.collection and msg.collection != collection:
                raise InvalidArgument(
                    f"one Ingest call writes one collection: message {i} names {msg.collection!r}, "
                    f"the first named {collection!r}"
                )
            for d in msg.documents:
                total_bytes += len(d.text.encode("utf-8"))
                if total_bytes > self._max_call_bytes:
                    raise ResourceExhausted(
                        f"Ingest call exceeds max_ingest_call_bytes={self._max_call_bytes}; "
                        "send the documents in several calls"
                    )
                docs.append(Document(id=d.id, text=d.text, metadata=wire.struct_to_dict(d.metadata)))
        if not collection:
            raise InvalidArgument("empty Ingest call: no message named a collection")
        results = await self._run(self._store.ingest, collection, docs, skip_invalid=skip_invalid)
        counts = {s: sum(r.status == s for r in results) for s in ("created", "replaced", "unchanged", "rejected")}
        return pb.IngestResponse(
            results=[wire.result_to_pb(r) for r in results],
            chunks=sum(r.chunks for r in results),
            took_ms=(time.perf_counter() - started) * 1e3,
            **counts,
        )

    @unary
    async def Search(self, request: pb.SearchRequest, context) -> pb.SearchResponse:
        started = time.perf_counter()
        which = request.WhichOneof("query")
        if which is None:
            raise InvalidArgument("SearchRequest needs a query: set text or vector")
        query = request.text if which == "text" else None
        vector = None
        if which == "vector":
            import numpy as np

            vector = np.asarray(request.vector.values, dtype=np.float32)
        hits = await self._run(
            self._store.search,
            request.collection,
            query=query,
            vector=vector,
            k=request.k,
            filter=wire.filter_from_pb(request.filter, request.HasField("filter")),
            mode=request.mode or None,
        )
        return pb.SearchResponse(
            hits=[wire.hit_to_pb(h) for h in hits], took_ms=(time.perf_counter() - started) * 1e3
        )

    @unary
    async def Get(self, request: pb.GetRequest, context) -> pb.GetResponse:
        docs = await self._run(self._store.get, request.collection, list(request.ids), request.missing_ok)
        return pb.GetResponse(documents=[wire.stored_to_pb(d) for d in docs])

    @unary
    async def ListDocuments(self, request: pb.ListDocumentsRequest, context) -> pb.ListDocumentsResponse:
        page = await self._run(
            self._store.list_documents, request.collection,
            filter=wire.filter_from_pb(request.filter, request.HasField("filter")),
            after=request.after or None, limit=request.limit or None, with_text=request.with_text,
        )
        return pb.ListDocumentsResponse(documents=[wire.stored_to_pb(d) for d in page.documents],
                                        next_after=page.next_after or "")

    @unary
    async def Delete(self, request: pb.DeleteRequest, context) -> pb.DeleteResponse:
        by_filter = request.HasField("filter")
        # A filter set but empty stays a filter, for the store to refuse: it would match every document.
        filter = (wire.filter_from_pb(request.filter) or Filter()) if by_filter else None
        # No ids on the wire is "no ids" when a filter or all says what to delete, else "these none".
        ids = list(request.ids) if request.ids or not (by_filter or request.all) else None
        deleted = await self._run(self._store.delete, request.collection, ids, filter=filter, all=request.all)
        gone = set(deleted)
        return pb.DeleteResponse(deleted=deleted, not_found=[i for i in request.ids if i not in gone])

    @unary
    async def Stats(self, request: pb.StatsRequest, context) -> pb.StatsResponse:
        if request.collection:
            infos = [await self._run(self._store.describe, request.collection)]
        else:
            names = [c.name for c in await self._run(self._store.list_collections)]
            infos = [await self._run(self._store.describe, n) for n in names]
        return pb.StatsResponse(collections=[wire.stats_to_pb(s) for s in infos], **self._stats_extra())


    # --- derived memory kept by a model host in another process --------------------------------

    @unary
    async def ReadChunks(self, request: pb.ReadChunksRequest, context) -> pb.ReadChunksResponse:
        ids = list(request.chunk_ids)
        if len(ids) > MAX_CHUNKS_PER_CALL:
            raise InvalidArgument(f"ReadChunks asked for {len(ids)} chunks; at most {MAX_CHUNKS_PER_CALL} per call")
        records = await self._run(self._store.read_chunks, request.collection, ids, missing_ok=request.missing_ok)
        return pb.ReadChunksResponse(chunks=[wire.stored_chunk_to_pb(cid, rec) for cid, rec in zip(ids, records)])

    @unary
    async def FollowingChunks(self, request: pb.FollowingChunksRequest, context) -> pb.FollowingChunksResponse:
        ids = await self._run(self._store.following_chunks, request.collection, request.chunk_id, request.n)
        return pb.FollowingChunksResponse(chunk_ids=ids)

    @unary
    async def ListChunkIds(self, request: pb.ListChunkIdsRequest, context) -> pb.ListChunkIdsResponse:
        limit = min(request.limit or MAX_CHUNK_IDS_PER_PAGE, MAX_CHUNK_IDS_PER_PAGE)
        after = request.after_chunk_id if request.after_set else None
        ids = await self._run(self._store.chunk_ids_page, request.collection, after, limit)
        return pb.ListChunkIdsResponse(chunk_ids=ids.tolist())

    @unary
    async def ReadChanges(self, request: pb.ReadChangesRequest, context) -> pb.ReadChangesResponse:
        last = await self._run(self._store.last_seq, request.collection)
        upto = min(request.upto_seq or last, last)
        reply = pb.ReadChangesResponse(last_seq=last)
        if request.limit == 0 or request.after_seq >= upto:
            return reply
        changes = await self._run(self._store.changes, request.collection, request.after_seq, upto)
        if changes is None:
            reply.truncated = True
            return reply
        reply.changes.extend(pb.Change(seq=seq, added=add, removed=rem) for seq, add, rem in changes[: request.limit])
        return reply

    @unary
    async def SetWatermark(self, request: pb.SetWatermarkRequest, context) -> pb.SetWatermarkResponse:
        if not request.mode:
            raise InvalidArgument("SetWatermark needs the memory mode whose watermark it is")
        await self._run(self._store.set_watermark, request.collection, request.mode, request.seq)
        return pb.SetWatermarkResponse()


async def _enumerate(iterator):
    i = 0
    async for item in iterator:
        yield i, item
        i += 1


MAX_CHUNKS_PER_CALL = 10_000  # ~64 tokens each: a few MB per reply
MAX_CHUNK_IDS_PER_PAGE = 100_000  # 8 bytes each
