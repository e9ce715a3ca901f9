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
