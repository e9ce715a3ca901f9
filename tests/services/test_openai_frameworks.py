"""The HTTP API driven by the frameworks' own OpenAI-protocol clients, unmodified, as users point
them at vLLM or llama.cpp's server: LangChain's `ChatOpenAI` / `OpenAIEmbeddings`
(langchain-openai) and LlamaIndex's `OpenAILike` / `OpenAILikeEmbedding`. One real server for the
module (test_http_api's `api` fixture: an API key, a `facts` collection); every greedy text must
equal what gRPC Generate gives for the same request on the same server.

What the clients cannot do here, and why (README, "OpenAI-compatible HTTP API"):
- ChatOpenAI keeps only OpenAI's own reply fields, so the `memlm` extension (citations, timings)
  is dropped; the request side (`extra_body={"memlm": ...}`) works. The openai client it holds
  (`llm.root_client`) returns the extension, and so does LlamaIndex (`response.raw.memlm`).
- OpenAIEmbeddings' default (check_embedding_ctx_length=True) tokenizes with tiktoken, which
  downloads its encoding at run time and then sends tiktoken's token ids, meaningless to the
  store's embedder; `check_embedding_ctx_length=False` sends the text, as for any non-OpenAI server.
"""
import asyncio

import numpy as np
import openai
import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from llama_index.core.llms import ChatMessage
from llama_index.embeddings.openai_like import OpenAILikeEmbedding
from llama_index.llms.openai_like import OpenAILike

from test_http_api import KEY, MODEL, api  # noqa: F401 - tests/services is on sys.path; `api`: this module's own server

pytestmark = [pytest.mark.server, pytest.mark.model]
EMBEDDER = "all-MiniLM-L6-v2"
QUESTION = "What is the capital of France?"
PASSKEY_QUESTION = "What is the pass key for the vault?"
RAG = {"memlm": {"collection": "facts", "memory": "rag", "k": 1}}


def _generate(api, n: int, prompt=None, messages=None, **fields):
    """(text, GenerationDone) of gRPC Generate on the module's server: greedy unless `fields` say otherwise."""
    stream = api.grpc.generate(prompt, messages=messages, memory=fields.pop("memory", "none"), max_new_tokens=n,
                               **fields)
    return "".join(stream), stream.result


def _chat_openai(api, **kw) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{api.http_url}/v1", api_key=KEY, model=MODEL, max_retries=0, timeout=120,
                      **{"temperature": 0, "max_tokens": 8, **kw})


def _openai_like(api, is_chat_model: bool, **kw) -> OpenAILike:
    # temperature=0 said explicitly: LlamaIndex's OpenAI classes send 0.1 when none is given.
    return OpenAILike(model=MODEL, api_base=f"{api.http_url}/v1", api_key=KEY, is_chat_model=is_chat_model,
                      context_window=1024, max_retries=0, timeout=120, **{"temperature": 0, "max_tokens": 8, **kw})


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# --- LangChain: ChatOpenAI -------------------------------------------------------------------------

def test_chat_openai_invoke_equals_grpc_generate_with_usage_metadata(api):
    llm = _chat_openai(api)
    reply = llm.invoke([SystemMessage("You are brief."), HumanMessage(QUESTION)])
    text, done = _generate(api, 8, messages=[{"role": "system", "content": "You are brief."}, *_user(QUESTION)])
    assert reply.content == text and text
    assert reply.usage_metadata["input_tokens"] == done.prompt_tokens
    assert reply.usage_metadata["output_tokens"] == done.completion_tokens
    assert reply.usage_metadata["total_tokens"] == done.prompt_tokens + done.completion_tokens
    meta = reply.response_metadata
    assert meta["model_name"] == MODEL and meta["id"].startswith("chatcmpl-")
    assert meta["finish_reason"] == {"length": "length", "eos": "stop"}[done.finish_reason]


def test_chat_openai_stream_joins_to_the_invoke_text_and_carries_usage(api):
    llm = _chat_openai(api)
    whole = llm.invoke(QUESTION)
    chunks = list(llm.stream(QUESTION, stream_usage=True))  # sends stream_options.include_usage
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert len([c for c in chunks if c.content]) >= 2  # token by token, not one block
    assert "".join(c.content for c in chunks) == whole.content
    merged = sum(chunks[1:], chunks[0])
    assert merged.usage_metadata == whole.usage_metadata
    assert [c.response_metadata["finish_reason"] for c in chunks if "finish_reason" in c.response_metadata] == [
        whole.response_metadata["finish_reason"]]
    # Without stream_usage (ChatOpenAI's default for a base_url not OpenAI's) the text is the same, no usage.
    plain = list(llm.stream(QUESTION))
    assert "".join(c.content for c in plain) == whole.content and all(c.usage_metadata is None for c in plain)


def test_chat_openai_batch_and_ainvoke_and_astream(api):
    llm = _chat_openai(api, max_tokens=6)
    questions = [QUESTION, "Name a primary colour.", "Say hello."]
    replies = llm.batch(questions)  # concurrent requests, batched by the engine: each its own greedy text
    assert [r.content for r in replies] == [_generate(api, 6, messages=_user(q))[0] for q in questions]

    async def both():
        reply = await llm.ainvoke(questions[1])
        streamed = [c.content async for c in llm.astream(questions[2])]
        return reply, streamed

    reply, streamed = asyncio.run(both())
    assert reply.content == replies[1].content and "".join(streamed) == replies[2].content


def test_chat_openai_honours_max_tokens_stop_and_temperature(api):
    short = _chat_openai(api, max_tokens=3).invoke("Tell me a long story.")
    assert short.usage_metadata["output_tokens"] == 3 and short.response_metadata["finish_reason"] == "length"

    llm = _chat_openai(api, max_tokens=12)
    whole = llm.invoke(QUESTION).content
    stop = whole.split()[2]  # a word from the middle of the greedy text
    stopped = llm.invoke(QUESTION, stop=[stop])
    assert stopped.content == _generate(api, 12, messages=_user(QUESTION), stop=[stop])[0]
    assert stop not in stopped.content and whole.startswith(stopped.content)
    assert stopped.response_metadata["finish_reason"] == "stop"

    def sample(seed: int) -> str:
        return _chat_openai(api, max_tokens=12, temperature=1.0, top_p=0.95, seed=seed).invoke(QUESTION).content

    first = sample(7)
    # ChatOpenAI's temperature, top_p and seed reach the sampler: the same text as gRPC with them.
    assert first == _generate(api, 12, messages=_user(QUESTION), temperature=1.0, top_p=0.95, seed=7)[0]
    assert any(sample(s) != whole for s in (8, 9)), "temperature 1 should move off the greedy text"


def test_chat_openai_fields_set_to_their_defaults_are_accepted(api):
    """What ChatOpenAI sends when a user sets fields to their defaults (n, logprobs=False, zero
    penalties, an empty logit_bias, service_tier, store, reasoning_effort "none", verbosity
    "medium"; user and parallel_tool_calls through model_kwargs): accepted, the greedy text unchanged."""
    llm = _chat_openai(api, n=1, logprobs=False, presence_penalty=0.0, frequency_penalty=0.0, logit_bias={},
                       top_p=1.0, service_tier="auto", store=False, reasoning_effort="none", verbosity="medium",
                       model_kwargs={"user": "u1", "parallel_tool_calls": False})
    # (response_format={"type": "text"} is accepted too, but ChatOpenAI then calls the openai client's
    # parse(), which raises LengthFinishReasonError on a reply cut by max_tokens, whatever the server.)
    assert llm.invoke(QUESTION).content == _generate(api, 8, messages=_user(QUESTION))[0]
    # What would change the reply is refused by name: the framework's BadRequestError.
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        _chat_openai(api, logprobs=True).invoke(QUESTION)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        _chat_openai(api).with_structured_output(None, method="json_mode").invoke(QUESTION)


def test_chat_openai_memlm_extension_through_extra_body(api):
    rag = _chat_openai(api, max_tokens=16, extra_body=RAG)
    reply = rag.invoke(PASSKEY_QUESTION)
    text, done = _generate(api, 16, messages=_user(PASSKEY_QUESTION), collection="facts", memory="rag", k=1)
    assert reply.content == text and "48213" in text
    assert reply.usage_metadata["input_tokens"] == done.prompt_tokens  # the retrieved chunk is in the prompt
    assert "".join(c.content for c in _chat_openai(api, max_tokens=16).stream(PASSKEY_QUESTION, extra_body=RAG)) == text
    # ChatOpenAI drops the reply's `memlm` field (citations, timings): it keeps OpenAI's own fields
    # only. The openai client it holds returns it.
    raw = rag.root_client.chat.completions.create(model=MODEL, messages=_user(PASSKEY_QUESTION), max_tokens=1,
                                                  extra_body=RAG)
    assert [c["doc_id"] for c in raw.memlm["citations"]] == ["passkey"]


def test_wrong_api_key_raises_the_frameworks_authentication_error(api):
    base = f"{api.http_url}/v1"
    calls = [
        lambda: ChatOpenAI(base_url=base, api_key="wrong", model=MODEL, max_retries=0).invoke(QUESTION),
        lambda: OpenAIEmbeddings(base_url=base, api_key="wrong", model=EMBEDDER, max_retries=0,
                                 check_embedding_ctx_length=False).embed_query("x"),
        lambda: OpenAILike(model=MODEL, api_base=base, api_key="wrong", is_chat_model=True, max_retries=0).complete("x"),
        lambda: OpenAILikeEmbedding(model_name=EMBEDDER, api_base=base, api_key="wrong",
                                    max_retries=0).get_text_embedding("x"),
    ]
    for call in calls:
        with pytest.raises(openai.AuthenticationError) as info:
            call()
        assert info.value.status_code == 401 and "API key" in info.value.body["message"]


# --- embeddings: OpenAIEmbeddings, OpenAILikeEmbedding ------------------------------------------

def test_framework_embeddings_equal_v1_embeddings(api):
    texts = ["The pass key for the vault is 48213.", "It rained all week in the valley."]
    with openai.OpenAI(base_url=f"{api.http_url}/v1", api_key=KEY, max_retries=0) as oai:
        def v1(inputs) -> np.ndarray:
            data = oai.embeddings.create(model=EMBEDDER, input=inputs, encoding_format="float").data
            return np.array([d.embedding for d in data], dtype=np.float32)  # (n, 384)

        # Compared call for call: a text embedded beside another differs from it embedded alone in the
        # last float32 bits (~1e-7: the padded batch sums in another order), so each gets its own call.
        want, alone = v1(texts), np.concatenate([v1(texts[0]), v1(texts[1])])
    assert want.shape == (2, 384) and np.allclose(want, alone, atol=1e-6)

    lc = OpenAIEmbeddings(base_url=f"{api.http_url}/v1", api_key=KEY, model=EMBEDDER, max_retries=0,
                          check_embedding_ctx_length=False)  # send text, not tiktoken ids (module docstring)
    assert np.array_equal(np.array(lc.embed_documents(texts), dtype=np.float32), want)
    assert np.array_equal(np.array(lc.embed_query(texts[0]), dtype=np.float32), alone[0])
    sized = OpenAIEmbeddings(base_url=f"{api.http_url}/v1", api_key=KEY, model=EMBEDDER, max_retries=0,
                             check_embedding_ctx_length=False, dimensions=384)  # the embedder's own size: accepted
    assert len(sized.embed_query(texts[1])) == 384

    li = OpenAILikeEmbedding(model_name=EMBEDDER, api_base=f"{api.http_url}/v1", api_key=KEY, max_retries=0)
    assert np.array_equal(np.array(li.get_text_embedding_batch(texts), dtype=np.float32), want)
    assert np.array_equal(np.array(li.get_query_embedding(texts[1]), dtype=np.float32), alone[1])


# --- LlamaIndex: OpenAILike ----------------------------------------------------------------------

def test_openai_like_chat_model_complete_chat_and_streams_equal_grpc(api):
    llm = _openai_like(api, is_chat_model=True)  # every call goes to /v1/chat/completions
    text, _ = _generate(api, 8, messages=_user(QUESTION))
    assert llm.complete(QUESTION).text == text
    assert "".join(r.delta or "" for r in llm.stream_complete(QUESTION)) == text
    messages = [ChatMessage(role="system", content="You are brief."), ChatMessage(role="user", content=QUESTION)]
    chat_text, _ = _generate(api, 8, messages=[{"role": "system", "content": "You are brief."}, *_user(QUESTION)])
    reply = llm.chat(messages)
    assert reply.message.content == chat_text and reply.message.role == "assistant"
    streamed = list(llm.stream_chat(messages))
    assert len([r for r in streamed if r.delta]) >= 2 and streamed[-1].message.content == chat_text
    assert asyncio.run(llm.achat(messages)).message.content == chat_text

    # The memlm extension both ways: extra_body in, and the reply's field on the raw openai object.
    rag = _openai_like(api, is_chat_model=True, max_tokens=16, additional_kwargs={"extra_body": RAG})
    reply = rag.chat([ChatMessage(role="user", content=PASSKEY_QUESTION)])
    assert reply.message.content == _generate(api, 16, messages=_user(PASSKEY_QUESTION), collection="facts",
                                            memory="rag", k=1)[0]
    assert [c["doc_id"] for c in reply.raw.memlm["citations"]] == ["passkey"]
    last = list(rag.stream_chat([ChatMessage(role="user", content=PASSKEY_QUESTION)]))[-1]  # the finish_reason chunk
    assert last.message.content == reply.message.content and last.raw.memlm["citations"] == reply.raw.memlm["citations"]


def test_openai_like_completion_model_complete_chat_and_streams_equal_grpc(api):
    llm = _openai_like(api, is_chat_model=False)  # every call goes to /v1/completions
    prompt = "The capital of France is"
    text, _ = _generate(api, 8, prompt=prompt)
    assert llm.complete(prompt).text == text
    assert "".join(r.delta or "" for r in llm.stream_complete(prompt)) == text
    # chat() on a completion model: LlamaIndex writes the messages into one prompt itself.
    messages = [ChatMessage(role="user", content=QUESTION)]
    chat_text, _ = _generate(api, 8, prompt=llm.messages_to_prompt(messages))
    assert llm.chat(messages).message.content == chat_text
    assert list(llm.stream_chat(messages))[-1].message.content == chat_text

    answer = llm.complete(PASSKEY_QUESTION, extra_body=RAG)  # extra_body per call
    assert answer.text == _generate(api, 8, prompt=PASSKEY_QUESTION, collection="facts", memory="rag", k=1)[0]
    assert answer.raw.memlm["citations"][0]["doc_id"] == "passkey"
