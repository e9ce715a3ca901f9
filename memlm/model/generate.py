"""Greedy decoding on the owned `Llama` with its fixed-shape KV cache, in gpt-fast's shape.

The hot path is split into `prefill` and `decode_one_token` so each can be compiled on its own;
`greedy_generate` strings them together. Sampling, stop strings and streaming stay in
`memlm.generation` (the generation host); this is the model-side loop it will call.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

from memlm.model.llama import KVCache, Llama, RaggedBatch


def prefill(model: Llama, tokens: Tensor, cache: KVCache, start: int = 0) -> Tensor:
    """Run tokens (B, T) at positions [start, start + T) into the cache; the last logits (B, V).

    Only the last position goes through the output projection (49152 x 576 for SmolLM2: a fifth
    of a 128-token prefill's FLOPs if done for every position)."""
    input_pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
    hidden = model.forward_embeds(model.embed(tokens), input_pos, cache)  # (B, T, D)
    return model.output(hidden[:, -1])


def decode_one_token(model: Llama, token: Tensor, input_pos: Tensor, cache: KVCache) -> Tensor:
    """token (B, 1) at input_pos (1,) -> logits (B, V)."""
    return model(token, input_pos, cache)[:, -1]


@torch.inference_mode()
def greedy_generate(model: Llama, tokens: Tensor, max_new_tokens: int, eos_ids: Iterable[int] = (),
                    cache: Optional[KVCache] = None,
                    decode_step: Callable[[Llama, Tensor, Tensor, KVCache], Tensor] = decode_one_token) -> Tensor:
    """tokens (1, T) -> the new tokens (N,), N <= max_new_tokens, stopping after an eos id.

    `decode_step` is `decode_one_token` or a compiled version of it."""
    T = tokens.shape[1]
    cache = cache if cache is not None else model.new_cache(1, T + max_new_tokens)
    eos = set(eos_ids)
    next_token = prefill(model, tokens, cache).argmax(-1, keepdim=True)  # (1, 1)
    out = [next_token]
    for pos in range(T, T + max_new_tokens - 1):
        if int(next_token) in eos:
            break
        next_token = decode_step(model, next_token, torch.tensor([pos]), cache).argmax(-1, keepdim=True)
        out.append(next_token)
    return torch.cat(out, dim=1)[0]


def ragged_step(model: Llama, tokens: Tensor, batch: RaggedBatch, rows: Optional[Sequence[int]] = None) -> Tensor:
    """The new tokens (N,) of several sequences, laid out as `batch` says, in one forward pass;
    returns the logits of each sequence's last token, (S, V), or only of the sequences `rows`
    (len(rows), V): a sequence still partway through its prompt needs none."""
    hidden = model.forward_embeds(model.embed(tokens[None]), batch.input_pos, batch)  # (1, N, D)
    last = batch.last if rows is None else batch.last[list(rows)]
    return model.output(hidden[0, last])  # the head only where logits are wanted
