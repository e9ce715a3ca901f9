"""The HTTP API's pure translation (services/openai_protocol.py), without a server: the error
mapping for every memlm status, finish reasons, stream chunks, the fields refused or ignored."""
import base64
import json

import numpy as np
import pytest

from memlm import errors
from memlm.engine import GenerationResult, Timings
from memlm.index.types import SearchHit
from memlm.services import openai_protocol as oa

LIMITS = oa.Limits(default_max_new_tokens=16, max_new_tokens_limit=64)


@pytest.mark.parametrize("exc, status, retry", [
    (errors.InvalidArgument("x"), 400, None),
    (errors.FailedPrecondition("x"), 400, None),
    (errors.NotFound("x"), 404, None),
    (errors.AlreadyExists("x"), 409, None),
    (errors.Unauthenticated("x"), 401, None),
    (errors.ResourceExhausted("x"), 429, None),  # also "too many generations in flight": worth a retry
    (errors.Unavailable("x"), 503, None),
    (errors.Unimplemented("x"), 501, "false"),
    (errors.DeadlineExceeded("x"), 504, None),
    (errors.MemlmError("x"), 500, "false"),
])
def test_every_memlm_status_has_an_http_status_and_openai_body(exc, status, retry):
    got, body, headers = oa.error_reply(exc, str(exc))
    assert got == status and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == exc.code.lower() and headers.get("x-should-retry") == retry
    assert ("WWW-Authenticate" in headers) == (status == 401)


def test_engine_messages_name_their_field_in_param():
    for message, param in (("temperature=-1.0 is out of range", "temperature"), ("k=0 is out of range", "memlm.k"),
                           ("max_new_tokens=9 is out of range", "max_tokens"), ("collection 'x' does not exist", None)):
        assert oa.error_reply(errors.InvalidArgument(message), message)[1]["error"]["param"] == param


def _chat(**fields):
    return oa.ChatCompletionBody.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_chat_body_becomes_a_generation_request():
    req = oa.chat_request(_chat(max_completion_tokens=5, temperature=0.5, top_p=0.9, seed=3, stop="END", user="u1",
                                metadata={"a": "b"}, n=1, logprobs=False, tools=[], response_format={"type": "text"},
                                memlm={"collection": "kb", "memory": "rag", "k": 2, "filter": {"lang": "en"},
                                       "search_mode": "dense"}),
                          LIMITS, "chatcmpl-1")
    assert req.messages[0].role == "user" and req.prompt is None and req.request_id == "chatcmpl-1"
    s = req.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.seed, s.stop) == (5, 0.5, 0.9, 3, ("END",))
    assert (req.collection, req.memory, req.k, req.search_mode) == ("kb", "rag", 2, "dense")
    assert req.filter.must[0].key == "lang"
    plain = oa.chat_request(_chat(messages=[{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                              {"type": "text", "text": "b"}]}]),
                            LIMITS, "id")
    assert plain.messages[0].role == "system" and plain.messages[0].content == "ab"
    assert (plain.memory, plain.sampling.max_new_tokens, plain.sampling.temperature) == ("none", 16, 0.0)


@pytest.mark.parametrize("fields, param", [
    ({"n": 3}, "n"),
    ({"max_tokens": 65}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"seed": -1}, "seed"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0]"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": [{"id": "1"}]}]}, "messages[0].tool_calls"),
    ({"memlm": {"collection": "kb"}}, "memlm.memory"),
    ({"memlm": {"memory": "rag", "collection": "kb", "filter": {"must": "x"}}}, "memlm.filter"),
])
def test_refused_fields_are_named(fields, param):
    with pytest.raises(oa.ParamError) as info:
        oa.chat_request(_chat(**fields), LIMITS, "id")
    assert info.value.param == param and oa.error_reply(info.value, str(info.value))[0] == 400


# What LangChain's ChatOpenAI and LlamaIndex's OpenAILike send when a user sets a field to its
# default (ChatOpenAI(n=1, logprobs=False, seed=...), model_kwargs={...}), and the defaults other
# servers' clients send: each is accepted and changes nothing.
NEUTRAL_FIELDS = dict(n=1, logprobs=False, top_logprobs=0, presence_penalty=0.0, frequency_penalty=0.0, logit_bias={},
                      parallel_tool_calls=False, user="u1", service_tier="auto", store=False, seed=7, top_p=1.0,
                      response_format={"type": "text"}, tools=None, tool_choice="none", reasoning_effort="none",
                      verbosity="medium", stream_options={"include_usage": True, "continuous_usage_stats": False})


def test_neutral_values_are_accepted_and_change_nothing():
    req = oa.chat_request(_chat(**NEUTRAL_FIELDS), LIMITS, "id")
    plain = oa.chat_request(_chat(seed=7), LIMITS, "id")
    assert req.sampling == plain.sampling and req.messages == plain.messages and req.memory == "none"
    text = oa.completion_request(oa.CompletionBody(prompt="p", logprobs=None, echo=False, best_of=1, suffix=None, n=1,
                                                   user="u"), LIMITS, "id")
    assert text.prompt == "p"


@pytest.mark.parametrize("fields, param", [
    ({"tool_choice": "auto"}, "tool_choice"),  # without tools, as vLLM: "When using `tool_choice`, `tools` must be set"
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"verbosity": "low"}, "verbosity"),
    ({"stream": True, "stream_options": {"continuous_usage_stats": True}}, "stream_options.continuous_usage_stats"),
])
def test_values_that_would_change_the_reply_are_refused(fields, param):
    with pytest.raises(oa.ParamError) as info:
        oa.chat_request(_chat(**fields), LIMITS, "id")
    assert info.value.param == param


def test_completions_logprobs_zero_is_refused():
    """/v1/completions' logprobs is a count; 0 still returns each sampled token's log-probability."""
    with pytest.raises(oa.ParamError) as info:
        oa.completion_request(oa.CompletionBody(prompt="p", logprobs=0), LIMITS, "id")
    assert info.value.param == "logprobs"
    assert oa.chat_request(_chat(logprobs=False), LIMITS, "id").memory == "none"  # chat's is a boolean


def test_completion_prompt_must_be_one_text():
    assert oa.completion_request(oa.CompletionBody(prompt=["one"]), LIMITS, "id").prompt == "one"
    for prompt in (["a", "b"], [1, 2, 3]):
        with pytest.raises(oa.ParamError, match="one prompt"):
            oa.completion_request(oa.CompletionBody(prompt=prompt), LIMITS, "id")


RESULT = GenerationResult(
    text="Paris.", finish_reason="eos", prompt_tokens=7, completion_tokens=3, truncated_prompt_tokens=1,
    citations=(SearchHit(chunk_id=5, doc_id="d", score=0.5, text="t", metadata={"k": 1}, chunk_index=0, start=0, end=1),),
    timings=Timings(total_ms=12.0),
)


def test_finish_reasons_and_the_completion_object():
    assert [oa.finish_reason(GenerationResult("", r)) for r in ("eos", "stop", "length")] == ["stop", "stop", "length"]
    chat = oa.Reply(chat=True, id="chatcmpl-x", created=1, model="m").completion(RESULT)
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["content"] == "Paris."
    assert chat["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert chat["memlm"]["citations"][0]["doc_id"] == "d" and chat["memlm"]["truncated_prompt_tokens"] == 1
    text = oa.Reply(chat=False, id="cmpl-x", created=1, model="m").completion(RESULT)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "Paris."


def test_stream_chunks():
    reply = oa.Reply(chat=True, id="c", created=1, model="m")
    parse = lambda event: json.loads(event.removeprefix("data: "))
    assert parse(reply.first_chunk(False))["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert parse(reply.delta_chunk("Pa", True))["usage"] is None
    last, usage = [parse(e) for e in reply.final_chunks(RESULT, True)]
    assert last["choices"][0]["finish_reason"] == "stop" and last["memlm"]["timings"]["total_ms"] == 12.0
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 10
    assert len(reply.final_chunks(RESULT, False)) == 1
    assert oa.Reply(chat=False, id="c", created=1, model="m").first_chunk(False) is None


def test_embedding_list_float_and_base64():
    rows = np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)  # (2, 4)
    floats = oa.embedding_list(rows, "float", "e", 5)
    assert np.array_equal(np.array([d["embedding"] for d in floats["data"]], dtype=np.float32), rows)
    b64 = oa.embedding_list(rows, "base64", "e", 5)
    decoded = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in b64["data"]])
    assert np.array_equal(decoded, rows) and b64["usage"] == {"prompt_tokens": 5, "total_tokens": 5}
    with pytest.raises(oa.ParamError, match="token ids"):
        oa.embedding_inputs(oa.EmbeddingBody(input=[1, 2]))
