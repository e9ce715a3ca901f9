"""LangChain retriever over a memlm collection.

    from memlm.integrations.langchain import MemlmRetriever
    retriever = MemlmRetriever(client=memlm.Client(), collection="kb", k=4, filter={"lang": "en"}, mode="hybrid")
    docs = retriever.invoke("how do I rotate keys?")   # list[langchain_core.documents.Document]

Each chunk becomes a Document whose `page_content` is the chunk text and whose metadata is the
document's metadata plus `doc_id`, `chunk_id`, `chunk_index` and `score`. `mode`: "dense", "lexical"
(BM25) or "hybrid"; None = the server's default. Needs langchain-core.
"""
from __future__ import annotations

from typing import Any, Optional

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from memlm.client import Client


class MemlmRetriever(BaseRetriever):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Client
    collection: str
    k: int = 4
    filter: Optional[dict[str, Any]] = None
    mode: Optional[str] = None

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        hits = self.client.search(query, collection=self.collection, k=self.k, filter=self.filter, mode=self.mode)
        return [
            Document(
                id=str(h.chunk_id),
                page_content=h.text,
                metadata={**h.metadata, "doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk_index": h.chunk_index,
                          "score": h.score},
            )
            for h in hits
        ]
