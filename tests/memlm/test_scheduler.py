"""BatchScheduler's policies on a small random Llama (fast, no server): first come first served
under the KV budget (nobody overtakes a waiting request), the batch-size and step-token limits,
cancellation while waiting and while running, a failing step answering every request."""
from __future__ import annotations

import threading

import pytest
import torch

from memlm.engine import SamplingParams
from memlm.model import Llama, LlamaConfig
from memlm.scheduler import BatchRequest, BatchScheduler, kv_bytes


class Tok:
    """Enough of a tokenizer for the scheduler: decode ids to letters."""

    def decode(self, ids, skip_special_tokens=True, clean_up_tokenization_spaces=False):
        return "".join(chr(97 + i % 26) for i in ids)


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, dim=32, intermediate_size=48, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=8, max_position_embeddings=256)
    return Llama(config).eval()


class Recorder:
    def __init__(self, name: str, events: list):
        self.name, self.events, self.text, self.outcome, self.error = name, events, "", None, None

    def request(self, ids, n, cancel=None) -> BatchRequest:
        def on_text(t):
            self.text += t

        def on_done(outcome):
            self.outcome = outcome
            self.events.append(("done", self.name))

        def on_error(exc):
            self.error = exc

        return BatchRequest(ids, SamplingParams(max_new_tokens=n), cancel or threading.Event(), on_text, on_done, on_error)


def run_until_idle(scheduler: BatchScheduler, on_step=None, limit: int = 500) -> int:
    steps = 0
    while not scheduler.idle:
        scheduler.step()
        steps += 1
        if on_step:
            on_step(scheduler)
        assert steps < limit
    return steps


def test_nobody_overtakes_a_request_waiting_for_kv_room(model):
    events = []
    big = kv_bytes(model, 10 + 40)
    s = BatchScheduler(model, Tok(), frozenset(), max_batch_size=4, max_batched_tokens=64, kv_cache_bytes=big + 100)
    a, b, c = Recorder("a", events), Recorder("b", events), Recorder("c", events)
    s.submit(a.request(list(range(10)), 40))  # fills the budget
    s.step()
    s.submit(b.request(list(range(10)), 40))  # must wait for a
    s.submit(c.request([1, 2], 1))  # would fit beside a, but b is first
    admitted = []
    run_until_idle(s, lambda sch: admitted.append([r.request.input_ids[:2] for r in sch.running]))
    assert [e[1] for e in events] == ["a", "b", "c"]
    assert all(len(r) <= 1 for r in admitted)  # a alone, then b alone, then c
    assert a.outcome.completion_tokens == 40 and b.outcome.completion_tokens == 40 and c.outcome.completion_tokens == 1


def test_batch_size_and_step_tokens_are_limits(model):
    events = []
    s = BatchScheduler(model, Tok(), frozenset(), max_batch_size=3, max_batched_tokens=8)
    recs = [Recorder(str(i), events) for i in range(5)]
    for i, r in enumerate(recs):
        s.submit(r.request(list(range(1, 12 + i)), 5))
    seen = []
    run_until_idle(s, lambda sch: seen.append(len(sch.running)))
    assert max(seen) == 3
    assert all(r.outcome.completion_tokens == 5 and r.outcome.finish_reason == "length" for r in recs)


def test_cancelled_requests_leave_waiting_or_running(model):
    events = []
    s = BatchScheduler(model, Tok(), frozenset(), max_batch_size=1, max_batched_tokens=16)
    running, waiting = Recorder("running", events), Recorder("waiting", events)
    stop_running, stop_waiting = threading.Event(), threading.Event()
    s.submit(running.request([1, 2, 3], 50, stop_running))
    s.submit(waiting.request([4, 5, 6], 50, stop_waiting))
    for _ in range(3):
        s.step()
    stop_waiting.set()
    s.step()
    assert waiting.outcome is not None and waiting.outcome.finish_reason == "cancelled"
    assert waiting.outcome.completion_tokens == 0
    stop_running.set()
    run_until_idle(s)
    assert running.outcome.finish_reason == "cancelled" and 0 < running.outcome.completion_tokens < 50
    assert s.reserved == 0


def test_a_failing_step_answers_every_request_and_the_next_runs(model):
    events = []
    s = BatchScheduler(model, Tok(), frozenset(), max_batch_size=4, max_batched_tokens=16)
    a, b = Recorder("a", events), Recorder("b", events)
    s.submit(a.request([1, 2, 3], 5))
    s.submit(b.request([3, 4], 5))
    model.embed = lambda tokens: (_ for _ in ()).throw(RuntimeError("boom"))  # the next pass fails
    try:
        s.step()
    finally:
        del model.embed  # the class's method again
    assert isinstance(a.error, RuntimeError) and isinstance(b.error, RuntimeError) and s.idle and s.reserved == 0
    c = Recorder("c", events)
    s.submit(c.request([1, 2, 3], 5))
    run_until_idle(s)
    assert c.outcome.completion_tokens == 5


def test_max_batched_tokens_below_the_batch_size_is_refused(model):
    with pytest.raises(ValueError, match="every running sequence"):
        BatchScheduler(model, Tok(), frozenset(), max_batch_size=8, max_batched_tokens=4)


@pytest.fixture(scope="module")
def q4_1_model() -> Llama:
    from memlm.kernels import qmatmul_cpu
    from memlm.model.quantize import quantize_model

    if (why := qmatmul_cpu.available()) is not None:
        pytest.skip(f"qmatmul_cpu kernel unavailable: {why}")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, dim=64, intermediate_size=128, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=16, max_position_embeddings=256)
    model = Llama(config)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return quantize_model(model.eval(), "q4_1")


def test_a_step_mixing_decoders_and_prompts_runs_them_apart_and_changes_no_text(q4_1_model, qmatmul_isa, monkeypatch):
    """With a fused decode stack (q4_1), a step whose decoders share it with prompt chunks runs
    two passes, the decoders' C step then the prompts, and every request gets the tokens it gets
    alone."""
    prompts = [[1, 2, 3, 4, 5], [7] * 12, [3, 1, 4, 1, 5, 9, 2, 6]]
    alone = []
    for ids in prompts:
        scheduler, rec = BatchScheduler(q4_1_model, Tok(), frozenset()), Recorder("alone", [])
        scheduler.submit(rec.request(ids, 10))
        run_until_idle(scheduler)
        alone.append(rec.outcome.token_ids)
    assert len({tuple(t) for t in alone}) == 3

    passes = []
    real = BatchScheduler._pass
    monkeypatch.setattr(BatchScheduler, "_pass", lambda self, pieces: passes.append([len(t) for _, t in pieces]) or real(self, pieces))
    scheduler, events = BatchScheduler(q4_1_model, Tok(), frozenset()), []
    recs = [Recorder(str(i), events) for i in range(3)]
    scheduler.submit(recs[0].request(prompts[0], 10))
    scheduler.step()  # its prompt
    scheduler.step()  # its first decode step
    scheduler.submit(recs[1].request(prompts[1], 10))
    scheduler.submit(recs[2].request(prompts[2], 10))
    passes.clear()
    scheduler.step()  # one decoder beside two prompts: two passes
    assert passes == [[1], [12, 8]]
    passes.clear()
    scheduler.step()  # three decoders: one pass
    assert passes == [[1, 1, 1]]
    run_until_idle(scheduler)
    assert [r.outcome.token_ids for r in recs] == alone
