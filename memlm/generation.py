"""The token loop: prefill, decode one token at a time, sample, detokenize as a stream.

Split gpt-fast style into tiny functions (`prefill`, `decode_one_token`, `sample`) so each can be
swapped (a compiled decode step, a batched scheduler) without touching the rest. One loop,
`generate_tokens`, over a `Sequence` (one sequence's KV cache and position, the only layer that
knows the model's class): `OwnedSequence` runs memlm's own `Llama` with its fixed-shape KVCache,
sized to prompt + max_new_tokens (memlm.model.generate's `prefill` / `decode_one_token`);
`HFSequence` runs any Hugging Face causal LM through its own forward with a `DynamicCache`. Batch
size is 1 here; `Completion` (what a sampled token does to one sequence: stop conditions, text)
is shared with the batch scheduler (memlm.scheduler), which steps many sequences together.

Limits: the caller keeps prompt + new tokens inside the model's context (see
`memlm.prompts.prompt_budget`); nothing here truncates. Detokenization re-decodes all generated ids
each step (byte-level BPE decodes prefix-stably), which costs well under 1 ms per step for a few
thousand tokens, next to ~70 ms for the forward pass on 2 CPU cores.
"""
from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional, Sequence, Union

import torch

from memlm.engine import SamplingParams, TextDelta
from memlm.model import Llama
from memlm.model.generate import decode_one_token as owned_decode_one_token, prefill as owned_prefill
from memlm.models.loading import model_facts
from memlm.modes.base import NO_HOOKS, GenerationHooks

# Prompts longer than this are prefilled in pieces, so attention scores for an 8k-token prompt
# never need a (heads, T, T) matrix at once; shorter prompts take one forward pass, exactly as
# `model.generate` does.
PREFILL_CHUNK_TOKENS = 1024


@dataclass(frozen=True)
class GenerationOutcome:
    """The last item `generate_tokens` yields. Times are `time.perf_counter()` seconds."""

    text: str  # everything generated, ending before a stop sequence if one was hit
    token_ids: tuple[int, ...]  # every sampled token, EOS included when it was sampled
    finish_reason: str  # "stop" | "eos" | "length" | "cancelled"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    first_token_at: Optional[float] = None  # perf_counter() when the first token was sampled

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def new_cache(model):
    """An empty KV cache for a Hugging Face `model` (grows as tokens are added)."""
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def prefill(model, input_ids: torch.Tensor, cache, chunk_tokens: int = PREFILL_CHUNK_TOKENS) -> torch.Tensor:
    """Run the prompt `input_ids` (1, T) through a Hugging Face model, filling `cache`.

    Returns the logits of the last position, (1, vocab).
    """
    assert input_ids.dim() == 2 and input_ids.shape[0] == 1, f"expected (1, T) ids, got {tuple(input_ids.shape)}"
    logits = None
    for start in range(0, input_ids.shape[1], chunk_tokens):
        piece = input_ids[:, start : start + chunk_tokens]  # (1, <=chunk)
        # logits_to_keep=1: only the last position's logits are needed (saves a (T, vocab) matmul).
        out = model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1, :]  # (1, vocab)
    assert logits is not None, "prefill needs at least one prompt token"
    return logits


def decode_one_token(model, token: torch.Tensor, cache) -> torch.Tensor:
    """Feed one token (1, 1) to a Hugging Face model after what `cache` holds; return the
    next-token logits, (1, vocab)."""
    out = model(input_ids=token, past_key_values=cache, use_cache=True)
    return out.logits[:, -1, :]


class OwnedSequence:
    """One sequence on memlm's own `Llama`: a fixed-shape KVCache of `max_seq` positions and the
    next position to write."""

    def __init__(self, model: Llama, max_seq: int):
        self.model, self.cache, self.pos = model, model.new_cache(1, max_seq), 0

    def feed_embeds(self, embeds: torch.Tensor) -> None:
        """Input embeddings (1, P, dim) at the next P positions (a mode's prefix); no logits."""
        n = embeds.shape[1]
        x = embeds.to(self.model.tok_embeddings.weight.dtype)
        self.model.forward_embeds(x, torch.arange(self.pos, self.pos + n), self.cache)
        self.pos += n

    def prefill(self, input_ids: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        """The prompt (1, T) in pieces of `chunk_tokens`; the last position's logits (1, vocab)."""
        logits = None
        for start in range(0, input_ids.shape[1], chunk_tokens):
            piece = input_ids[:, start : start + chunk_tokens]  # (1, <=chunk)
            logits = owned_prefill(self.model, piece, self.cache, self.pos)  # only the last position's logits
            self.pos += piece.shape[1]
        assert logits is not None, "prefill needs at least one prompt token"
        return logits

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        """One token (1, 1) at the next position -> next-token logits (1, vocab)."""
        logits = owned_decode_one_token(self.model, token, torch.tensor([self.pos]), self.cache)
        self.pos += 1
        return logits


class HFSequence:
    """One sequence on a Hugging Face causal LM: a DynamicCache (grows as tokens are added)."""

    def __init__(self, model):
        self.model, self.cache = model, new_cache(model)

    def feed_embeds(self, embeds: torch.Tensor) -> None:
        self.model(inputs_embeds=embeds.to(self.model.dtype), past_key_values=self.cache, use_cache=True,
                   logits_to_keep=1)

    def prefill(self, input_ids: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
        return prefill(self.model, input_ids, self.cache, chunk_tokens)

    def decode(self, token: torch.Tensor) -> torch.Tensor:
        return decode_one_token(self.model, token, self.cache)


def open_sequence(model, max_seq: int) -> "OwnedSequence | HFSequence":
    """A sequence of up to `max_seq` positions (prefix + prompt + new tokens) on `model`."""
    return OwnedSequence(model, max_seq) if isinstance(model, Llama) else HFSequence(model)


def sample(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]
) -> torch.Tensor:
    """Pick the next token from `logits` (1, vocab); returns (1, 1) token ids.

    temperature 0 is greedy (argmax, the generator unused); otherwise nucleus sampling over the
    smallest set of tokens whose probability reaches `top_p` (the most likely token is always kept).
    """
    if temperature <= 0.0:
        return logits.argmax(dim=-1, keepdim=True)  # (1, 1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # (1, vocab)
    if top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True)  # (1, vocab) each
        before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # mass strictly before each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)  # first token: before == 0, kept
        choice = torch.multinomial(sorted_probs, num_samples=1, generator=generator)  # (1, 1)
        return sorted_ids.gather(-1, choice)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (1, 1)


def make_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator: seeded when asked (same seed, same text), else from fresh entropy."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed if seed is not None else random.SystemRandom().getrandbits(63))
    return gen


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """The tokenizer's EOS and every EOS id in the model's config and generation config (for
    SmolLM2-Instruct both name <|im_end|>)."""
    ids = set(model_facts(model).eos_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return frozenset(ids)


class StreamingText:
    """Turns a growing list of token ids into safe-to-show text deltas.

    Holds back (a) a trailing partial UTF-8 character (the decoded text ends with U+FFFD) and
    (b) any tail that could be the start of a stop sequence, so no part of a stop sequence is
    ever emitted. `text` is what has been emitted so far.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._stop = tuple(s for s in stop if s)
        self._ids: list[int] = []
        self.decoded = ""  # all generated ids decoded
        self.text = ""  # the emitted prefix of `decoded`
        self.stopped = False

    def _decode(self) -> str:
        return self._tokenizer.decode(self._ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add one token; return the new text that may be shown (possibly ""). After a stop
        sequence appears, `stopped` is True and the text ends just before it."""
        self._ids.append(token_id)
        self.decoded = self._decode()
        if self._stop:
            # Emitted text never ends with a stop sequence's prefix, so a stop can only begin
            # after it (the margin is belt and braces).
            search_from = max(0, len(self.text) - max(len(s) for s in self._stop) + 1)
            hits = [i for i in (self.decoded.find(s, search_from) for s in self._stop) if i >= 0]
            if hits:
                self.stopped = True
                return self._emit_upto(min(hits))
        safe = len(self.decoded)
        while safe > len(self.text) and self.decoded[safe - 1] == "\ufffd":
            safe -= 1
        safe -= self._stop_prefix_len(self.decoded[:safe])
        return self._emit_upto(safe)

    def flush(self) -> str:
        """Generation ended without a stop sequence: release whatever was held back."""
        return "" if self.stopped else self._emit_upto(len(self.decoded))

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop sequence."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(text)), longest, -1):
                if text.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _emit_upto(self, end: int) -> str:
        if end <= len(self.text):
            return ""
        # Byte-level BPE decodes prefix-stably, so the emitted text is a prefix of `decoded`.
        delta = self.decoded[len(self.text) : end]
        self.text = self.decoded[:end]
        return delta


class Completion:
    """One sequence's sampled tokens as they come, and when it ends: an EOS token (not part of the
    text), `sampling.max_new_tokens`, a stop sequence (the text ends before it) or `cancel.set()`.
    Its own generator (seeded when asked), so sequences sampled side by side in one batch get the
    text each would get alone. Shared by `generate_tokens` and the batch scheduler
    (memlm.scheduler)."""

    def __init__(self, tokenizer, sampling: SamplingParams, eos: frozenset[int], cancel: threading.Event):
        self.sampling, self.eos, self.cancel = sampling, eos, cancel
        self.generator = make_generator(sampling.seed) if sampling.temperature > 0 else None
        self.stream = StreamingText(tokenizer, sampling.stop)
        self.token_ids: list[int] = []
        self.finish_reason: Optional[str] = None

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, vocab) -> the next token, (1, 1)."""
        return sample(logits, self.sampling.temperature, self.sampling.top_p, self.generator)

    def add(self, token_id: int) -> str:
        """Take a sampled token; return the text it makes safe to show ("" if none). Sets
        `finish_reason` when the sequence ends here (cancellation is checked last: the token's
        text is still shown)."""
        self.token_ids.append(token_id)
        if token_id in self.eos:
            self.finish_reason = "eos"
            return ""
        delta = self.stream.add(token_id)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.sampling.max_new_tokens:
            self.finish_reason = "length"
        elif self.cancel.is_set():
            self.finish_reason = "cancelled"
        return delta

    def flush(self) -> str:
        """The sequence has ended: whatever text was held back (a possible stop's prefix)."""
        return self.stream.flush()

    def outcome(self, reason: Optional[str] = None, prefill_s: float = 0.0, decode_s: float = 0.0,
                first_token_at: Optional[float] = None) -> GenerationOutcome:
        return GenerationOutcome(self.stream.text, tuple(self.token_ids), reason or self.finish_reason or "cancelled",
                                 prefill_s, decode_s, first_token_at)


@torch.inference_mode()
def generate_tokens(
    model,
    tokenizer,
    input_ids: Union[torch.Tensor, Sequence[int]],
    sampling: SamplingParams,
    cancel: threading.Event,
    eos_ids: Optional[Iterable[int]] = None,
    hooks: GenerationHooks = NO_HOOKS,
) -> Iterator[Union[TextDelta, GenerationOutcome]]:
    """Generate after `input_ids` ((1, T) tensor or a list of ids), yielding non-empty
    `TextDelta`s as text becomes safe to show, then one `GenerationOutcome`.

    Stops as `Completion` says; cancellation is checked before every forward pass.
    `hooks`: the memory mode's (memlm.modes.base.GenerationHooks): extra embeddings before the
    prompt, a call each time the sequence completes a chunk of `hooks.chunk_tokens`, one per token.
    """
    ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor([list(input_ids)], dtype=torch.long)
    eos = frozenset(eos_ids) if eos_ids is not None else eos_token_ids(model, tokenizer)
    completion = Completion(tokenizer, sampling, eos, cancel)
    if cancel.is_set():
        yield completion.outcome("cancelled")
        return
    t0 = time.perf_counter()
    prompt_ids = ids[0].tolist()
    prefix = hooks.prefix_embeds(prompt_ids)  # (1, P, dim) or None
    # Every position this generation may write: the last sampled token is never fed back.
    seq = open_sequence(model, (0 if prefix is None else prefix.shape[1]) + len(prompt_ids) + sampling.max_new_tokens)
    if prefix is not None:
        seq.feed_embeds(prefix)
    every = hooks.chunk_tokens
    # Chunks end where (position + phase) % every == 0: phase 0 starts them at position 0.
    phase = hooks.chunk_phase(prompt_ids) if every else 0
    done = (len(prompt_ids) + phase) // every * every - phase if every else 0
    if done > 0:  # the prompt's completed chunks: before the prefill reads them
        hooks.on_chunk(prompt_ids, done)
    logits = seq.prefill(ids, PREFILL_CHUNK_TOKENS)
    token = completion.sample(logits)  # (1, 1)
    first_token_at = time.perf_counter()
    prefill_s = first_token_at - t0
    while True:
        token_id = int(token)
        position = len(prompt_ids) + len(completion.token_ids)
        hooks.on_token(token_id, position)
        delta = completion.add(token_id)
        if delta:
            yield TextDelta(delta)
        if completion.finish_reason:
            break
        if every and (position + 1 + phase) % every == 0:  # the token completes a chunk: before the pass that feeds it
            hooks.on_chunk(prompt_ids + completion.token_ids, position + 1)
        token = completion.sample(seq.decode(token))
    tail = completion.flush()
    if tail:
        yield TextDelta(tail)
    yield completion.outcome(prefill_s=prefill_s, decode_s=time.perf_counter() - first_token_at,
                             first_token_at=first_token_at)
