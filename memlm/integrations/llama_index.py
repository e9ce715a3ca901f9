"""LlamaIndex components over memlm: a retriever, a vector store and an LLM.

    from llama_index.core import Document, VectorStoreIndex
    from memlm.integrations.llama_index import MemlmLLM, MemlmVectorStore, ServerSideEmbedding

    store = MemlmVectorStore(client=memlm.Client(), collection="kb")       # made if missing
    index = VectorStoreIndex.from_vector_store(store, embed_model=ServerSideEmbedding())
    index.insert(Document(text=open("guide.md").read(), id_="guide.md"))  # again: an upsert
    engine = index.as_query_engine(llm=MemlmLLM(client=client, max_tokens=128), similarity_top_k=4)
    print(engine.query("How do I rotate keys?"))

Embeddings: memlm embeds on the server (the collection's embedding model) when it stores and
when it searches, and the wire has no embeddings call. So the store sets `is_embedding_query =
False` (LlamaIndex's retrievers then send the query text, `query_str`, which the server embeds),
and `ServerSideEmbedding` is the embed model to give VectorStoreIndex: it returns empty vectors
without computing anything, since the store does not use them (a node that arrives with a real
embedding from elsewhere gets a warning: it is not used either).

MemlmVectorStore: one memlm document per node (the node id kept), the node's text as the
document text (what the server embeds; LlamaIndex's metadata is not embedded) and the node
rebuilt from `_node_content` as LlamaIndex's own stores keep it. `add` replaces what was stored
for each ref_doc_id it is given (`replace_ref_docs`): it lists the ref doc's stored nodes (every
page of a ListDocuments filtered on ref_doc_id) and deletes those not among the new ones, so
inserting the same Document again, or re-running an IngestionPipeline, upserts instead of
duplicating, and a node stored with the same id, text and metadata is left as it is (not
re-embedded, however many nodes the ref doc has). Node ids stay the same only when the splitter
makes the same ids (`id_func`, or a docstore); new ids are new documents, embedded. All nodes of
one ref_doc_id must come in one `add` call (VectorStoreIndex sends up to 2048 nodes per call).
`delete(ref_doc_id)` is one delete by filter; `delete_nodes` / `get_nodes` take node ids,
MetadataFilters, or both (the ids that match); `clear()` deletes every node (the collection and
its settings stay). MetadataFilters: EQ, NE, IN, NIN, ANY, CONTAINS under AND/OR/NOT
(memlm/integrations/filters.py); `doc_ids` filters on ref_doc_id. Needs llama-index-core
(`pip install memlm[llama-index]`).

MemlmLLM: memlm's Generate; chat goes over the served model's chat template (not a prompt made
by LlamaIndex), completion is plain text in and out. With a collection it reads memory itself.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence, Union

from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.base.llms.types import (
    ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen, CompletionResponse, CompletionResponseAsyncGen,
    CompletionResponseGen, LLMMetadata, MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CallbackManager
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import BaseNode, MetadataMode, NodeRelationship, NodeWithScore, QueryBundle, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore, MetadataFilters, VectorStoreQuery, VectorStoreQueryMode, VectorStoreQueryResult,
)
from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict

from memlm.async_client import AsyncClient
from memlm.client import Client, DocumentHit
from memlm.engine import GenerationResult
from memlm.errors import InvalidArgument
from memlm.index.filters import matches
from memlm.index.types import Condition, Filter, SearchHit, StoredDocument
from memlm.integrations.filters import from_llama_index

# Keys LlamaIndex's node_to_metadata_dict adds beside the node's own metadata.
_NODE_KEYS = ("_node_content", "_node_type", "document_id", "doc_id", "ref_doc_id")


class ServerSideEmbedding(BaseEmbedding):
    """The embed model for a VectorStoreIndex over MemlmVectorStore: memlm embeds on the server,
    so this computes nothing and returns empty vectors, which the store does not read."""

    model_name: str = "memlm-server-side"

    @classmethod
    def class_name(cls) -> str:
        return "ServerSideEmbedding"

    def _get_query_embedding(self, query: str) -> list[float]:
        return []

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return []

    def _get_text_embedding(self, text: str) -> list[float]:
        return []

    def _get_text_embeddings(self, texts: list[str]) -> list[list[float]]:
        return [[] for _ in texts]


def _node_from_hit(h: DocumentHit) -> BaseNode:
    if "_node_content" in h.metadata:  # stored by MemlmVectorStore: the node as it was
        return metadata_dict_to_node(h.metadata, text=h.text)
    return TextNode(id_=h.id, text=h.text, metadata=h.metadata,
                    relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=h.id)})


def _ref_doc_filter(ref_doc_id: str) -> Filter:
    return Filter(must=(Condition(key="ref_doc_id", equals=ref_doc_id),))


_QUERY_MODES = {
    VectorStoreQueryMode.DEFAULT: None,  # the store's `mode`
    VectorStoreQueryMode.HYBRID: "hybrid",
    VectorStoreQueryMode.SPARSE: "lexical",
    VectorStoreQueryMode.TEXT_SEARCH: "lexical",
}


class MemlmVectorStore(BasePydanticVectorStore):
    """A LlamaIndex vector store over one memlm collection (created with `collection_settings`,
    e.g. chunk_tokens=256, if missing). `mode`: how a DEFAULT query ranks ("dense", "hybrid",
    "lexical"); HYBRID and SPARSE / TEXT_SEARCH queries ask for hybrid and lexical."""

    stores_text: bool = True
    is_embedding_query: bool = False  # the server embeds query_str
    flat_metadata: bool = True  # memlm metadata values are scalars or lists of scalars
    collection: str
    mode: Optional[str] = "dense"
    replace_ref_docs: bool = True

    _client: Client = PrivateAttr()
    _aclient: AsyncClient = PrivateAttr()
    _warned: bool = PrivateAttr(default=False)

    def __init__(self, client: Client, collection: str, *, mode: Optional[str] = "dense",
                 replace_ref_docs: bool = True, async_client: Optional[AsyncClient] = None,
                 **collection_settings: Any):
        super().__init__(collection=collection, mode=mode, replace_ref_docs=replace_ref_docs)
        self._client = client
        self._aclient = async_client or client.aio
        client.create_collection(collection, if_not_exists=True, **collection_settings)

    @classmethod
    def class_name(cls) -> str:
        return "MemlmVectorStore"

    @property
    def client(self) -> Client:
        return self._client

    # --- writing ---

    def _documents(self, nodes: Sequence[BaseNode]) -> list[dict[str, Any]]:
        docs = []
        for node in nodes:
            if node.embedding and not self._warned:
                self._warned = True
                warnings.warn("MemlmVectorStore does not use node embeddings: memlm embeds node text on the server "
                              "with the collection's embedding model", UserWarning, stacklevel=4)
            metadata = node_to_metadata_dict(node, remove_text=True, flat_metadata=self.flat_metadata)
            docs.append({"id": node.node_id, "text": node.get_content(metadata_mode=MetadataMode.NONE),
                         "metadata": metadata})
        return docs

    def add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        """Store the nodes (an id already stored is replaced; one stored with the same text and
        metadata is left as it is); with `replace_ref_docs`, first delete the nodes stored before
        for each of their ref_doc_ids that are not among them."""
        docs = self._documents(nodes)
        if kwargs.pop("replace_ref_docs", self.replace_ref_docs):
            keep = {d["id"] for d in docs}
            for ref in sorted({n.ref_doc_id for n in nodes if n.ref_doc_id}):
                self._delete_stale(ref, keep)
        self._client.ingest(docs, collection=self.collection, **kwargs)
        return [d["id"] for d in docs]

    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        docs = self._documents(nodes)
        if kwargs.pop("replace_ref_docs", self.replace_ref_docs):
            keep = {d["id"] for d in docs}
            for ref in sorted({n.ref_doc_id for n in nodes if n.ref_doc_id}):
                await self._adelete_stale(ref, keep)
        await self._aclient.ingest(docs, collection=self.collection, **kwargs)
        return [d["id"] for d in docs]

    def _delete_stale(self, ref_doc_id: str, keep: set[str]) -> None:
        """Delete the ref doc's stored nodes whose ids are not in `keep`, a page of its listing at a
        time (a page's ids fit one Delete; later pages start after it, so deleting does not move them)."""
        after = None
        while True:
            page = self._client.list_documents_page(collection=self.collection, filter=_ref_doc_filter(ref_doc_id),
                                                    after=after, with_text=False)
            if stale := [d.id for d in page.documents if d.id not in keep]:
                self._client.delete(stale, collection=self.collection)
            if page.next_after is None:
                return
            after = page.next_after

    async def _adelete_stale(self, ref_doc_id: str, keep: set[str]) -> None:
        after = None
        while True:
            page = await self._aclient.list_documents_page(
                collection=self.collection, filter=_ref_doc_filter(ref_doc_id), after=after, with_text=False)
            if stale := [d.id for d in page.documents if d.id not in keep]:
                await self._aclient.delete(stale, collection=self.collection)
            if page.next_after is None:
                return
            after = page.next_after

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the ref doc (one delete by filter: all of them, or none)."""
        self._client.delete(filter=_ref_doc_filter(ref_doc_id), collection=self.collection)

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await self._aclient.delete(filter=_ref_doc_filter(ref_doc_id), collection=self.collection)

    def delete_nodes(self, node_ids: Optional[list[str]] = None, filters: Optional[MetadataFilters] = None,
                     **delete_kwargs: Any) -> None:
        """Delete the nodes with these ids, the nodes matching `filters`, or with both the ids that
        match (in one transaction). Neither: InvalidArgument (`clear()` deletes every node)."""
        self._client.delete(**_selection(node_ids, from_llama_index(filters)), collection=self.collection)

    async def adelete_nodes(self, node_ids: Optional[list[str]] = None, filters: Optional[MetadataFilters] = None,
                            **delete_kwargs: Any) -> None:
        await self._aclient.delete(**_selection(node_ids, from_llama_index(filters)), collection=self.collection)

    def clear(self) -> None:
        """Delete every node of the collection (it stays, with its settings)."""
        self._client.delete(all=True, collection=self.collection)

    async def aclear(self) -> None:
        await self._aclient.delete(all=True, collection=self.collection)

    # --- reading ---

    def get_nodes(self, node_ids: Optional[list[str]] = None, filters: Optional[MetadataFilters] = None) -> list[BaseNode]:
        """The nodes with these ids (those stored, in the order asked), the nodes matching `filters`
        (every page, in id order), or with both the ids that match."""
        f = from_llama_index(filters)
        _selection(node_ids, f)  # neither: InvalidArgument
        if node_ids:
            found = self._client.get(list(node_ids), collection=self.collection, missing_ok=True)
        else:
            found = list(self._client.list_documents(collection=self.collection, filter=f))
        return _nodes(found, f if node_ids else None)

    async def aget_nodes(self, node_ids: Optional[list[str]] = None,
                         filters: Optional[MetadataFilters] = None) -> list[BaseNode]:
        f = from_llama_index(filters)
        _selection(node_ids, f)
        if node_ids:
            found = await self._aclient.get(list(node_ids), collection=self.collection, missing_ok=True)
        else:
            found = [d async for d in self._aclient.list_documents(collection=self.collection, filter=f)]
        return _nodes(found, f if node_ids else None)

    def _search_args(self, query: VectorStoreQuery) -> dict[str, Any]:
        if query.node_ids:
            raise InvalidArgument("MemlmVectorStore cannot restrict a query to node ids (memlm filters metadata)")
        if query.mode not in _QUERY_MODES:
            raise InvalidArgument(f"query mode {query.mode.value!r} is not supported; expected default, hybrid, sparse or text_search")
        if query.query_str:
            text: Union[str, list[float]] = query.query_str
        elif query.query_embedding:  # a vector of the collection's embedding model (384-d by default)
            text = query.query_embedding
        else:
            raise InvalidArgument("a VectorStoreQuery needs query_str (memlm embeds it) or query_embedding")
        f = from_llama_index(query.filters) or Filter()
        if query.doc_ids:
            f = Filter(must=(*f.must, Condition(key="ref_doc_id", any_of=tuple(query.doc_ids))),
                       should=f.should, must_not=f.must_not)
        mode = _QUERY_MODES[query.mode] or self.mode
        if not isinstance(text, str):
            mode = "dense"
        return {"query": text, "collection": self.collection, "k": query.similarity_top_k,
                "filter": None if f.is_empty() else f, "mode": mode}

    @staticmethod
    def _result(hits: Sequence[DocumentHit]) -> VectorStoreQueryResult:
        return VectorStoreQueryResult(nodes=[_node_from_hit(h) for h in hits], similarities=[h.score for h in hits],
                                      ids=[h.id for h in hits])

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """The similarity_top_k best nodes, whole, each scored by its best chunk."""
        args = self._search_args(query)
        return self._result(self._client.search_documents(args.pop("query"), **args))

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        args = self._search_args(query)
        return self._result(await self._aclient.search_documents(args.pop("query"), **args))


def _selection(node_ids: Optional[list[str]], f: Optional[Filter]) -> dict[str, Any]:
    """The ids and filter of a get_nodes / delete_nodes call; InvalidArgument when it has neither
    (LlamaIndex callers mean "these nodes": an empty selection is a bug, not "all of them")."""
    if not node_ids and f is None:
        raise InvalidArgument("pass node_ids or filters (MemlmVectorStore.clear() deletes every node)")
    return {"ids": list(node_ids) if node_ids else None, "filter": f}


def _nodes(found: Sequence[StoredDocument], f: Optional[Filter]) -> list[BaseNode]:
    """Stored documents as nodes; with `f`, only those whose metadata matches it (the store's own
    evaluation, memlm.index.filters.matches: ids and filters together)."""
    return [_node_from_hit(DocumentHit(d.id, d.text, dict(d.metadata), 0.0, ()))
            for d in found if f is None or matches(d.metadata, f)]


# ---------------------------------------------------------------- the retriever


class MemlmRetriever(BaseRetriever):
    """Chunks of a memlm collection as NodeWithScore: each a TextNode `"{doc_id}#{chunk_index}"`
    with the chunk text, the document's metadata plus `doc_id`, `chunk_id` and `chunk_index`, and
    the document as its source (`node.ref_doc_id`). `filters`: MetadataFilters or a memlm filter
    dict; `mode`: "dense", "lexical", "hybrid" or None (the server's default)."""

    def __init__(self, client: Client, collection: str, *, similarity_top_k: int = 4,
                 filters: Union[None, MetadataFilters, dict[str, Any]] = None, mode: Optional[str] = None,
                 callback_manager: Optional[CallbackManager] = None):
        super().__init__(callback_manager=callback_manager)
        self.client, self.collection, self.similarity_top_k, self.mode = client, collection, similarity_top_k, mode
        self.filter = from_llama_index(filters) if isinstance(filters, MetadataFilters) else filters

    def _args(self) -> dict[str, Any]:
        return {"collection": self.collection, "k": self.similarity_top_k, "filter": self.filter, "mode": self.mode}

    @staticmethod
    def _node(h: SearchHit) -> NodeWithScore:
        source = h.metadata.get("ref_doc_id", h.doc_id) if "_node_content" in h.metadata else h.doc_id
        metadata = {k: v for k, v in h.metadata.items() if k not in _NODE_KEYS}
        node = TextNode(
            id_=f"{h.doc_id}#{h.chunk_index}", text=h.text,
            metadata={**metadata, "doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk_index": h.chunk_index},
            relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=source)},
            start_char_idx=h.start, end_char_idx=h.end,
        )
        return NodeWithScore(node=node, score=h.score)

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [self._node(h) for h in self.client.search(query_bundle.query_str, **self._args())]

    async def _aretrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        return [self._node(h) for h in await self.client.asearch(query_bundle.query_str, **self._args())]


# ---------------------------------------------------------------- the LLM

_ROLES = {MessageRole.SYSTEM: "system", MessageRole.USER: "user", MessageRole.ASSISTANT: "assistant"}
if hasattr(MessageRole, "DEVELOPER"):  # newer llama-index-core: OpenAI's name for a system message
    _ROLES[MessageRole.DEVELOPER] = "system"


def _messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    out = []
    for m in messages:
        if m.role not in _ROLES:
            raise InvalidArgument(f"MemlmLLM takes system, user and assistant messages; got a {m.role.value!r} one "
                                  "(memlm has no tool calling)")
        out.append({"role": _ROLES[m.role], "content": m.content or ""})
    return out


def _extra(result: GenerationResult) -> dict[str, Any]:
    return {
        "citations": [{"doc_id": h.doc_id, "chunk_id": h.chunk_id, "chunk_index": h.chunk_index, "score": h.score,
                       "text": h.text, "metadata": h.metadata} for h in result.citations],
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


class MemlmLLM(CustomLLM):
    """memlm's Generate as a LlamaIndex LLM. `collection` with `memory` ("rag" by default when a
    collection is given, else "none") makes the model read memory itself; the chunks read are in
    `additional_kwargs["citations"]`, with the token counts. `context_window` None: the
    server's (ModelInfo, asked once)."""

    collection: str = ""
    memory: Optional[str] = None
    k: int = 0
    max_tokens: Optional[int] = Field(default=None, description="new tokens per call; None = the server's default")
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: list[str] = Field(default_factory=list)
    timeout: Optional[float] = None
    context_window: Optional[int] = None
    model_name: Optional[str] = None

    _client: Client = PrivateAttr()
    _info: Any = PrivateAttr(default=None)

    def __init__(self, client: Client, **kwargs: Any):
        super().__init__(**kwargs)
        self._client = client

    @classmethod
    def class_name(cls) -> str:
        return "MemlmLLM"

    def _model_info(self):
        if self._info is None:
            self._info = self._client.model_info(timeout=self.timeout)
        return self._info

    @property
    def metadata(self) -> LLMMetadata:
        info = None if (self.context_window and self.model_name) else self._model_info()
        return LLMMetadata(
            context_window=self.context_window or info.context_length,
            num_output=self.max_tokens or 256,  # what LlamaIndex leaves free in the prompt
            is_chat_model=True, model_name=self.model_name or info.name,
        )

    def _request(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        per_call = {n: kwargs.pop(n) for n in ("max_tokens", "temperature", "top_p", "seed", "stop") if n in kwargs}
        kwargs.pop("formatted", None)
        if kwargs:
            raise InvalidArgument(f"MemlmLLM got {', '.join(sorted(kwargs))}; it takes max_tokens, temperature, top_p, seed, stop per call")
        return dict(
            collection=self.collection, memory=self.memory or ("rag" if self.collection else "none"), k=self.k,
            max_new_tokens=per_call.get("max_tokens", self.max_tokens) or 0,
            temperature=per_call.get("temperature", self.temperature), top_p=per_call.get("top_p", self.top_p),
            seed=per_call.get("seed", self.seed), stop=[*self.stop, *per_call.get("stop", ())], timeout=self.timeout,
        )

    # --- completion: the prompt as plain text ---

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = self._client.generate(prompt, **self._request(kwargs)).result
        return CompletionResponse(text=result.text, raw=result, additional_kwargs=_extra(result))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        stream = self._client.generate(prompt, **self._request(kwargs))

        def gen() -> CompletionResponseGen:
            text = ""
            try:
                for piece in stream:
                    text += piece
                    yield CompletionResponse(text=text, delta=piece)
                result = stream.result
                yield CompletionResponse(text=text, delta="", raw=result, additional_kwargs=_extra(result))
            finally:
                if not stream.done:
                    stream.cancel()

        return gen()

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = await self._client.aio.generate(prompt, **self._request(kwargs)).result()
        return CompletionResponse(text=result.text, raw=result, additional_kwargs=_extra(result))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        stream = self._client.aio.generate(prompt, **self._request(kwargs))

        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            try:
                async for piece in stream:
                    text += piece
                    yield CompletionResponse(text=text, delta=piece)
                result = await stream.result()
                yield CompletionResponse(text=text, delta="", raw=result, additional_kwargs=_extra(result))
            finally:
                if not stream.done:
                    stream.cancel()

        return gen()

    # --- chat: the served model's chat template ---

    @staticmethod
    def _reply(text: str, delta: Optional[str] = None, result: Optional[GenerationResult] = None) -> ChatResponse:
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, raw=result,
                            additional_kwargs=_extra(result) if result is not None else {})

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = self._client.generate(messages=_messages(messages), **self._request(kwargs)).result
        return self._reply(result.text, result=result)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        stream = self._client.generate(messages=_messages(messages), **self._request(kwargs))

        def gen() -> ChatResponseGen:
            text = ""
            try:
                for piece in stream:
                    text += piece
                    yield self._reply(text, piece)
                yield self._reply(text, "", stream.result)
            finally:
                if not stream.done:
                    stream.cancel()

        return gen()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = await self._client.aio.generate(messages=_messages(messages), **self._request(kwargs)).result()
        return self._reply(result.text, result=result)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        stream = self._client.aio.generate(messages=_messages(messages), **self._request(kwargs))

        async def gen() -> ChatResponseAsyncGen:
            text = ""
            try:
                async for piece in stream:
                    text += piece
                    yield self._reply(text, piece)
                yield self._reply(text, "", await stream.result())
            finally:
                if not stream.done:
                    stream.cancel()

        return gen()
