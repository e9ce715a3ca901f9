"""LangChain components over memlm: a retriever, a vector store and a chat model.

    from memlm.integrations.langchain import ChatMemlm, MemlmRetriever, MemlmVectorStore

    store = MemlmVectorStore(client=memlm.Client(), collection="kb")        # made if missing
    ids = store.add_documents(splitter.split_documents(loader.load()))      # one memlm document each
    docs = store.similarity_search("how do I rotate keys?", k=4, filter={"lang": "en"})
    retriever = MemlmRetriever(client=client, collection="kb", k=4, mode="hybrid")   # chunks, scored
    chat = ChatMemlm(client=client, collection="kb", memory="rag", max_tokens=128)
    answer = chat.invoke("How do I rotate keys?")        # .response_metadata["citations"]: chunks read

MemlmRetriever: each chunk a Document whose `id` is the memlm document id, `page_content` the
chunk text, metadata the document's plus `doc_id`, `chunk_id`, `chunk_index` and `score`; several
chunks of one document share its id. `mode`: "dense", "lexical" (BM25) or "hybrid"; None = the
server's default.

MemlmVectorStore: one LangChain Document is one memlm document (its id kept, or a content hash
when it has none, as `Client.ingest` gives); a search ranks documents by their best chunk and
returns each whole, so a Document longer than the collection's chunk size comes back as it went
in. memlm embeds on the server with the collection's embedding model: an `embedding` given to
the constructor or `from_texts` is not used (a warning says so), and `embeddings` is None.
Filters: LangChain dicts with equality, $eq, $ne, $in, $nin, $and, $or, $not (see
memlm/integrations/filters.py for what one memlm filter can hold), or memlm's must/should/must_not.
`delete(ids)` deletes by id; `delete()` (ids=None, LangChain's "delete all") every document of the
collection, which stays with its settings; `delete(filter=...)` the documents that match.

ChatMemlm: memlm's Generate, streamed, over the chat template of the served model; with a
collection it reads memory (`memory="rag"` by default then, or "knn", "retro", ...). No tool
calling, structured output or images: the bundled 135M model has none.

Async methods go over grpc.aio (`client.aio`, an AsyncClient), not a thread pool. Needs
langchain-core (`pip install memlm[langchain]`), not the server's dependencies.
"""
from __future__ import annotations

import warnings
from typing import Any, AsyncIterator, Callable, Iterator, Optional, Sequence

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun, AsyncCallbackManagerForRetrieverRun, CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from langchain_core.vectorstores import VectorStore
from pydantic import ConfigDict, PrivateAttr

from memlm.async_client import AsyncClient
from memlm.client import Client, DocumentHit, content_id
from memlm.engine import GenerationResult
from memlm.errors import InvalidArgument
from memlm.index.types import SearchHit
from memlm.integrations.filters import from_langchain

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
        args["filter"] = from_langchain(args["filter"])
        return {"collection": self.collection, **args}

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **overrides: Any
    ) -> list[Document]:
        return [_chunk_document(h) for h in self.client.search(query, **self._search_args(overrides))]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **overrides: Any
    ) -> list[Document]:
        return [_chunk_document(h) for h in await self.client.asearch(query, **self._search_args(overrides))]


def _chunk_document(h: SearchHit) -> Document:
    return Document(
        id=h.doc_id,
        page_content=h.text,
        metadata={**h.metadata, "doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk_index": h.chunk_index, "score": h.score},
    )


# ---------------------------------------------------------------- the vector store


def _whole_document(h: DocumentHit) -> Document:
    return Document(id=h.id, page_content=h.text, metadata=h.metadata)


def _warn_unused_embedding(embedding: Optional[Embeddings]) -> None:
    if embedding is not None:
        warnings.warn(
            f"MemlmVectorStore does not use the {type(embedding).__name__} it was given: memlm embeds documents "
            "and queries on the server with the collection's embedding model",
            UserWarning, stacklevel=3,
        )


class MemlmVectorStore(VectorStore):
    """A LangChain VectorStore over one memlm collection (created with `collection_settings`,
    e.g. chunk_tokens=256, if it does not exist). `mode` is how searches rank: "dense" (cosine
    similarity of the server's embeddings, the default, in [-1, 1]), "hybrid" (in [0, 1]) or
    "lexical" (BM25, unbounded: no relevance scores)."""

    def __init__(
        self,
        client: Client,
        collection: str,
        *,
        embedding: Optional[Embeddings] = None,
        mode: Optional[str] = "dense",
        async_client: Optional[AsyncClient] = None,
        **collection_settings: Any,
    ):
        _warn_unused_embedding(embedding)
        self.client = client
        self.async_client = async_client or client.aio
        self.collection = collection
        self.mode = mode
        client.create_collection(collection, if_not_exists=True, **collection_settings)

    @property
    def embeddings(self) -> Optional[Embeddings]:
        return None  # the server embeds (the collection's embedding model)

    # --- writing ---

    def _documents(self, documents: Sequence[Document], ids: Optional[Sequence[Optional[str]]]) -> list[dict[str, Any]]:
        if ids is not None and len(ids) != len(documents):
            raise InvalidArgument(f"got {len(ids)} ids for {len(documents)} documents; expected one id per document")
        out = []
        for i, doc in enumerate(documents):
            doc_id = (ids[i] if ids is not None else None) or doc.id or content_id(doc.page_content, doc.metadata)
            out.append({"id": str(doc_id), "text": doc.page_content, "metadata": dict(doc.metadata)})
        return out

    def add_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        """Upsert: a document whose id is stored replaces it. Ids: `ids=[...]`, else each
        Document's `id`, else a hash of its text and metadata. The documents are not changed."""
        docs = self._documents(documents, kwargs.pop("ids", None))
        self.client.ingest(docs, collection=self.collection, **kwargs)
        return [d["id"] for d in docs]

    async def aadd_documents(self, documents: list[Document], **kwargs: Any) -> list[str]:
        docs = self._documents(documents, kwargs.pop("ids", None))
        await self.async_client.ingest(docs, collection=self.collection, **kwargs)
        return [d["id"] for d in docs]

    def delete(self, ids: Optional[list[str]] = None, **kwargs: Any) -> Optional[bool]:
        """Delete by id (ids not stored are ignored), or with `ids=None` every document, as
        LangChain's contract says (the collection and its settings stay). `filter=` (a LangChain
        or memlm filter) deletes the documents that match it instead (with ids: the ids that do).
        One durable transaction on the server either way."""
        self.client.delete(**_delete_args(ids, kwargs), collection=self.collection)
        return True

    async def adelete(self, ids: Optional[list[str]] = None, **kwargs: Any) -> Optional[bool]:
        await self.async_client.delete(**_delete_args(ids, kwargs), collection=self.collection)
        return True

    # --- reading ---

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        docs = self.client.get(list(ids), collection=self.collection, missing_ok=True)
        return [Document(id=d.id, page_content=d.text, metadata=dict(d.metadata)) for d in docs]

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        docs = await self.async_client.get(list(ids), collection=self.collection, missing_ok=True)
        return [Document(id=d.id, page_content=d.text, metadata=dict(d.metadata)) for d in docs]

    def _search_args(self, k: int, filter: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        mode = kwargs.pop("mode", self.mode)
        if kwargs:
            raise InvalidArgument(f"MemlmVectorStore search got {', '.join(sorted(kwargs))}; it takes k, filter and mode")
        return {"collection": self.collection, "k": k, "filter": from_langchain(filter), "mode": mode}

    def similarity_search_with_score(
        self, query: str, k: int = 4, filter: Optional[dict[str, Any]] = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """(document, score of its best chunk), best first; the score is the search mode's."""
        hits = self.client.search_documents(query, **self._search_args(k, filter, kwargs))
        return [(_whole_document(h), h.score) for h in hits]

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, filter: Optional[dict[str, Any]] = None, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        hits = await self.async_client.search_documents(query, **self._search_args(k, filter, kwargs))
        return [(_whole_document(h), h.score) for h in hits]

    def similarity_search(
        self, query: str, k: int = 4, filter: Optional[dict[str, Any]] = None, **kwargs: Any
    ) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score(query, k, filter, **kwargs)]

    async def asimilarity_search(
        self, query: str, k: int = 4, filter: Optional[dict[str, Any]] = None, **kwargs: Any
    ) -> list[Document]:
        return [doc for doc, _ in await self.asimilarity_search_with_score(query, k, filter, **kwargs)]

    def similarity_search_by_vector(
        self, embedding: list[float], k: int = 4, filter: Optional[dict[str, Any]] = None, **kwargs: Any
    ) -> list[Document]:
        """A query vector of the collection's embedding model (384-d for the default), normalised."""
        args = self._search_args(k, filter, kwargs) | {"mode": "dense"}
        return [_whole_document(h) for h in self.client.search_documents(embedding, **args)]

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        if self.mode == "lexical":
            raise NotImplementedError("lexical (BM25) scores are unbounded: relevance scores need mode 'dense' or 'hybrid'")
        # dense: cosine similarity, as LangChain's cosine stores report (1 - cosine distance);
        # hybrid: already in [0, 1].
        return lambda score: score

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Optional[Embeddings] = None,
        metadatas: Optional[list[dict]] = None,
        *,
        ids: Optional[list[str]] = None,
        client: Optional[Client] = None,
        collection: Optional[str] = None,
        **kwargs: Any,
    ) -> "MemlmVectorStore":
        """`MemlmVectorStore.from_texts(texts, client=..., collection=...)`; `embedding` is not used."""
        if client is None or not collection:
            raise InvalidArgument("MemlmVectorStore.from_texts needs client=memlm.Client(...) and collection=...")
        store = cls(client, collection, embedding=embedding, **kwargs)
        store.add_texts(texts, metadatas, ids=ids)
        return store


def _delete_args(ids: Optional[Sequence[str]], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Client.delete's arguments for VectorStore.delete(ids, **kwargs): ids None without a filter
    is every document (all=True); `filter` and the client's `timeout` pass through."""
    unknown = sorted(set(kwargs) - {"filter", "timeout"})
    if unknown:
        raise InvalidArgument(f"MemlmVectorStore.delete got {', '.join(unknown)}; it takes ids, filter and timeout")
    f = from_langchain(kwargs.get("filter"))
    if kwargs.get("filter") is not None and f is None:
        raise InvalidArgument("MemlmVectorStore.delete got an empty filter; pass ids=None without a filter to delete all")
    ids = None if ids is None else list(ids)
    return {"ids": ids, "filter": f, "all": ids is None and f is None, "timeout": kwargs.get("timeout")}


# ---------------------------------------------------------------- the chat model

_ROLES = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant", "system": "system"}


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(block.get("text", ""))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise InvalidArgument(f"ChatMemlm reads text only; a {message.type} message holds a {kind!r} block")
    return "".join(parts)


def _messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        role = _ROLES.get(getattr(m, "role", None) or m.type)
        if role is None:
            raise InvalidArgument(
                f"ChatMemlm takes system, human and AI messages; got a {m.type} message (memlm has no tool calling)"
            )
        out.append({"role": role, "content": _text(m)})
    return out


def _citation(h: SearchHit) -> dict[str, Any]:
    return {"doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk_index": h.chunk_index, "score": h.score,
            "text": h.text, "metadata": h.metadata}


class ChatMemlm(BaseChatModel):
    """memlm's Generate as a LangChain chat model. `collection` with `memory` ("rag" by default
    when a collection is given, else "none") makes the model read memory; the chunks it read are
    in `response_metadata["citations"]`, the token counts in `usage_metadata`, the server's
    timings in `response_metadata["timings"]`. `max_tokens` None: the server's default.
    LangChain's standard `api_key` and `max_retries` are not fields (pydantic drops them): the
    client holds the key, and a failed call is not retried."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    client: Client
    collection: str = ""
    memory: Optional[str] = None
    k: int = 0  # rag: chunks retrieved; 0 = the server's default
    filter: Optional[dict[str, Any]] = None
    search_mode: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None  # None or 0: greedy
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: Optional[list[str]] = None
    timeout: Optional[float] = None  # per call; None = the client's
    streaming: bool = False
    model_name: Optional[str] = None  # what traces name; None = the served model's name (one ModelInfo call)

    _served_name: Optional[str] = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "memlm"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"collection": self.collection, "memory": self._memory(), "k": self.k, "max_tokens": self.max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}

    def _get_ls_params(self, stop: Optional[list[str]] = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(ls_provider="memlm", ls_model_type="chat",
                                 ls_model_name=kwargs.get("model") or self.model_name or "memlm")
        if (t := kwargs.get("temperature", self.temperature)) is not None:
            params["ls_temperature"] = t
        if (n := kwargs.get("max_tokens", self.max_tokens)) is not None:
            params["ls_max_tokens"] = n
        if stop := (stop or self.stop):
            params["ls_stop"] = list(stop)
        return params

    def _memory(self) -> str:
        return self.memory or ("rag" if self.collection else "none")

    def _request(self, messages: list[BaseMessage], stop: Optional[list[str]], kwargs: dict[str, Any]) -> dict[str, Any]:
        per_call = {name: kwargs.pop(name) for name in ("max_tokens", "temperature", "top_p", "seed") if name in kwargs}
        unknown = sorted(set(kwargs) - {"stream"})
        if unknown:
            raise InvalidArgument(f"ChatMemlm got {', '.join(unknown)}; it takes stop, max_tokens, temperature, top_p, seed per call")
        max_tokens = per_call.get("max_tokens", self.max_tokens)
        return dict(
            messages=_messages(messages), collection=self.collection, memory=self._memory(), k=self.k,
            filter=from_langchain(self.filter), max_new_tokens=max_tokens or 0,
            temperature=per_call.get("temperature", self.temperature), top_p=per_call.get("top_p", self.top_p),
            seed=per_call.get("seed", self.seed), stop=[*(self.stop or ()), *(stop or ())],
            search_mode=self.search_mode, timeout=self.timeout,
        )

    def _name(self) -> str:
        if self.model_name:
            return self.model_name
        if self._served_name is None:
            self._served_name = self.client.model_info(timeout=self.timeout).name
        return self._served_name

    async def _aname(self) -> str:
        if self.model_name:
            return self.model_name
        if self._served_name is None:
            self._served_name = (await self.client.aio.model_info(timeout=self.timeout)).name
        return self._served_name

    @staticmethod
    def _final(result: GenerationResult, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
        """(usage_metadata, response_metadata) of a finished generation."""
        usage = {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens,
                 "total_tokens": result.prompt_tokens + result.completion_tokens}
        t = result.timings
        meta = {
            "model_name": name, "model_provider": "memlm", "finish_reason": result.finish_reason,
            "citations": [_citation(h) for h in result.citations],
            "truncated_prompt_tokens": result.truncated_prompt_tokens,
            "timings": {"retrieval_ms": t.retrieval_ms, "prefill_ms": t.prefill_ms, "decode_ms": t.decode_ms,
                        "time_to_first_token_ms": t.time_to_first_token_ms, "total_ms": t.total_ms},
        }
        return usage, meta

    def _result(self, result: GenerationResult, name: str) -> ChatResult:
        usage, meta = self._final(result, name)
        message = AIMessage(content=result.text, usage_metadata=usage, response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=message, generation_info={"finish_reason": result.finish_reason})])

    def _generate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                  run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        stream = self.client.generate(**self._request(messages, stop, kwargs))
        return self._result(stream.result, self._name())

    async def _agenerate(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                         run_manager: Optional[AsyncCallbackManagerForLLMRun] = None, **kwargs: Any) -> ChatResult:
        stream = self.client.aio.generate(**self._request(messages, stop, kwargs))
        return self._result(await stream.result(), await self._aname())

    def _stream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                run_manager: Optional[CallbackManagerForLLMRun] = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        stream = self.client.generate(**self._request(messages, stop, kwargs))
        try:
            for piece in stream:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            yield self._last_chunk(stream.result, self._name())
        finally:
            if not stream.done:  # the caller stopped reading: stop the server's generation too
                stream.cancel()

    async def _astream(self, messages: list[BaseMessage], stop: Optional[list[str]] = None,
                       run_manager: Optional[AsyncCallbackManagerForLLMRun] = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        stream = self.client.aio.generate(**self._request(messages, stop, kwargs))
        try:
            async for piece in stream:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    await run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
            yield self._last_chunk(await stream.result(), await self._aname())
        finally:
            if not stream.done:
                stream.cancel()

    def _last_chunk(self, result: GenerationResult, name: str) -> ChatGenerationChunk:
        """The usage, citations and finish reason, once, on a last chunk of no text."""
        usage, meta = self._final(result, name)
        message = AIMessageChunk(content="", usage_metadata=usage, response_metadata=meta, chunk_position="last")
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": result.finish_reason})
