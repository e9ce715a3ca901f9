"""The Generation service with the real bundled model, over a real server."""
import time

import grpc
import pytest

from memlm.errors import DeadlineExceeded, InvalidArgument, NotFound, Unimplemented
from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc

STORY = "Once upon a time, in a land far away, there lived a dragon who"  # the model continues this at length
pytestmark = [pytest.mark.server, pytest.mark.model]

FACTS = [
    {"id": "passkey", "text": "The pass key for the vault is 48213. Remember it.", "metadata": {"kind": "secret"}},
    {"id": "weather", "text": "It rained all week in the valley and the rivers rose.", "metadata": {"kind": "news"}},
    {"id": "recipe", "text": "Mix two cups of flour with one cup of water to make dough.", "metadata": {"kind": "food"}},
]


def test_none_mode_streams_tokens(client):
    stream = client.generate("The capital of France is", memory="none", max_new_tokens=8)
    pieces = list(stream)
    result = stream.result
    assert len(pieces) >= 2, "tokens should arrive as separate deltas"
    assert "".join(pieces) == result.text
    assert result.completion_tokens >= 1 and result.finish_reason in {"length", "eos"}
    assert result.citations == ()
    assert "Paris" in result.text
    assert result.timings.total_ms >= result.timings.time_to_first_token_ms > 0


def test_rag_mode_answers_from_memory_with_citations(client, collection):
    client.ingest(FACTS, collection=collection)
    stream = client.generate(
        "What is the pass key for the vault?", collection=collection, memory="rag", k=2, max_new_tokens=12
    )
    text = "".join(stream)
    result = stream.result
    assert "48213" in text
    assert result.citations[0].doc_id == "passkey"
    assert len(result.citations) <= 2 and result.timings.retrieval_ms > 0
    # The same question without memory cannot know the key.
    plain = client.generate("What is the pass key for the vault?", memory="none", max_new_tokens=12)
    assert "48213" not in plain.text


def test_rag_filter_limits_citations(client, collection):
    client.ingest(FACTS, collection=collection)
    stream = client.generate("What happened?", collection=collection, memory="rag", k=3, filter={"kind": "news"},
                             max_new_tokens=4)
    assert {c.doc_id for c in stream.result.citations} == {"weather"}


def test_rag_search_mode_per_request(client, collection):
    client.ingest(FACTS, collection=collection)
    # lexical: only the chunks sharing a word with the prompt ("dough") are found and cited
    stream = client.generate("How is dough made?", collection=collection, memory="rag", k=3,
                             search_mode="lexical", max_new_tokens=4)
    assert [c.doc_id for c in stream.result.citations] == ["recipe"]
    dense = client.generate("How is dough made?", collection=collection, memory="rag", k=3,
                            search_mode="dense", max_new_tokens=4)
    assert len(dense.result.citations) == 3 and dense.result.citations[0].doc_id == "recipe"
    with pytest.raises(InvalidArgument, match="unknown search mode 'semantic'"):
        client.generate("x", collection=collection, memory="rag", search_mode="semantic", max_new_tokens=2).result


def test_chat_messages_and_stop_sequences(client):
    stream = client.generate(
        messages=[{"role": "user", "content": "Count from 1 to 10 separated by commas."}],
        memory="none", max_new_tokens=40, stop=["5"],
    )
    text = "".join(stream)
    assert "5" not in text and stream.result.finish_reason == "stop"
    assert "4" in text


def test_seeded_sampling_is_reproducible(client):
    kw = dict(memory="none", max_new_tokens=10, temperature=1.0, top_p=0.95)
    a = client.generate("Once upon a time", seed=7, **kw).text
    b = client.generate("Once upon a time", seed=7, **kw).text
    assert a == b


def test_overlong_prompt_is_truncated_not_a_crash(client):
    prompt = "word " * 3000 + "\nThe capital of France is"  # far beyond the server's 1024-token context
    result = client.generate(prompt, memory="none", max_new_tokens=4).result
    assert result.truncated_prompt_tokens > 0
    assert result.prompt_tokens + 4 <= 1024
    # The server keeps serving.
    assert client.generate("Hello", memory="none", max_new_tokens=2).result.completion_tokens >= 1


def test_generation_errors(server, client):
    with pytest.raises(InvalidArgument, match="collection"):
        list(client.generate("hi", memory="rag", collection=""))
    with pytest.raises(NotFound, match="no-such"):
        list(client.generate("hi", memory="rag", collection="no-such"))
    with pytest.raises(InvalidArgument, match="memory mode"):
        client.generate("hi", memory="telepathy")
    with pytest.raises(Unimplemented, match="rmt"):
        list(client.generate("hi", memory="rmt", collection="anything"))
    with grpc.insecure_channel(server.address) as channel:
        stub = pb_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", memory=99), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "memory mode" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(memory=pb.MEMORY_MODE_NONE), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(pb.GenerateRequest(prompt="hi", max_new_tokens=-3), timeout=30))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "max_new_tokens" in info.value.details()


def test_cancel_and_deadline_stop_generation(client):
    stream = client.generate(STORY, memory="none", max_new_tokens=400)
    first = next(iter(stream))
    assert first
    stream.cancel()
    with pytest.raises(DeadlineExceeded):
        list(client.generate(STORY, memory="none", max_new_tokens=400, timeout=1.5))
    # A cancelled or expired generation frees the model at once: the next request runs promptly.
    started = time.perf_counter()
    result = client.generate("Hello", memory="none", max_new_tokens=2).result
    assert result.completion_tokens >= 1
    assert time.perf_counter() - started < 20


def test_search_is_not_stalled_by_generation(client, collection):
    client.ingest(FACTS, collection=collection)
    stream = client.generate(STORY, memory="none", max_new_tokens=120)
    next(iter(stream))  # generation is running now
    started = time.perf_counter()
    for _ in range(5):
        client.search("vault", collection=collection, k=1)
    elapsed = time.perf_counter() - started
    stream.cancel()
    assert elapsed < 5, f"5 searches took {elapsed:.1f} s while a generation ran"
