"""memlm.AsyncClient against the session's real server: every call of the blocking client over
grpc.aio, the same errors, streamed generation with its result and cancellation, and a channel
per event loop."""
import asyncio
import concurrent.futures
import uuid

import pytest

pytestmark = pytest.mark.server

OCEAN = [
    "Tides are caused mainly by the gravity of the Moon pulling on the oceans.",
    "Waves are raised by wind blowing across the surface of the sea.",
    "Coral reefs grow in warm, shallow, clear sea water.",
    "Sea water is salty because rivers carry dissolved minerals into the ocean.",
]


class NoThreads(concurrent.futures.ThreadPoolExecutor):
    """An executor that refuses work: a call that hid a blocking call in a thread would fail."""

    def submit(self, fn, /, *args, **kwargs):
        raise RuntimeError("a thread was used")


async def test_collections_documents_and_search(server, client):
    import memlm
    from memlm.errors import AlreadyExists, InvalidArgument, NotFound

    asyncio.get_running_loop().set_default_executor(NoThreads())
    name = f"aio-{uuid.uuid4().hex[:12]}"
    async with memlm.AsyncClient(server.address, timeout=60) as aio:
        config = await aio.create_collection(name, chunk_tokens=32)
        assert config.name == name and config.chunk_tokens == 32
        assert (await aio.create_collection(name, if_not_exists=True)).created_at == config.created_at
        with pytest.raises(AlreadyExists):
            await aio.create_collection(name)
        assert name in [c.name for c in await aio.list_collections()]

        seen = []
        report = await aio.ingest([{"id": f"ocean-{i}", "text": t, "metadata": {"n": i}} for i, t in enumerate(OCEAN)],
                                  collection=name, batch_size=3, progress=seen.append)
        assert [r.status for r in report.results] == ["created"] * 4 and seen == [3, 4]
        again = await aio.ingest([{"id": "ocean-0", "text": OCEAN[0], "metadata": {"n": 0}}], collection=name)
        assert again.unchanged == 1
        assert (await aio.describe_collection(name)).documents == 4
        assert (await aio.stats(name)).collections[0].documents == 4

        hits = await aio.search("Why is the sea salty?", collection=name, k=2)
        same = client.search("Why is the sea salty?", collection=name, k=2)  # the same answer both ways
        assert [(h.doc_id, h.text) for h in hits] == [(h.doc_id, h.text) for h in same]
        assert [h.score for h in hits] == pytest.approx([h.score for h in same], abs=1e-5)  # the query embedded twice
        assert hits[0].doc_id == "ocean-3" and hits[0].metadata == {"n": 3}
        assert [h.doc_id for h in await aio.search("wind", collection=name, k=4, mode="lexical")] == ["ocean-1"]
        assert {h.doc_id for h in await aio.search("sea", collection=name, k=4, filter={"n": [0, 2]})} == {"ocean-0", "ocean-2"}
        whole = await aio.search_documents("Why is the sea salty?", collection=name, k=1)
        assert whole[0].id == "ocean-3" and whole[0].text == OCEAN[3]

        got = await aio.get(["ocean-2", "ocean-0"], collection=name)
        assert [d.id for d in got] == ["ocean-2", "ocean-0"] and got[0].text == OCEAN[2]
        with pytest.raises(NotFound, match="nope"):
            await aio.get(["ocean-1", "nope"], collection=name)
        assert [d.id for d in await aio.get(["ocean-1", "nope"], collection=name, missing_ok=True)] == ["ocean-1"]
        with pytest.raises(NotFound, match="does not exist"):
            await aio.get(["a"], collection="no-such-collection", missing_ok=True)

        assert await aio.delete(["ocean-1", "nope"], collection=name) == ["ocean-1"]
        assert (await aio.describe_collection(name)).documents == 3
        listed = [d async for d in aio.list_documents(collection=name, page_size=2)]  # two pages
        assert [d.id for d in listed] == ["ocean-0", "ocean-2", "ocean-3"] and listed[1].text == OCEAN[2]
        page = await aio.list_documents_page(collection=name, filter={"n": [2, 3]}, limit=1, with_text=False)
        assert [d.id for d in page.documents] == ["ocean-2"] and page.next_after == "ocean-2" and page.documents[0].text == ""
        assert await aio.delete(filter={"n": 3}, collection=name) == ["ocean-3"]
        with pytest.raises(InvalidArgument, match="filter is empty"):
            await aio.delete(filter={}, collection=name)
        await aio.ingest([{"id": "ocean-3", "text": OCEAN[3], "metadata": {"n": 3}}], collection=name)
        assert (await aio.describe_collection(name)).documents == 3
        with pytest.raises(InvalidArgument, match="k must be"):
            await aio.search("x", collection=name, k=0)
        assert (await aio.reindex_collection(name)).name == name
        await aio.drop_collection(name)
        with pytest.raises(NotFound):
            await aio.describe_collection(name)


async def test_generate_streams_then_gives_the_result(server, client, collection):
    import memlm

    client.ingest([{"id": f"ocean-{i}", "text": t} for i, t in enumerate(OCEAN)], collection=collection)
    async with memlm.AsyncClient(server.address) as aio:
        info = await aio.model_info()
        assert info.name == client.model_info().name and info.context_length > 0

        stream = aio.generate("Why is sea water salty?", collection=collection, memory="rag", k=1, max_new_tokens=8)
        pieces = [p async for p in stream]
        result = await stream.result()
        assert "".join(pieces) == result.text and result.completion_tokens <= 8
        assert [h.doc_id for h in result.citations] == ["ocean-3"]
        blocking = client.generate("Why is sea water salty?", collection=collection, memory="rag", k=1, max_new_tokens=8)
        assert blocking.text == result.text  # greedy, same request: same text

        chat = aio.generate(messages=[{"role": "user", "content": "Hello"}], memory="none", max_new_tokens=6)
        assert (await chat.text()).strip()

        # Two at once on one channel.
        a, b = await asyncio.gather(
            aio.generate("One, two,", memory="none", max_new_tokens=4).result(),
            aio.generate("Red, green,", memory="none", max_new_tokens=4).result(),
        )
        assert a.completion_tokens and b.completion_tokens


async def test_generate_cancel_stops_the_stream(server):
    import memlm

    async with memlm.AsyncClient(server.address) as aio:
        stream = aio.generate("Count from one to a thousand:", memory="none", max_new_tokens=400)
        got = []
        async for piece in stream:
            got.append(piece)
            if len(got) == 2:
                stream.cancel()
        assert len(got) == 2  # nothing after the cancel
        with pytest.raises(RuntimeError, match="cancelled"):
            await stream.result()

        # Leaving `async with stream` early cancels too; a task cancelled mid-stream stops it.
        async with aio.generate("Count from one to a thousand:", memory="none", max_new_tokens=400) as s:
            await s.__anext__()
        assert not s.done

        async def read_all():
            return [p async for p in aio.generate("Count from one to a thousand:", memory="none", max_new_tokens=400)]

        task = asyncio.create_task(read_all())
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await aio.generate("Hi", memory="none", max_new_tokens=2).result()).completion_tokens  # still serving


def test_errors_and_a_channel_per_event_loop(server):
    import memlm
    from memlm.errors import InvalidArgument, Unavailable

    aio = memlm.AsyncClient(server.address)
    with pytest.raises(InvalidArgument, match="reads a collection"):
        aio.generate("x", memory="rag")  # checked before any call, as the blocking client does
    with pytest.raises(InvalidArgument, match="batch_size"):
        asyncio.run(aio.ingest([], collection="x", batch_size=0))

    async def names():
        return [c.name for c in await aio.list_collections()]

    assert asyncio.run(names()) == asyncio.run(names())  # a second loop opens its own channel
    asyncio.run(aio.close())

    async def unreachable():
        async with memlm.AsyncClient("127.0.0.1:9", timeout=2) as nobody:
            await nobody.list_collections()

    with pytest.raises(Unavailable):
        asyncio.run(unreachable())
    assert memlm.AsyncClient is memlm.async_client.AsyncClient
