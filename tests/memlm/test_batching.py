"""Continuous batching (memlm.scheduler, memlm.model.RaggedBatch, memlm.prefix_cache).

A ragged forward pass equals each sequence's own forward (a small random Llama, fp32); on the real
bundled model (dense fp32, the session host of tests/memlm/conftest.py and hosts sharing its
weights) concurrent requests get exactly the text each gets alone, greedy and seeded, while
joining and leaving a running batch, cancelled, stopped, chunk-prefilled or served from the prefix
cache; the in-flight limit answers RESOURCE_EXHAUSTED.
"""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from prometheus_client import REGISTRY

from memlm.config import ModelSettings
from memlm.engine import GenerationRequest, GenerationResult, SamplingParams, TextDelta
from memlm.errors import ResourceExhausted
from memlm.generation import generate_tokens
from memlm.model import Llama, LlamaConfig
from memlm.model.generate import prefill, ragged_step
from memlm.model.llama import RaggedBatch
from memlm.prefix_cache import PrefixCache

PROMPTS = [
    "The three primary colours are",
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "Write a haiku about the sea.\n",
    "def fibonacci(n):",
    "The capital of France is Paris. The capital of Italy is",
]


def tiny_llama() -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, dim=64, intermediate_size=96, n_layers=3, n_heads=6, n_kv_heads=2,
                         head_dim=16, max_position_embeddings=128)
    model = Llama(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


@torch.inference_mode()
def test_a_ragged_pass_equals_each_sequence_alone():
    model = tiny_llama()
    # three sequences: decoding at 9, a first prompt chunk of 5 from 0, a later chunk of 3 from 6
    history = [torch.randint(0, 97, (1, n)) for n in (9, 0, 6)]
    new = [torch.randint(0, 97, (n,)) for n in (1, 5, 3)]
    alone, batched = [model.new_cache(1, 32) for _ in range(3)], [model.new_cache(1, 32) for _ in range(3)]
    for h, a, b in zip(history, alone, batched):
        if h.shape[1]:
            prefill(model, h, a)
            prefill(model, h, b)
    want = [prefill(model, t[None], c, h.shape[1])[0] for t, c, h in zip(new, alone, history)]
    batch = RaggedBatch(batched, [h.shape[1] for h in history], [len(t) for t in new])
    got = ragged_step(model, torch.cat(new), batch)  # (3, V)
    for i in range(3):
        torch.testing.assert_close(got[i], want[i], rtol=1e-5, atol=1e-5)
        end = history[i].shape[1] + len(new[i])
        torch.testing.assert_close(batched[i].k[:, :, :, :end], alone[i].k[:, :, :, :end], rtol=1e-5, atol=1e-5)
    rows = ragged_step(model, torch.tensor([1, 2, 3]), RaggedBatch(batched, [10, 5, 9], [1, 1, 1]), rows=[2])
    assert rows.shape == (1, 97)


def test_a_ragged_batch_refuses_positions_outside_a_cache():
    model = tiny_llama()
    with pytest.raises(ValueError, match="do not fit"):
        RaggedBatch([model.new_cache(1, 8)], [6], [3])
    with pytest.raises(ValueError, match="one start and length per cache"):
        RaggedBatch([model.new_cache(1, 8)], [0, 1], [1])


def test_prefix_cache_keeps_blocks_leaves_a_token_and_evicts_leaves_first():
    model = tiny_llama()
    c = model.config
    block_bytes = 2 * c.n_layers * c.n_kv_heads * 4 * c.head_dim * 4  # block of 4 tokens, fp32
    pc = PrefixCache(budget_bytes=3 * block_bytes, block_tokens=4)
    ids = list(range(10))  # two full blocks and two tokens
    cache = model.new_cache(1, 16)
    with torch.inference_mode():
        prefill(model, torch.tensor([ids]), cache)
    pc.store(ids, cache)
    assert len(pc) == 2 and pc.bytes == 2 * block_bytes
    fresh = model.new_cache(1, 16)
    assert pc.load(ids, fresh) == 8
    torch.testing.assert_close(fresh.k[:, :, :, :8], cache.k[:, :, :, :8])
    assert pc.load(ids[:8], model.new_cache(1, 16)) == 4  # one token is always left to prefill
    assert pc.load([99] + ids[1:], model.new_cache(1, 16)) == 0  # a block is found only after the same tokens
    other = [50, 51, 52, 53, 54, 55, 56, 57]  # two new blocks: the budget (3) evicts the oldest leaf
    with torch.inference_mode():
        prefill(model, torch.tensor([other]), cache)
    pc.store(other, cache)
    assert len(pc) == 3
    assert pc.load(ids, model.new_cache(1, 16)) == 4  # ids' first block kept, its leaf evicted


@pytest.fixture(scope="module")
def alone(host):
    """Each request's text alone, on the host's model: the one-at-a-time token loop."""
    eos = frozenset(host._worker._eos_ids)

    def run(request: GenerationRequest) -> str:
        ids = host.tokenizer(request.prompt).input_ids
        *_, outcome = generate_tokens(host.model, host.tokenizer, ids, request.sampling, threading.Event(), eos)
        return outcome.text

    return run


def sequences_per_step() -> tuple[float, float]:
    """(forward passes so far, of which with more than one sequence)."""
    total = REGISTRY.get_sample_value("memlm:iteration_sequences_count") or 0.0
    single = REGISTRY.get_sample_value("memlm:iteration_sequences_bucket", {"le": "1.0"}) or 0.0
    return total, total - single


async def run_all(host, requests, starts=None) -> list[GenerationResult]:
    """Run requests concurrently; `starts[i]`: an asyncio.Event request i waits for before it starts."""
    async def one(i, request):
        if starts and starts[i] is not None:
            await starts[i].wait()
        result = None
        async for event in host.generate(request):
            if isinstance(event, GenerationResult):
                result = event
        return result

    return await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))


def req(prompt: str, n: int = 16, **kw) -> GenerationRequest:
    return GenerationRequest(prompt=prompt, sampling=SamplingParams(max_new_tokens=n, **kw))


def test_concurrent_greedy_requests_are_batched_and_each_gets_its_own_text(host, alone):
    assert host.batch is not None
    requests = [req(p, n) for p, n in zip(PROMPTS, (12, 20, 7, 16, 10))]
    before = sequences_per_step()
    results = asyncio.run(run_all(host, requests))
    after = sequences_per_step()
    assert after[1] - before[1] >= 5, "the requests were not decoded together"
    for request, result in zip(requests, results):
        assert result.text == alone(request)
        assert result.finish_reason in ("length", "eos")
    assert [r.completion_tokens for r in results][:2] == [12, 20]


def test_seeded_sampling_in_a_batch_equals_alone(host, alone):
    requests = [req(p, 14, temperature=0.9, top_p=0.95, seed=s) for p, s in zip(PROMPTS, (1, 2, 3, 4, 5))]
    results = asyncio.run(run_all(host, requests))
    assert [r.text for r in results] == [alone(r) for r in requests]


def test_stop_sequences_and_lengths_are_per_request(host, alone):
    counting = req(PROMPTS[1], 24, stop=(" 12",))
    plain = req(PROMPTS[0], 5)
    results = asyncio.run(run_all(host, [counting, plain, req(PROMPTS[3], 9)]))
    assert results[0].finish_reason == "stop" and " 12" not in results[0].text and results[0].text.endswith("11,")
    assert results[1].finish_reason == "length" and results[1].completion_tokens == 5
    assert results[2].completion_tokens == 9 and results[2].text == alone(req(PROMPTS[3], 9))


def test_a_request_joins_a_running_batch_and_leaves_it_first(host, alone):
    async def scenario():
        long_first_delta = asyncio.Event()
        order = []

        async def long():
            async for event in host.generate(req(PROMPTS[1], 40)):
                if isinstance(event, TextDelta):
                    long_first_delta.set()
                else:
                    order.append("long")
                    return event

        async def short():
            await long_first_delta.wait()
            async for event in host.generate(req(PROMPTS[0], 6)):
                if isinstance(event, GenerationResult):
                    order.append("short")
                    return event

        results = await asyncio.gather(long(), short())
        return results, order

    (long_result, short_result), order = asyncio.run(scenario())
    assert order == ["short", "long"]
    assert long_result.text == alone(req(PROMPTS[1], 40))
    assert short_result.text == alone(req(PROMPTS[0], 6))


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(host, alone):
    async def scenario():
        async def cancelled():
            stream = host.generate(req(PROMPTS[1], 60))
            deltas = 0
            async for event in stream:
                deltas += isinstance(event, TextDelta)
                if deltas == 3:
                    await stream.aclose()  # the caller goes away
                    return deltas

        return await asyncio.gather(cancelled(), run_all(host, [req(PROMPTS[0], 18), req(PROMPTS[4], 12)]))

    deltas, (a, b) = asyncio.run(scenario())
    assert deltas == 3
    assert a.text == alone(req(PROMPTS[0], 18)) and b.text == alone(req(PROMPTS[4], 12))
    assert not host.batch.running and not host.batch.waiting


@pytest.fixture(scope="module")
def small_step_host(host, memory):
    """A second host on the same weights: 48-token steps (chunked prefill), room for 2 in flight."""
    from memlm.host import ModelHost

    h = ModelHost(host.model, host.tokenizer, ModelSettings(weights="dense", max_batch_size=4, max_batched_tokens=48,
                                                            max_concurrent_requests=2), memory=memory)
    yield h
    asyncio.run(h.close())


def test_a_long_prompt_is_prefilled_in_chunks_while_another_decodes(small_step_host, alone):
    h = small_step_host
    long_prompt = "Here is a list of fruits: " + ", ".join(["apple", "pear", "plum", "fig", "lime"] * 30) + ". The last"
    n_prompt = len(h.tokenizer(long_prompt).input_ids)
    assert n_prompt > 4 * 48
    before = REGISTRY.get_sample_value("memlm:iteration_tokens_total_count") or 0.0
    results = asyncio.run(run_all(h, [req(PROMPTS[1], 30), req(long_prompt, 8)]))
    steps = (REGISTRY.get_sample_value("memlm:iteration_tokens_total_count") or 0.0) - before
    assert results[0].text == alone(req(PROMPTS[1], 30))
    assert results[1].text == alone(req(long_prompt, 8))
    assert steps >= n_prompt // 48  # no step took more than 48 tokens


def test_requests_beyond_the_in_flight_limit_are_refused(small_step_host):
    h = small_step_host

    async def scenario():
        started = asyncio.Event()

        async def hold(n):
            async for event in h.generate(req(PROMPTS[1], n)):
                started.set()
            return True

        tasks = [asyncio.create_task(hold(30)), asyncio.create_task(hold(30))]
        await started.wait()
        with pytest.raises(ResourceExhausted, match="in flight"):
            async for _ in h.generate(req(PROMPTS[0], 4)):
                pass
        return await asyncio.gather(*tasks)

    assert asyncio.run(scenario()) == [True, True]


def test_a_shared_prefix_is_served_from_the_prefix_cache(host, alone):
    system = "You are a helpful assistant. Answer briefly and truthfully. " * 8
    first, second = req(system + "What colour is the sky?", 8), req(system + "What colour is grass?", 8)
    hits = REGISTRY.get_sample_value("memlm:prefix_cache_hits_total") or 0.0
    r1 = asyncio.run(run_all(host, [first]))[0]
    r2 = asyncio.run(run_all(host, [second]))[0]
    reused = (REGISTRY.get_sample_value("memlm:prefix_cache_hits_total") or 0.0) - hits
    block = host.batch.prefix_cache.block_tokens
    shared = len(host.tokenizer(system).input_ids) // block * block
    assert reused >= shared - block  # the second prompt's shared blocks came from the cache
    assert r1.text == alone(first) and r2.text == alone(second)
