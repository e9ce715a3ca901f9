"""Automatic prefix caching (vLLM's): requests that share a prompt prefix (a system prompt, the same
retrieved chunks) reuse its keys and values instead of prefilling it again.

The KV of prefilled prompts is kept by blocks of `block_tokens` tokens, each block under a digest
of the whole prefix up to its end (a chain: blake2b over the parent's digest and the block's token
ids), so a block is found only after the same tokens from the start of the prompt, and prompts
that share a prefix share its blocks. A new sequence takes the longest run of cached blocks that
leaves at least one prompt token to prefill (the first sampled token needs the last prompt
token's logits), copied into its own KV cache (memlm.model.KVCache: one memcpy per block for all
layers, about 1.5 MB per 32-token block of SmolLM2 in fp32, against ~80 ms of prefill for it).
Blocks are evicted least recently used to stay within `budget_bytes`; a hit refreshes a run's
blocks leaf first, so a parent is always fresher than its children and children go first.

Only for requests that run the plain model (memory modes `none` and `rag`): a mode that changes the
model's attention (knn, landmark) or adds modules (retro) makes different keys for the same tokens.
One cache per model host (one model, one set of weights).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Sequence

import numpy as np
from torch import Tensor

from memlm.model.llama import KVCache


def _digests(ids: Sequence[int], block_tokens: int, blocks: int) -> list[bytes]:
    """The chain digest of each of the first `blocks` full blocks of `ids`."""
    out, parent = [], b""
    arr = np.asarray(ids[: blocks * block_tokens], dtype=np.int64)
    for b in range(blocks):
        parent = hashlib.blake2b(parent + arr[b * block_tokens : (b + 1) * block_tokens].tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


class PrefixCache:
    """Prompt KV blocks shared between requests; thread-confined to the model worker."""

    def __init__(self, budget_bytes: int, block_tokens: int = 32):
        if block_tokens < 1:
            raise ValueError(f"block_tokens={block_tokens}; expected >= 1")
        self.budget_bytes, self.block_tokens = int(budget_bytes), int(block_tokens)
        self._blocks: "OrderedDict[bytes, tuple[Tensor, Tensor]]" = OrderedDict()  # digest -> k, v (L, KV, b, hd)
        self.bytes = 0
        self.hit_tokens = 0  # prompt tokens served from the cache, since start
        self.queried_tokens = 0  # prompt tokens looked up

    def __len__(self) -> int:
        return len(self._blocks)

    def load(self, ids: Sequence[int], cache: KVCache) -> int:
        """Copy the longest cached prefix of `ids` (leaving >= 1 token) into `cache` from position
        0; returns how many tokens it covers (a multiple of block_tokens, maybe 0)."""
        self.queried_tokens += len(ids)
        if self.budget_bytes <= 0:
            return 0
        b = self.block_tokens
        run: list[tuple[bytes, tuple[Tensor, Tensor]]] = []
        for digest in _digests(ids, b, (len(ids) - 1) // b):
            block = self._blocks.get(digest)
            if block is None:
                break
            run.append((digest, block))
        for i, (digest, (k, v)) in enumerate(run):
            cache.k[:, 0, :, i * b : (i + 1) * b] = k
            cache.v[:, 0, :, i * b : (i + 1) * b] = v
        for digest, _ in reversed(run):  # leaf first: parents end up fresher than their children
            self._blocks.move_to_end(digest)
        self.hit_tokens += len(run) * b
        return len(run) * b

    def store(self, ids: Sequence[int], cache: KVCache) -> None:
        """Keep the full blocks of the prompt `ids`, whose KV `cache` holds from position 0."""
        if self.budget_bytes <= 0:
            return
        b = self.block_tokens
        digests = _digests(ids, b, len(ids) // b)
        for i, digest in enumerate(digests):
            if digest in self._blocks:
                self._blocks.move_to_end(digest)
                continue
            k = cache.k[:, 0, :, i * b : (i + 1) * b].clone()  # (L, KV, b, hd)
            v = cache.v[:, 0, :, i * b : (i + 1) * b].clone()
            size = k.numel() * k.element_size() * 2
            if size > self.budget_bytes:
                return
            while self.bytes + size > self.budget_bytes:
                _, (old_k, old_v) = self._blocks.popitem(last=False)
                self.bytes -= old_k.numel() * old_k.element_size() * 2
            self._blocks[digest] = (k, v)
            self.bytes += size
        for digest in reversed(digests):  # leaf first, as in `load`
            if digest in self._blocks:
                self._blocks.move_to_end(digest)

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
