"""ModelHost on the real bundled SmolLM2: generation semantics, streaming, cancellation,
context limits, rag and request validation. Short prompts and <= 24 new tokens keep it cheap."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from memlm.config import ModelSettings
from memlm.engine import ChatMessage, GenerationRequest, SamplingParams, TextDelta
from memlm.errors import FailedPrecondition, InvalidArgument, NotFound, Unimplemented
from memlm.generation import GenerationOutcome, generate_tokens

pytestmark = pytest.mark.model

PROMPT = "The three primary colours are"
COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # greedy decoding keeps counting: no early EOS


def greedy(prompt: str = PROMPT, n: int = 16, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=n, **kw))


def test_info(host):
    info = host.info()
    assert (info.context_length, info.layers, info.vocab_size) == (8192, 30, 49152)
    assert set(info.supported_memory_modes) == {"none", "rag", "retro"}  # knn, landmark: no KV memory folder here


@pytest.fixture(scope="module")
def hf_model(bundled_model_dir):
    """transformers' LlamaForCausalLM of the bundled model: the reference the served owned model must equal."""
    from memlm.models.loading import load_causal_lm

    return load_causal_lm(bundled_model_dir)


def test_the_bundled_model_is_served_on_memlm_model(host):
    from memlm.model import Llama

    assert isinstance(host.model, Llama)


def test_greedy_equals_hf_generate_token_for_token(host, hf_model, collect):
    ids = host.tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        hf = hf_model.generate(**ids, do_sample=False, max_new_tokens=16)[0, ids.input_ids.shape[1] :].tolist()
    *_, outcome = generate_tokens(
        host.model, host.tokenizer, ids.input_ids[0].tolist(), SamplingParams(max_new_tokens=16), threading.Event()
    )
    assert isinstance(outcome, GenerationOutcome)
    assert list(outcome.token_ids) == hf

    deltas, result = collect(host, greedy())
    assert result.text == host.tokenizer.decode(hf, skip_special_tokens=True)
    assert "".join(deltas) == result.text  # streamed deltas add up to the final text
    assert result.completion_tokens == len(hf)
    assert result.prompt_tokens == ids.input_ids.shape[1]
    assert collect(host, greedy())[1].text == result.text  # deterministic
    t = result.timings
    assert 0 < t.prefill_ms <= t.time_to_first_token_ms <= t.total_ms and t.decode_ms > 0


def test_seeded_sampling_is_reproducible(host, collect):
    def run(seed):
        return collect(host, greedy("Once upon a time", 16, temperature=1.0, top_p=0.95, seed=seed))[1].text

    first = run(1)
    assert run(1) == first
    assert run(2) != first


def test_stop_sequence_is_never_streamed(host, collect):
    full = collect(host, greedy(n=24))[1].text
    assert len(full) > 12, full
    stop = full[6:11]  # a piece of what greedy decoding writes, so the stop is certain to occur
    deltas, result = collect(host, greedy(n=24, stop=("never-appears", stop)))
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert "".join(deltas) == result.text
    assert all(stop not in d for d in deltas)


def test_max_new_tokens_finishes_with_length(host, collect):
    deltas, result = collect(host, greedy(n=3))
    assert result.finish_reason == "length"
    assert result.completion_tokens == 3
    assert "".join(deltas) == result.text


def test_chat_messages_use_the_template(host, collect):
    request = GenerationRequest(messages=(ChatMessage("user", "Say hello."),), sampling=SamplingParams(max_new_tokens=8))
    _, result = collect(host, request)
    assert result.finish_reason in ("eos", "length") and result.text
    templated = host.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Say hello."}], tokenize=False, add_generation_prompt=True
    )
    assert result.prompt_tokens == len(host.tokenizer(templated, add_special_tokens=False).input_ids)


def test_closing_the_stream_stops_the_worker(host, collect):
    async def two_deltas_then_close():
        stream = host.generate(greedy(COUNTING, 400))
        seen = 0
        async for event in stream:
            seen += isinstance(event, TextDelta)
            if seen == 2:
                break
        await stream.aclose()
        assert seen == 2

    asyncio.run(two_deltas_then_close())
    # Had the worker gone on to 400 tokens (~30 s), this request would queue behind it.
    t0 = time.perf_counter()
    _, result = collect(host, greedy(n=4))
    assert result.finish_reason == "length"
    assert time.perf_counter() - t0 < 10


def test_deadline_cancels_generation(host, collect):
    async def with_deadline():
        async def consume():
            async for _ in host.generate(greedy(COUNTING, 400)):
                pass

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(consume(), timeout=0.5)

    asyncio.run(with_deadline())
    t0 = time.perf_counter()
    assert collect(host, greedy(n=4))[1].finish_reason == "length"
    assert time.perf_counter() - t0 < 10


def test_event_loop_never_blocks_and_requests_queue(host):
    async def main():
        gaps, stop = [], asyncio.Event()

        async def ticker():
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        async def one(prompt):
            return [e async for e in host.generate(greedy(prompt, 6))][-1]

        tick = asyncio.create_task(ticker())
        results = await asyncio.gather(one("Hello, my name is"), one("The weather today is"))
        stop.set()
        await tick
        return results, max(gaps)

    results, worst_gap = asyncio.run(main())
    assert [r.finish_reason for r in results] == ["length", "length"]
    assert worst_gap < 0.25, f"the event loop stalled for {worst_gap:.3f} s"


def test_over_long_prompt_is_left_truncated(host, collect):
    from memlm.host import ModelHost

    small = ModelHost(host.model, host.tokenizer, ModelSettings(max_context_tokens=256))
    try:
        assert small.info().context_length == 256
        prompt = " ".join(f"item{i}" for i in range(200)) + " The end."
        n = len(host.tokenizer(prompt).input_ids)
        assert n > 256
        deltas, result = collect(small, greedy(prompt, 8))
        assert result.prompt_tokens == 256 - 8
        assert result.truncated_prompt_tokens == n - (256 - 8)
        assert result.finish_reason in ("eos", "length", "stop")
        with pytest.raises(InvalidArgument, match="max_new_tokens=256.*256"):
            collect(small, greedy(prompt, 256))
    finally:
        asyncio.run(small.close())


def test_rag_answers_from_the_retrieved_chunk(host, memory, collect):
    request = GenerationRequest(
        prompt="What is the pass key?", memory="rag", collection="notes", k=2,
        sampling=SamplingParams(max_new_tokens=16),
    )
    memory.calls.clear()
    _, result = collect(host, request)
    assert memory.pass_key in result.text
    assert [h.chunk_id for h in result.citations] == [0, 1]
    assert memory.calls == [dict(collection="notes", query="What is the pass key?", k=2, filter=None, mode=None)]  # no search_mode: the reader's default
    assert result.timings.retrieval_ms > 0

    # Without the memory the model cannot know the key.
    _, plain = collect(host, GenerationRequest(prompt="What is the pass key?", sampling=SamplingParams(max_new_tokens=16)))
    assert memory.pass_key not in plain.text and plain.citations == ()


def test_store_errors_propagate(host, collect):
    with pytest.raises(NotFound, match="nope"):
        collect(host, GenerationRequest(prompt="hi", memory="rag", collection="nope"))


def _request(**kw) -> GenerationRequest:
    sampling = {k: kw.pop(k) for k in ("max_new_tokens", "temperature", "top_p", "stop") if k in kw}
    kw.setdefault("prompt", "hi")
    return GenerationRequest(sampling=SamplingParams(**sampling), **kw)


@pytest.mark.parametrize(
    "request_, error, message",
    [
        (_request(messages=(ChatMessage("user", "hi"),)), InvalidArgument, "exactly one of"),
        (_request(prompt=None), InvalidArgument, "exactly one of"),
        (_request(prompt="  "), InvalidArgument, "prompt"),
        (_request(prompt=None, messages=()), InvalidArgument, "messages"),
        (_request(prompt=None, messages=(ChatMessage("robot", "hi"),)), InvalidArgument, "robot"),
        (_request(memory="knn", collection="notes"), FailedPrecondition, "knn.*place for its KV memory"),
        (_request(memory="rmt", collection="notes"), Unimplemented, "not implemented yet"),
        (_request(memory="rag"), InvalidArgument, "collection"),
        (_request(memory="rag", collection="notes", k=0), InvalidArgument, "k=0"),
        (_request(memory="rag", collection="notes", k=101), InvalidArgument, "k=101"),
        (_request(max_new_tokens=0), InvalidArgument, "max_new_tokens=0"),
        (_request(max_new_tokens=4096), InvalidArgument, "max_new_tokens=4096.*2048"),
        (_request(temperature=-0.5), InvalidArgument, "temperature=-0.5"),
        (_request(temperature=float("nan")), InvalidArgument, "temperature=nan"),
        (_request(top_p=0.0), InvalidArgument, "top_p=0.0"),
        (_request(top_p=1.5), InvalidArgument, "top_p=1.5"),
        (_request(stop=("",)), InvalidArgument, "stop"),
    ],
)
def test_bad_requests_raise_before_anything_is_yielded(host, request_, error, message):
    async def first_event():
        stream = host.generate(request_)
        try:
            return await stream.__anext__()
        finally:
            await stream.aclose()

    with pytest.raises(error, match=message):
        asyncio.run(first_event())


def test_rag_without_a_memory_store_is_a_failed_precondition(host, collect):
    from memlm.host import ModelHost

    bare = ModelHost(host.model, host.tokenizer, ModelSettings())
    try:
        with pytest.raises(FailedPrecondition, match="memory store"):
            collect(bare, _request(memory="rag", collection="notes"))
    finally:
        asyncio.run(bare.close())
