"""The LangChain adapter against the real server: LangChain documents in, a retriever out."""
import pytest

pytestmark = pytest.mark.server


def test_langchain_documents_in_and_retriever_out(client, collection):
    from langchain_core.documents import Document

    from memlm.integrations.langchain import MemlmRetriever

    docs = [
        Document(id="tides", page_content="Tides are caused mainly by the gravity of the Moon.", metadata={"src": "a"}),
        Document(id="bees", page_content="Honey bees communicate the direction of flowers by dancing.", metadata={"src": "b"}),
    ]
    report = client.ingest(docs, collection=collection)
    assert [r.status for r in report.results] == ["created", "created"]

    retriever = MemlmRetriever(client=client, collection=collection, k=1)
    found = retriever.invoke("Why does the sea rise and fall?")
    assert len(found) == 1 and found[0].metadata["doc_id"] == "tides"
    assert found[0].page_content == docs[0].page_content and found[0].metadata["src"] == "a"
    assert 0 < found[0].metadata["score"] <= 1.0001

    filtered = MemlmRetriever(client=client, collection=collection, k=2, filter={"src": "b"})
    assert [d.metadata["doc_id"] for d in filtered.invoke("Why does the sea rise and fall?")] == ["bees"]

    lexical = MemlmRetriever(client=client, collection=collection, k=2, mode="lexical")
    assert [d.metadata["doc_id"] for d in lexical.invoke("dancing")] == ["bees"]  # BM25: only it has the word


OCEAN = [
    "Tides are caused mainly by the gravity of the Moon pulling on the oceans.",
    "Waves are raised by wind blowing across the surface of the sea.",
    "Coral reefs grow in warm, shallow, clear sea water.",
    "Sea water is salty because rivers carry dissolved minerals into the ocean.",
]


def test_retriever_takes_k_per_call_and_documents_carry_the_document_id(client, collection):
    from memlm.integrations.langchain import MemlmRetriever

    client.ingest([{"id": f"ocean-{i}", "text": t} for i, t in enumerate(OCEAN)], collection=collection)
    retriever = MemlmRetriever(client=client, collection=collection, k=3)
    assert len(retriever.invoke("Why is the sea salty?")) == 3
    found = retriever.invoke("Why is the sea salty?", k=1)
    assert len(found) == 1 and found[0].id == "ocean-3" and found[0].metadata["doc_id"] == "ocean-3"
    assert isinstance(found[0].metadata["chunk_id"], int)
    assert [d.id for d in retriever.invoke("wind", k=2, mode="lexical")] == ["ocean-1"]  # BM25: one has the word
    with pytest.raises(ValueError, match="top_k.*k, filter, mode"):
        retriever.invoke("x", top_k=2)


def test_langchain_documents_without_ids_get_a_stable_content_id(client, collection):
    from langchain_core.documents import Document

    from memlm.client import content_id

    docs = [Document(page_content=t, metadata={"source": "ocean.txt", "part": i}) for i, t in enumerate(OCEAN)]
    assert all(d.id is None for d in docs)  # what loaders and splitters produce
    first = client.ingest(docs, collection=collection)
    assert [r.status for r in first.results] == ["created"] * 4
    again = client.ingest([Document(page_content=d.page_content, metadata=d.metadata) for d in docs], collection=collection)
    assert [r.id for r in again.results] == [r.id for r in first.results]  # same content, same ids: replaced
    assert all(r.status != "created" for r in again.results)
    assert first.results[0].id == content_id(OCEAN[0], {"source": "ocean.txt", "part": 0})
    assert len({r.id for r in first.results}) == 4
    assert client.describe_collection(collection).documents == 4


def test_retriever_ainvoke_is_native_async(client, collection):
    """ainvoke runs on the event loop (grpc.aio), not in the loop's thread-pool executor: with an
    executor that refuses work, LangChain's default thread fallback would fail."""
    import asyncio
    import concurrent.futures

    from memlm.integrations.langchain import MemlmRetriever

    class NoThreads(concurrent.futures.ThreadPoolExecutor):
        def submit(self, fn, /, *args, **kwargs):
            raise RuntimeError("ainvoke used a thread")

    client.ingest([{"id": f"ocean-{i}", "text": t} for i, t in enumerate(OCEAN)], collection=collection)
    retriever = MemlmRetriever(client=client, collection=collection, k=2)

    async def main():
        asyncio.get_running_loop().set_default_executor(NoThreads())
        both = await asyncio.gather(retriever.ainvoke("What causes tides?", k=1), retriever.ainvoke("coral reefs"))
        await client.aclose()
        return both

    tides, coral = asyncio.run(main())
    assert [d.id for d in tides] == ["ocean-0"] and coral[0].id == "ocean-2" and len(coral) == 2
    assert asyncio.run(retriever.ainvoke("What causes tides?", k=1))[0].id == "ocean-0"  # a second loop works too
    assert client.search("coral", collection=collection, k=1)[0].doc_id == "ocean-2"  # the blocking channel is untouched


try:
    from langchain_tests.integration_tests import RetrieversIntegrationTests
except ImportError:  # langchain-tests is in the test extra; without it only these tests are left out
    RetrieversIntegrationTests = None


if RetrieversIntegrationTests is not None:

    class TestMemlmRetrieverStandard(RetrieversIntegrationTests):
        """LangChain's own retriever tests (langchain-tests), on a collection of the real server."""

        @pytest.fixture(autouse=True)
        def _served_collection(self, client, collection):
            client.ingest([{"id": f"ocean-{i}", "text": t} for i, t in enumerate(OCEAN)], collection=collection)
            type(self)._params = {"client": client, "collection": collection}

        @property
        def retriever_constructor(self):
            from memlm.integrations.langchain import MemlmRetriever

            return MemlmRetriever

        @property
        def retriever_constructor_params(self) -> dict:
            return self._params

        @property
        def retriever_query_example(self) -> str:
            return "What makes the sea salty?"
