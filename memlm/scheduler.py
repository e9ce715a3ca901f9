"""Continuous batching on the model worker: concurrent requests decoded together.

Orca's iteration-level scheduling with vLLM's policy: requests join the running batch between
forward passes and leave it the step they finish, so a short request never waits for a long one.
Each step (`BatchScheduler.step`) is one forward pass of memlm's own `Llama` over a `RaggedBatch`:
first every decoding sequence's one new token, then prompt tokens of sequences still prefilling,
in arrival order, up to `max_batched_tokens` in all (chunked prefill: a long prompt is prefilled
over several steps while the others keep decoding, never padded to a common length). Each
sequence keeps its own KV cache (prompt + max_new_tokens positions, the one-at-a-time loop's
size), its own sampling, seed, stop sequences and cancellation (`memlm.generation.Completion`);
a step with one sequence in it is exactly the one-at-a-time path (q4_1's fused decode layer).
A decode step of q4_1 layers runs the whole decoder stack in one C call over the B rows
(`Llama.decode_stack`, `qmatmul_cpu.q4_1_decode_stack_batch`); a step with prompt chunks in it
runs the decoders that way and the chunks on the module path, in a second pass.

Admission is first come, first served: the oldest waiting request is admitted when a batch slot
is free (`max_batch_size`) and its KV cache fits the budget (`kv_cache_bytes`; a request alone
is always admitted), and no later request overtakes it, so none starves. Prompts that share a
prefix reuse its KV (`memlm.prefix_cache.PrefixCache`).

This module knows nothing of modes or servers: a `BatchRequest` is token ids, sampling and three
callbacks. The host (memlm.host) decides which requests may share a batch (`MemoryModeBase.batchable`:
those that run the plain model) and runs the others alone between steps.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from memlm import metrics
from memlm.engine import SamplingParams
from memlm.generation import Completion, GenerationOutcome
from memlm.model import Llama
from memlm.model.generate import prefill, ragged_step
from memlm.model.llama import KVCache, RaggedBatch
from memlm.prefix_cache import PrefixCache

log = logging.getLogger(__name__)


@dataclass
class BatchRequest:
    """One request as the scheduler sees it."""

    input_ids: Sequence[int]  # the built prompt, within the model's context with max_new_tokens
    sampling: SamplingParams
    cancel: threading.Event
    on_text: Callable[[str], None]  # each non-empty text delta, in order
    on_done: Callable[[GenerationOutcome], None]  # once, at the end (also when cancelled)
    on_error: Callable[[BaseException], None]  # instead of on_done, when the step failed


@dataclass
class _Sequence:
    request: BatchRequest
    completion: Completion
    cache: KVCache
    reserved: int  # bytes of `cache`
    filled: int  # positions of `cache` written
    admitted_at: float
    next_token: Optional[int] = None  # sampled, not yet fed
    first_token_at: Optional[float] = None

    @property
    def prefilling(self) -> bool:
        return self.filled < len(self.request.input_ids)


def kv_bytes(model: Llama, positions: int) -> int:
    """Bytes of a one-sequence KV cache of `positions` positions (`Llama.new_cache`'s dtype)."""
    c = model.config
    dtype = model.kv_dtype or model.tok_embeddings.weight.dtype
    return 2 * c.n_layers * c.n_kv_heads * c.head_dim * positions * dtype.itemsize


class BatchScheduler:
    """The running batch and the requests waiting for it; called only from the model worker."""

    def __init__(self, model: Llama, tokenizer, eos: frozenset[int], max_batch_size: int = 16,
                 max_batched_tokens: int = 512, kv_cache_bytes: int = 4 << 30,
                 prefix_cache: Optional[PrefixCache] = None):
        if max_batched_tokens < max_batch_size:
            raise ValueError(f"max_batched_tokens={max_batched_tokens} < max_batch_size={max_batch_size}: "
                             "every running sequence needs a token each step")
        self.model, self.tokenizer, self.eos = model, tokenizer, eos
        self.max_batch_size, self.max_batched_tokens = max_batch_size, max_batched_tokens
        self.kv_cache_bytes = kv_cache_bytes
        self.prefix_cache = prefix_cache
        self.waiting: deque[BatchRequest] = deque()
        self.running: list[_Sequence] = []
        self.reserved = 0  # KV bytes of the running sequences' caches

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def submit(self, request: BatchRequest) -> None:
        self.waiting.append(request)
        self._report()

    def fail_all(self, exc: BaseException) -> None:
        """A step failed: answer every request with `exc`."""
        for seq in self.running:
            seq.request.on_error(exc)
        for request in self.waiting:
            request.on_error(exc)
        self.running.clear()
        self.waiting.clear()
        self.reserved = 0
        self._report()

    def cancel_all(self) -> None:
        """The worker is stopping: end every request as cancelled."""
        for seq in list(self.running):
            self._finish(seq, "cancelled")
        while self.waiting:
            request = self.waiting.popleft()
            self._cancel_waiting(request)
        self._report()

    # --- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """Admit what fits, then one forward pass over the running batch."""
        self._admit()
        for seq in [s for s in self.running if s.request.cancel.is_set()]:
            self._finish(seq, "cancelled")
        if not self.running:
            self._report()
            return
        pieces: list[tuple[_Sequence, list[int]]] = []
        budget = self.max_batched_tokens
        for seq in self.running:
            if seq.next_token is not None:
                pieces.append((seq, [seq.next_token]))
                budget -= 1
        for seq in self.running:  # admission order: the oldest prompt first
            if budget <= 0:
                break
            if seq.prefilling:
                n = min(budget, len(seq.request.input_ids) - seq.filled)
                pieces.append((seq, list(seq.request.input_ids[seq.filled : seq.filled + n])))
                budget -= n
        try:
            logits = self._forward(pieces)
        except BaseException as exc:  # noqa: BLE001 - every request in the step gets it
            log.exception("batched generation step failed")
            self.fail_all(exc)
            return
        now = time.perf_counter()
        for (seq, tokens), row in zip(pieces, logits):
            seq.filled += len(tokens)
            if row is not None:  # None: prompt not finished, no token yet
                self._take(seq, row, now)
        metrics.ITERATION_TOKENS.observe(sum(len(t) for _, t in pieces))
        metrics.ITERATION_SEQUENCES.observe(len(pieces))
        self._report()

    def _forward(self, pieces: list[tuple[_Sequence, list[int]]]) -> list[Optional[torch.Tensor]]:
        """One step's forward work; for each piece the next-token logits (vocab,) when its sequence
        needs a token now (decoding, or its prompt's last piece), else None.

        A step that mixes decoding sequences with prompt chunks runs them as two passes when the
        model has a fused decode stack (q4_1: `Llama.decode_stack`): the decoders' one-call C step,
        then the prompt chunks on the module path. One mixed pass would send the decoders down the
        module path too, per-sequence attention and all: 7 decoders beside a 60-token prompt took
        91.4 ms together against 12.2 + 62.4 apart (benchmarks/batched_step.py, Sapphire Rapids, 2
        threads). It also keeps a decoder's arithmetic the same whether or not a prompt shared its
        step."""
        decoding = [i for i, (seq, _) in enumerate(pieces) if seq.next_token is not None]
        if getattr(self.model, "decode_stack", None) is not None and 0 < len(decoding) < len(pieces):
            prompts = [i for i, (seq, _) in enumerate(pieces) if seq.next_token is None]
            result: list[Optional[torch.Tensor]] = [None] * len(pieces)
            for part in (decoding, prompts):
                for i, row in zip(part, self._pass([pieces[i] for i in part])):
                    result[i] = row
            return result
        return self._pass(pieces)

    def _pass(self, pieces: list[tuple[_Sequence, list[int]]]) -> list[Optional[torch.Tensor]]:
        """One forward pass over the pieces (see `_forward`)."""
        wanted = [seq.filled + len(tokens) == len(seq.request.input_ids) or seq.next_token is not None
                  for seq, tokens in pieces]
        if len(pieces) == 1:  # alone: the one-at-a-time path, fused q4_1 decode included
            seq, tokens = pieces[0]
            logits = prefill(self.model, torch.tensor([tokens]), seq.cache, seq.filled)  # (1, V)
            return [logits[0] if wanted[0] else None]
        batch = RaggedBatch([s.cache for s, _ in pieces], [s.filled for s, _ in pieces], [len(t) for _, t in pieces])
        rows = [i for i, w in enumerate(wanted) if w]
        tokens = torch.tensor([t for _, piece in pieces for t in piece])
        out = ragged_step(self.model, tokens, batch, rows)  # (len(rows), V); with no rows the pass only fills caches
        result: list[Optional[torch.Tensor]] = [None] * len(pieces)
        for j, i in enumerate(rows):
            result[i] = out[j]
        return result

    # --- admission and release -------------------------------------------------------------

    def _admit(self) -> None:
        for request in [r for r in self.waiting if r.cancel.is_set()]:  # gone before their turn: answered now
            self.waiting.remove(request)
            self._cancel_waiting(request)
        while self.waiting and len(self.running) < self.max_batch_size:
            request = self.waiting[0]
            positions = len(request.input_ids) + request.sampling.max_new_tokens
            need = kv_bytes(self.model, positions)
            if self.running and self.reserved + need > self.kv_cache_bytes:
                break  # the oldest waits for room; nobody overtakes it
            self.waiting.popleft()
            cache = self.model.new_cache(1, positions)
            filled, logits = 0, None
            if self.prefix_cache is not None:
                filled, logits = self.prefix_cache.load(request.input_ids, cache)
                metrics.PREFIX_CACHE_QUERIES.inc(len(request.input_ids))
                metrics.PREFIX_CACHE_HITS.inc(filled)
            completion = Completion(self.tokenizer, request.sampling, self.eos, request.cancel)
            seq = _Sequence(request, completion, cache, need, filled, time.perf_counter())
            self.running.append(seq)
            self.reserved += need
            if logits is not None:  # the whole prompt came from the cache: its first token needs no pass
                self._take(seq, logits, time.perf_counter())

    def _cancel_waiting(self, request: BatchRequest) -> None:
        """End a request that never ran: no tokens, "cancelled"."""
        request.on_done(Completion(self.tokenizer, request.sampling, self.eos, request.cancel).outcome("cancelled"))

    def _take(self, seq: _Sequence, logits: torch.Tensor, now: float) -> None:
        """Sample the sequence's next token from `logits` (V,) and pass it on; it finishes or waits
        to be fed in the next step."""
        token_id = int(seq.completion.sample(logits[None]))
        if seq.first_token_at is None:
            seq.first_token_at = now
            if self.prefix_cache is not None:
                self.prefix_cache.store(seq.request.input_ids, seq.cache, logits)
        delta = seq.completion.add(token_id)
        if delta:
            seq.request.on_text(delta)
        if seq.completion.finish_reason:
            self._finish(seq)
        else:
            seq.next_token = token_id

    def _finish(self, seq: _Sequence, reason: Optional[str] = None) -> None:
        tail = seq.completion.flush() if reason is None else ""
        if tail:
            seq.request.on_text(tail)
        now = time.perf_counter()
        first = seq.first_token_at
        outcome = seq.completion.outcome(reason, prefill_s=(first or now) - seq.admitted_at,
                                         decode_s=now - first if first is not None else 0.0, first_token_at=first)
        self.running.remove(seq)
        self.reserved -= seq.reserved
        seq.request.on_done(outcome)

    def _report(self) -> None:
        metrics.KV_CACHE_BYTES.set(self.reserved)
        if self.prefix_cache is not None:
            metrics.PREFIX_CACHE_BYTES.set(self.prefix_cache.bytes)
