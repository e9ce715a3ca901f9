"""The LlamaIndex components against the session's real server, through real llama-index-core
objects: VectorStoreIndex over MemlmVectorStore (insert, upsert, delete_ref_doc, retrievers with
MetadataFilters, a query engine answering with MemlmLLM), an IngestionPipeline run twice, and
MemlmLLM and MemlmRetriever on their own. llama-index-core ships no standard test suite for
vector stores or LLMs, so these are written against its interfaces.

No embedding model is downloaded: memlm embeds on the server, and ServerSideEmbedding stands
where LlamaIndex wants an embed model (it computes nothing; the store does not read vectors).
"""
import asyncio
import uuid

import pytest

pytestmark = pytest.mark.server

pytest.importorskip("llama_index.core", reason="llama-index-core is in the llama-index extra")

OCEAN = [
    "Tides are caused mainly by the gravity of the Moon pulling on the oceans.",
    "Waves are raised by wind blowing across the surface of the sea.",
    "Coral reefs grow in warm, shallow, clear sea water.",
    "Sea water is salty because rivers carry dissolved minerals into the ocean.",
]


@pytest.fixture()
def store(client):
    from memlm.integrations.llama_index import MemlmVectorStore

    name = f"li-{uuid.uuid4().hex[:12]}"
    yield MemlmVectorStore(client=client, collection=name)
    client.drop_collection(name)


@pytest.fixture()
def index(store):
    from llama_index.core import VectorStoreIndex

    from memlm.integrations.llama_index import ServerSideEmbedding

    return VectorStoreIndex.from_vector_store(store, embed_model=ServerSideEmbedding())


def _documents(client, store) -> int:
    return client.describe_collection(store.collection).documents


def test_index_insert_upserts_by_ref_doc_and_retrieves_nodes(client, store, index):
    from llama_index.core import Document
    from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters

    docs = [Document(text=t, id_=f"ocean-{i}", metadata={"n": i, "kind": "sea" if i != 2 else "reef"})
            for i, t in enumerate(OCEAN)]
    for d in docs:
        index.insert(d)
    assert _documents(client, store) == 4
    for d in docs:  # the same documents again: replaced, not duplicated
        index.insert(d)
    assert _documents(client, store) == 4

    found = index.as_retriever(similarity_top_k=2).retrieve("Why is the sea salty?")
    assert len(found) == 2 and found[0].node.ref_doc_id == "ocean-3"
    assert found[0].node.text == OCEAN[3] and found[0].node.metadata == {"n": 3, "kind": "sea"}
    assert 0 < found[0].score <= 1.0001 and found[0].score >= found[1].score

    reef_only = MetadataFilters(filters=[MetadataFilter(key="kind", value="reef")])
    assert [n.node.ref_doc_id for n in index.as_retriever(similarity_top_k=4, filters=reef_only).retrieve("salty")] == ["ocean-2"]
    not_these = MetadataFilters(filters=[MetadataFilter(key="n", value=[0, 3], operator=FilterOperator.NIN)])
    assert sorted(n.node.ref_doc_id for n in index.as_retriever(similarity_top_k=4, filters=not_these).retrieve("sea")) == ["ocean-1", "ocean-2"]
    either = MetadataFilters(filters=[MetadataFilter(key="n", value=0), MetadataFilter(key="n", value=1)], condition="or")
    assert sorted(n.node.ref_doc_id for n in index.as_retriever(similarity_top_k=4, filters=either).retrieve("sea")) == ["ocean-0", "ocean-1"]
    with pytest.raises(ValueError, match="not supported"):
        index.as_retriever(filters=MetadataFilters(filters=[MetadataFilter(key="n", value=1, operator=FilterOperator.GT)])).retrieve("sea")

    # A changed text under the same ref doc: the old node goes, the new one answers.
    index.insert(Document(text="Sea water tastes of salt from minerals the rivers bring.", id_="ocean-3", metadata={"n": 3}))
    assert _documents(client, store) == 4
    top = index.as_retriever(similarity_top_k=1).retrieve("Why is the sea salty?")[0].node
    assert top.ref_doc_id == "ocean-3" and top.text.startswith("Sea water tastes")

    index.delete_ref_doc("ocean-3")
    assert _documents(client, store) == 3
    assert all(n.node.ref_doc_id != "ocean-3" for n in index.as_retriever(similarity_top_k=3).retrieve("salty"))


def test_ingestion_pipeline_run_twice_upserts(client, store):
    """A pipeline without a docstore splits again on each run and its SentenceSplitter makes new
    node ids: the store's ref-doc replacement keeps one copy."""
    from llama_index.core import Document
    from llama_index.core.ingestion import IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter

    from memlm.integrations.llama_index import ServerSideEmbedding

    text = " ".join(OCEAN * 4)

    def run():  # a fresh pipeline, as a script run again has: no cache, so new node ids
        pipeline = IngestionPipeline(transformations=[SentenceSplitter(chunk_size=64, chunk_overlap=0),
                                                      ServerSideEmbedding()], vector_store=store)
        return pipeline.run(documents=[Document(text=text, id_="ocean.txt")])

    first = run()
    assert len(first) > 1 and _documents(client, store) == len(first)
    second = run()
    assert {n.node_id for n in second}.isdisjoint(n.node_id for n in first)  # new ids from the splitter
    assert _documents(client, store) == len(second)
    stored = store.get_nodes([n.node_id for n in second])
    assert [n.text for n in stored] == [n.text for n in second] and all(n.ref_doc_id == "ocean.txt" for n in stored)
    assert store.get_nodes([first[0].node_id]) == []


def _stored(client, store) -> dict:
    """{node id: (chunk ids, updated_at)} of every stored node: what an unchanged node keeps."""
    return {d.id: (d.chunk_ids, d.updated_at) for d in client.list_documents(collection=store.collection, with_text=False)}


def _last_seq(client, store) -> int:
    """The collection's newest change-log entry: every committed write (ingest or delete) adds one."""
    return client.read_changes(collection=store.collection, after_seq=0).last_seq


def _sentences(n: int, changed: int = -1) -> str:
    return "\n\n\n".join(f"Paragraph {i}: the harbour log of day {i} notes {'a storm' if i == changed else 'calm seas'} "
                         f"and {i % 7} ships at anchor." for i in range(n))


def test_reinserting_a_ref_doc_of_many_nodes_embeds_nothing_again(client, store):
    """More nodes than the old 32-chunk search page: re-inserting the same Document writes nothing
    (no delete, no re-embedding); a shorter, changed one deletes the nodes it no longer has."""
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter

    from memlm.integrations.llama_index import ServerSideEmbedding

    splitter = SentenceSplitter(chunk_size=40, chunk_overlap=0, id_func=lambda i, doc: f"{doc.doc_id}#{i}")
    index = VectorStoreIndex.from_vector_store(store, embed_model=ServerSideEmbedding(), transformations=[splitter])
    index.insert(Document(text=_sentences(90), id_="log.txt"))
    first, seq = _stored(client, store), _last_seq(client, store)
    assert len(first) > 40 and all(i.startswith("log.txt#") for i in first)

    index.insert(Document(text=_sentences(90), id_="log.txt"))
    assert _stored(client, store) == first  # same chunk ids and updated_at: not re-embedded, not rewritten
    assert _last_seq(client, store) == seq  # and nothing deleted: no write at all

    # One paragraph changed, ten gone. Every node is replaced: LlamaIndex records the Document's hash
    # in each node's relationships, so each node's stored metadata changed with the Document.
    changed = Document(text=_sentences(80, changed=41), id_="log.txt")
    new_ids = {n.node_id for n in splitter.get_nodes_from_documents([changed])}
    index.insert(changed)
    after = _stored(client, store)
    assert set(after) == new_ids and new_ids < set(first)  # the nodes of the last paragraphs are deleted
    (storm,) = [n for n in store.get_nodes(filters=_only("ref_doc_id", "log.txt")) if "a storm" in n.text]
    assert storm.ref_doc_id == "log.txt"
    assert _last_seq(client, store) == seq + 1 + 2  # one delete of the stale nodes, the ingest's two batches of 64

    index.delete_ref_doc("log.txt")
    assert _stored(client, store) == {} and _last_seq(client, store) == seq + 4  # every node in one delete


def _only(key, value, operator=None):
    from llama_index.core.vector_stores.types import FilterOperator, MetadataFilter, MetadataFilters

    return MetadataFilters(filters=[MetadataFilter(key=key, value=value, operator=operator or FilterOperator.EQ)])


def test_get_delete_nodes_by_filters_and_clear(client, store, index):
    from llama_index.core import Document
    from llama_index.core.vector_stores.types import FilterOperator

    for i, t in enumerate(OCEAN):
        index.insert(Document(text=t, id_=f"ocean-{i}", metadata={"n": i, "kind": "reef" if i == 2 else "sea"}))
    by_ref = {n.ref_doc_id: n for n in store.get_nodes(filters=_only("kind", "sea"))}
    assert sorted(by_ref) == ["ocean-0", "ocean-1", "ocean-3"] and by_ref["ocean-3"].text == OCEAN[3]
    assert by_ref["ocean-3"].metadata == {"n": 3, "kind": "sea"}
    ids = [by_ref["ocean-0"].node_id, by_ref["ocean-1"].node_id]
    both = store.get_nodes(ids, filters=_only("n", [1, 2], FilterOperator.IN))  # ids and filters: the ids that match
    assert [n.ref_doc_id for n in both] == ["ocean-1"]
    with pytest.raises(ValueError, match="node_ids or filters"):
        store.get_nodes()

    store.delete_nodes(ids, filters=_only("n", 0))
    assert sorted(n.ref_doc_id for n in store.get_nodes(filters=_only("kind", "sea"))) == ["ocean-1", "ocean-3"]
    store.delete_nodes(filters=_only("n", [1, 2], FilterOperator.NIN))  # NOT: ocean-3 goes
    assert sorted(n.ref_doc_id for n in store.get_nodes(filters=_only("n", [0, 1, 2, 3], FilterOperator.IN))) == ["ocean-1", "ocean-2"]
    with pytest.raises(ValueError, match="node_ids or filters"):
        store.delete_nodes()
    assert _documents(client, store) == 2

    store.clear()
    stats = client.describe_collection(store.collection)
    assert (stats.documents, stats.chunks, stats.index_vectors) == (0, 0, 0)  # the collection stays
    assert index.as_retriever(similarity_top_k=2).retrieve("coral reefs") == []


async def test_async_upsert_filters_and_clear(client, store):
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.node_parser import SentenceSplitter

    from memlm.integrations.llama_index import ServerSideEmbedding

    splitter = SentenceSplitter(chunk_size=40, chunk_overlap=0, id_func=lambda i, doc: f"{doc.doc_id}#{i}")
    index = VectorStoreIndex.from_vector_store(store, embed_model=ServerSideEmbedding(), transformations=[splitter],
                                               use_async=True)
    await index.ainsert(Document(text=_sentences(80), id_="log.txt", metadata={"src": "log"}))
    first, seq = _stored(client, store), _last_seq(client, store)
    assert len(first) > 32
    await index.ainsert(Document(text=_sentences(80), id_="log.txt", metadata={"src": "log"}))
    assert _stored(client, store) == first and _last_seq(client, store) == seq
    nodes = await store.aget_nodes(filters=_only("src", "log"))
    assert sorted(n.node_id for n in nodes) == sorted(first)
    await store.adelete_nodes(filters=_only("ref_doc_id", "nope"))
    assert len(_stored(client, store)) == len(first)
    await index.ainsert(Document(text=OCEAN[0], id_="ocean-0"))
    await store.adelete("log.txt")
    assert list(_stored(client, store)) == [n.node_id for n in await store.aget_nodes(filters=_only("ref_doc_id", "ocean-0"))]
    await store.aclear()
    assert _stored(client, store) == {}
    await client.aclose()


def test_query_engine_answers_with_memlm_llm_from_the_store(client, index):
    from llama_index.core import Document

    from memlm.integrations.llama_index import MemlmLLM

    for i, t in enumerate(OCEAN):
        index.insert(Document(text=t, id_=f"ocean-{i}"))
    llm = MemlmLLM(client=client, max_tokens=16)
    assert llm.metadata.context_window == client.model_info().context_length and llm.metadata.is_chat_model
    response = index.as_query_engine(llm=llm, similarity_top_k=1).query("What causes the tides?")
    assert [n.node.ref_doc_id for n in response.source_nodes] == ["ocean-0"]
    assert str(response).strip()


async def test_async_store_calls(client, store):
    from llama_index.core import Document, VectorStoreIndex

    from memlm.integrations.llama_index import ServerSideEmbedding

    index = VectorStoreIndex.from_vector_store(store, embed_model=ServerSideEmbedding(), use_async=True)
    for i, t in enumerate(OCEAN):
        await index.ainsert(Document(text=t, id_=f"ocean-{i}"))
    found = await index.as_retriever(similarity_top_k=1).aretrieve("coral reefs")
    assert found[0].node.ref_doc_id == "ocean-2"
    await index.adelete_ref_doc("ocean-2")
    found = await index.as_retriever(similarity_top_k=4).aretrieve("coral reefs")
    assert "ocean-2" not in {n.node.ref_doc_id for n in found} and len(found) == 3
    nodes = await store.aget_nodes([found[0].node.node_id])
    assert nodes[0].text == found[0].node.text
    await client.aclose()


def test_llm_complete_chat_and_streams(client, collection):
    from llama_index.core.llms import ChatMessage

    from memlm.integrations.llama_index import MemlmLLM

    llm = MemlmLLM(client=client, max_tokens=10)
    done = llm.complete("The capital of France is")
    pieces = list(llm.stream_complete("The capital of France is"))
    assert "".join(p.delta for p in pieces) == pieces[-1].text == done.text  # greedy: the same either way
    assert done.additional_kwargs["completion_tokens"] <= 10 and done.additional_kwargs["citations"] == []

    chat = llm.chat([ChatMessage(role="system", content="Answer briefly."), ChatMessage(role="user", content="Hello")])
    streamed = list(llm.stream_chat([ChatMessage(role="system", content="Answer briefly."), ChatMessage(role="user", content="Hello")]))
    assert chat.message.role == "assistant" and chat.message.content == streamed[-1].message.content
    assert llm.complete("Count:", stop=[" 3"], max_tokens=30).text.count(" 3") == 0

    client.ingest([{"id": f"ocean-{i}", "text": t} for i, t in enumerate(OCEAN)], collection=collection)
    rag = MemlmLLM(client=client, collection=collection, k=1, max_tokens=8)
    answer = rag.chat([ChatMessage(role="user", content="Why is sea water salty?")])
    assert [c["doc_id"] for c in answer.additional_kwargs["citations"]] == ["ocean-3"]

    async def main():
        a = await llm.acomplete("The capital of France is")
        gen = await llm.astream_chat([ChatMessage(role="user", content="Hello")])
        last = None
        async for last in gen:
            pass
        await client.aclose()
        return a, last

    a, last = asyncio.run(main())
    assert a.text == done.text
    assert last.message.content and last.additional_kwargs["completion_tokens"] > 0


def test_retriever_returns_chunks_as_nodes_with_scores(client, collection):
    from llama_index.core.vector_stores.types import MetadataFilter, MetadataFilters

    from memlm.integrations.llama_index import MemlmRetriever

    client.ingest([{"id": f"ocean-{i}", "text": t, "metadata": {"n": i}} for i, t in enumerate(OCEAN)], collection=collection)
    retriever = MemlmRetriever(client, collection, similarity_top_k=2)
    found = retriever.retrieve("Why is the sea salty?")
    assert len(found) == 2 and found[0].node.ref_doc_id == "ocean-3" and found[0].node.text == OCEAN[3]
    assert found[0].node.metadata["n"] == 3 and found[0].node.node_id == "ocean-3#0" and found[0].score > found[1].score
    only = MemlmRetriever(client, collection, similarity_top_k=3, filters=MetadataFilters(filters=[MetadataFilter(key="n", value=1)]))
    assert [n.node.ref_doc_id for n in only.retrieve("Why is the sea salty?")] == ["ocean-1"]

    async def main():
        found = await retriever.aretrieve("coral reefs")
        await client.aclose()
        return found

    assert asyncio.run(main())[0].node.ref_doc_id == "ocean-2"
