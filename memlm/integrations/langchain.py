"""LangChain retriever over a memlm collection.

    from memlm.integrations.langchain import MemlmRetriever
    client.ingest(splitter.split_documents(loader.load()), collection="kb")   # ids: content hashes
    retriever = MemlmRetriever(client=memlm.Client(), collection="kb", k=4, filter={"lang": "en"}, mode="hybrid")
    docs = retriever.invoke("how do I rotate keys?")          # list[langchain_core.documents.Document]
    docs = retriever.invoke("how do I rotate keys?", k=1)     # k, filter and mode per call too
    docs = await retriever.ainvoke("how do I rotate keys?")   # over a grpc.aio channel, no thread

Each chunk becomes a Document whose `id` is the memlm document id, whose `page_content` is the
chunk text and whose metadata is the document's metadata plus `doc_id`, `chunk_id`, `chunk_index`
and `score`; several chunks of one document share its id. `mode`: "dense", "lexical" (BM25) or
"hybrid"; None = the server's default. Needs langchain-core (not the server dependencies).
"""
from __future__ import annotations

from typing import Any, Optional

from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict

from memlm.client import Client
from memlm.errors import InvalidArgument
from memlm.index.types import SearchHit

_PER_CALL = ("k", "filter", "mode")


class MemlmRetriever(BaseRetriever):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Client
    collection: str
    k: int = 4
    filter: Optional[dict[str, Any]] = None
    mode: Optional[str] = None

    def _search_args(self, overrides: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(overrides) - set(_PER_CALL))
        if unknown:
            raise InvalidArgument(f"MemlmRetriever.invoke got {', '.join(unknown)}; it takes {', '.join(_PER_CALL)} per call")
        args = {name: getattr(self, name) for name in _PER_CALL} | overrides
        return {"collection": self.collection, **args}

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **overrides: Any
    ) -> list[Document]:
        return [_document(h) for h in self.client.search(query, **self._search_args(overrides))]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **overrides: Any
    ) -> list[Document]:
        return [_document(h) for h in await self.client.asearch(query, **self._search_args(overrides))]


def _document(h: SearchHit) -> Document:
    return Document(
        id=h.doc_id,
        page_content=h.text,
        metadata={**h.metadata, "doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk_index": h.chunk_index, "score": h.score},
    )
