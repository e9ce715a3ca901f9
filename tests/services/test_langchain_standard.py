"""MemlmVectorStore and ChatMemlm against the session's real server: LangChain's own standard
suites (langchain-tests: VectorStoreIntegrationTests, ChatModelIntegrationTests and the chat
model unit suite), then what those suites do not look at (whole documents from chunked ones,
filters, citations, stop sequences, cancellation).

The chat suite's tool-calling, structured-output, JSON-mode and multimodal tests are turned off
through the suite's own properties (has_tool_calling and the rest stay at their False defaults,
since ChatMemlm has no bind_tools) and report as skipped with the suite's reason: the bundled
135M model has none of those. supports_model_override is False: a memlm server serves one model.
"""
import asyncio
import uuid

import pytest

pytestmark = pytest.mark.server

langchain_tests = pytest.importorskip("langchain_tests", reason="langchain-tests is in the test extra")
from langchain_tests.integration_tests import ChatModelIntegrationTests, VectorStoreIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

OCEAN = [
    "Tides are caused mainly by the gravity of the Moon pulling on the oceans.",
    "Waves are raised by wind blowing across the surface of the sea.",
    "Coral reefs grow in warm, shallow, clear sea water.",
    "Sea water is salty because rivers carry dissolved minerals into the ocean.",
]


def _fresh_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


class TestMemlmVectorStoreStandard(VectorStoreIntegrationTests):
    """Each test gets a new, empty collection, dropped afterwards. The store embeds with the
    collection's model (memlm embeds on the server), not the suite's fake embeddings."""

    @pytest.fixture()
    def vectorstore(self, client):
        from memlm.integrations.langchain import MemlmVectorStore

        name = _fresh_name("lc-vs")
        store = MemlmVectorStore(client=client, collection=name)
        try:
            yield store
        finally:
            client.drop_collection(name)


class TestChatMemlmStandard(ChatModelIntegrationTests):
    """ChatMemlm reading a small collection through rag (one chunk per prompt) with 8 new tokens
    a call, so the ~25 generations of the suite take ~30 s on 2 cores."""

    @pytest.fixture(autouse=True)
    def _served_collection(self, client, collection):
        client.ingest([{"id": f"ocean-{i}", "text": t} for i, t in enumerate(OCEAN)], collection=collection)
        type(self)._params = {"client": client, "collection": collection, "memory": "rag", "k": 1,
                              "max_tokens": 8}

    @property
    def chat_model_class(self):
        from memlm.integrations.langchain import ChatMemlm

        return ChatMemlm

    @property
    def chat_model_params(self) -> dict:
        return self._params

    @property
    def supports_model_override(self) -> bool:
        return False  # one server serves one model


class TestChatMemlmUnit(ChatModelUnitTests):
    """The unit suite builds models without calling them: a client to a port nobody serves."""

    @property
    def chat_model_class(self):
        from memlm.integrations.langchain import ChatMemlm

        return ChatMemlm

    @property
    def chat_model_params(self) -> dict:
        import memlm

        return {"client": memlm.Client("127.0.0.1:9", timeout=1)}

    @property
    def supports_model_override(self) -> bool:
        return False


# ---------------------------------------------------------------- beyond the suites


@pytest.fixture()
def store(client):
    from memlm.integrations.langchain import MemlmVectorStore

    name = _fresh_name("lc-store")
    # 16-token chunks: the long documents below are stored as several chunks each.
    s = MemlmVectorStore(client=client, collection=name, chunk_tokens=16)
    yield s
    client.drop_collection(name)


LONG = {
    "moon": " ".join(["The Moon's gravity pulls the oceans and raises the tides twice a day."] * 4),
    "reef": " ".join(["Coral reefs are built by tiny animals in warm, clear, shallow water."] * 4),
    "salt": " ".join(["Rivers carry dissolved minerals to the sea, which is why it is salty."] * 4),
}


def test_a_chunked_document_comes_back_whole_and_once(store, client):
    from langchain_core.documents import Document

    docs = [Document(id=k, page_content=t, metadata={"topic": k, "year": 2020 + i}) for i, (k, t) in enumerate(LONG.items())]
    assert store.add_documents(docs) == ["moon", "reef", "salt"]
    assert client.describe_collection(store.collection).chunks > 3 * 3  # several chunks per document
    found = store.similarity_search_with_score("Why are there tides?", k=2)
    assert [d.id for d, _ in found] == ["moon", found[1][0].id] and found[1][0].id != "moon"
    top, score = found[0]
    assert top == docs[0] and 0 < score <= 1.0001  # the whole text and metadata, not one chunk
    assert found[0][1] >= found[1][1]
    relevance = store.similarity_search_with_relevance_scores("Why are there tides?", k=1)
    assert relevance[0][0].id == "moon" and relevance[0][1] == pytest.approx(score, abs=1e-6)


def test_langchain_filters_translate_to_memlm_filters(store):
    from langchain_core.documents import Document

    from memlm.errors import InvalidArgument

    store.add_documents([Document(id=k, page_content=t, metadata={"topic": k, "year": 2020 + i, "tags": ["sea", k]})
                         for i, (k, t) in enumerate(LONG.items())])
    query = "Why are there tides?"

    def ids(f, k=3):
        return sorted(d.id for d in store.similarity_search(query, k=k, filter=f))

    assert ids({"topic": "reef"}) == ["reef"]
    assert ids({"year": {"$in": [2021, 2022]}}) == ["reef", "salt"]
    assert ids({"topic": {"$ne": "moon"}}) == ["reef", "salt"]
    assert ids({"topic": {"$nin": ["moon", "salt"]}}) == ["reef"]
    assert ids({"$or": [{"topic": "moon"}, {"year": 2022}]}) == ["moon", "salt"]
    assert ids({"$and": [{"tags": "sea"}, {"$not": {"topic": "moon"}}]}) == ["reef", "salt"]
    assert ids({"tags": "reef"}) == ["reef"]  # a list-valued field matches a value it holds
    assert ids({"must_not": [{"key": "topic", "equals": "salt"}]}) == ["moon", "reef"]  # memlm's own form
    with pytest.raises(InvalidArgument, match=r"'\$gt' is not supported"):
        store.similarity_search(query, filter={"year": {"$gt": 2020}})
    with pytest.raises(InvalidArgument, match="negative test"):
        store.similarity_search(query, filter={"$or": [{"topic": {"$ne": "moon"}}, {"year": 2020}]})


async def test_async_store_calls_go_over_grpc_aio(store):
    """aadd_documents / asimilarity_search / aget_by_ids / adelete run on the event loop: with an
    executor that refuses work, LangChain's thread fallback would fail."""
    import concurrent.futures

    from langchain_core.documents import Document

    class NoThreads(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            raise RuntimeError("a thread was used")

    asyncio.get_running_loop().set_default_executor(NoThreads())
    docs = [Document(page_content=t, metadata={"n": i}) for i, t in enumerate(OCEAN)]
    ids = await store.aadd_documents(docs)
    assert len(set(ids)) == 4 and ids == await store.aadd_documents(docs)  # content-hash ids: an upsert
    assert (await store.asimilarity_search("Why is the sea salty?", k=1))[0] == Document(
        id=ids[3], page_content=OCEAN[3], metadata={"n": 3})
    await store.adelete([ids[3]])
    assert [d.id for d in await store.aget_by_ids(ids)] == ids[:3]
    await store.async_client.close()


def test_delete_without_ids_deletes_all_and_keeps_the_collection(store, client):
    from langchain_core.documents import Document

    from memlm.errors import InvalidArgument

    docs = [Document(id=k, page_content=t, metadata={"topic": k}) for k, t in LONG.items()]
    store.add_documents(docs)
    store.delete(filter={"topic": {"$in": ["moon", "salt"]}})  # memlm's extra: a filter, translated
    assert [d.id for d in store.get_by_ids(list(LONG))] == ["reef"]
    with pytest.raises(InvalidArgument, match="empty filter"):
        store.delete(filter={})
    store.delete([])  # no ids: nothing, as LangChain means it
    assert [d.id for d in store.get_by_ids(list(LONG))] == ["reef"]
    store.add_documents(docs)
    assert store.delete() is True  # ids=None: LangChain's "delete all"
    stats = client.describe_collection(store.collection)
    assert (stats.documents, stats.chunks, stats.index_vectors) == (0, 0, 0)
    assert stats.config.chunk_tokens == 16  # the collection stays, with its settings
    assert store.similarity_search("Why are there tides?", k=3) == []
    assert store.add_documents(docs[:1]) == ["moon"]  # and takes documents again


async def test_adelete_without_ids_deletes_all(store, client):
    from langchain_core.documents import Document

    await store.aadd_documents([Document(id=k, page_content=t) for k, t in LONG.items()])
    assert await store.adelete() is True
    assert (await store.aget_by_ids(list(LONG))) == [] and client.describe_collection(store.collection).documents == 0
    await store.async_client.close()


def test_from_texts_and_the_unused_embedding_is_said(client):
    from langchain_core.embeddings import DeterministicFakeEmbedding

    from memlm.integrations.langchain import MemlmVectorStore

    name = _fresh_name("lc-from")
    try:
        with pytest.warns(UserWarning, match="embeds documents and queries on the server"):
            store = MemlmVectorStore.from_texts(OCEAN, DeterministicFakeEmbedding(size=6),
                                                metadatas=[{"n": i} for i in range(4)], client=client, collection=name)
        assert store.embeddings is None
        assert store.similarity_search("coral", k=1)[0].metadata == {"n": 2}
        assert store.as_retriever(search_kwargs={"k": 2}).invoke("What raises waves?")[0].page_content == OCEAN[1]
    finally:
        client.drop_collection(name)


@pytest.fixture()
def ocean(client, collection):
    client.ingest([{"id": f"ocean-{i}", "text": t, "metadata": {"n": i}} for i, t in enumerate(OCEAN)], collection=collection)
    return collection


def test_chat_reads_memory_and_cites_it(client, ocean):
    from memlm.integrations.langchain import ChatMemlm

    chat = ChatMemlm(client=client, collection=ocean, k=1, max_tokens=12)
    answer = chat.invoke("Why is sea water salty?")
    cited = answer.response_metadata["citations"]
    assert [c["doc_id"] for c in cited] == ["ocean-3"] and cited[0]["text"] == OCEAN[3] and cited[0]["metadata"] == {"n": 3}
    usage = answer.usage_metadata
    assert 1 <= usage["output_tokens"] <= 12 and usage["input_tokens"] > 20  # the chunk went into the prompt
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert answer.response_metadata["model_name"] == client.model_info().name
    # 12 tokens unless the model ends its answer first (where it does depends on the kernels the
    # server's state chooses: a prefix served from the prefix cache, README "Prefix reuse")
    reason = answer.response_metadata["finish_reason"]
    assert reason == "length" if usage["output_tokens"] == 12 else reason == "eos"
    plain = ChatMemlm(client=client, max_tokens=12).invoke("Why is sea water salty?")
    assert plain.response_metadata["citations"] == [] and plain.usage_metadata["input_tokens"] < usage["input_tokens"]


def test_chat_stop_sequence_and_sampling_settings(client):
    from memlm.integrations.langchain import ChatMemlm

    chat = ChatMemlm(client=client, max_tokens=16)
    full = chat.invoke("Name three colours.").text
    words = full.split()
    assert len(words) >= 3, full
    stop = words[2]
    stopped = chat.invoke("Name three colours.", stop=[stop])
    assert stopped.text == full[: full.index(stop)] and stopped.response_metadata["finish_reason"] == "stop"
    sampled = ChatMemlm(client=client, max_tokens=16, temperature=1.0, seed=7)
    assert sampled.invoke("Tell me a story.").text == sampled.invoke("Tell me a story.").text  # same seed, same text
    assert ChatMemlm(client=client, max_tokens=16).invoke("Hi", max_tokens=3).usage_metadata["output_tokens"] <= 3


def test_chat_stream_pieces_add_up_and_leaving_early_cancels(client):
    from memlm.integrations.langchain import ChatMemlm

    chat = ChatMemlm(client=client, max_tokens=12)
    chunks = list(chat.stream("Hello"))
    whole = chat.invoke("Hello")
    assert "".join(c.text for c in chunks) == whole.text  # greedy: the same text either way
    assert chunks[-1].usage_metadata == whole.usage_metadata and chunks[-1].chunk_position == "last"
    assert all(c.usage_metadata is None for c in chunks[:-1])
    long = ChatMemlm(client=client, max_tokens=400)
    for _ in long.stream("Count from one to a thousand."):
        break  # the generator's close cancels the call: the server stops instead of making 400 tokens
    assert chat.invoke("Hello").text  # and the next call is served at once


def test_chat_refuses_what_it_cannot_read(client):
    from langchain_core.messages import HumanMessage, ToolMessage

    from memlm.errors import InvalidArgument
    from memlm.integrations.langchain import ChatMemlm

    chat = ChatMemlm(client=client, max_tokens=4)
    with pytest.raises(InvalidArgument, match="tool"):
        chat.invoke([HumanMessage("hi"), ToolMessage("42", tool_call_id="1")])
    with pytest.raises(InvalidArgument, match="text only"):
        chat.invoke([HumanMessage([{"type": "image", "url": "https://example.com/a.png"}])])
