"""Automatic prefix caching (vLLM's): requests that share a prompt prefix (a system prompt, the same
retrieved chunks) reuse its keys and values instead of prefilling it again.

The KV of prefilled prompts is kept by blocks of `block_tokens` tokens, each block under a digest
of the whole prefix up to its end (a chain: blake2b over the parent's digest and the block's token
ids), so a block is found only after the same tokens from the start of the prompt, and prompts
that share a prefix share its blocks. A new sequence takes the longest run of cached blocks that
leaves at least one prompt token to prefill (the first sampled token needs the last prompt
token's logits) — or, for a prompt seen whole before, all of it and the logits its prefill made,
so a repeated request repeats its numbers exactly — copied into its own KV cache (memlm.model.KVCache: one memcpy per block for all
layers, about 1.5 MB per 32-token block of SmolLM2 in fp32, against ~80 ms of prefill for it).
A shorter remainder is prefilled with other kernels than a cold prefill of the whole prompt would
use (q4_1's integer kernel for under 32 rows, the fp32 GEMM from 32), so a request sharing only a
prefix can differ from its cold self at near-ties, as with vLLM's prefix caching. Blocks are
evicted least recently used to stay within `budget_bytes`; a hit refreshes a run's
blocks leaf first, so a parent is always fresher than its children and children go first.

Only for requests that run the plain model (memory modes `none` and `rag`): a mode that changes the
model's attention (knn, landmark) or adds modules (retro) makes different keys for the same tokens.
One cache per model host (one model, one set of weights).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Optional, Sequence

import numpy as np
from torch import Tensor

from memlm.model.llama import KVCache


def _whole(digests: list[bytes], ids: Sequence[int], block_tokens: int) -> bytes:
    """The key of the whole prompt `ids`: its tail after the last full block, chained on."""
    tail = np.asarray(ids[len(digests) * block_tokens :], dtype=np.int64).tobytes()
    return hashlib.blake2b(b"whole" + (digests[-1] if digests else b"") + tail, digest_size=16).digest()


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
        # digest -> (k, v (L, KV, n, hd), logits (V,) or None): a block of n = block_tokens under
        # its chain digest, or a whole prompt's tail after its last full block, with its logits.
        self._blocks: "OrderedDict[bytes, tuple]" = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def _entry_bytes(self, entry: tuple) -> int:
        return sum(t.numel() * t.element_size() for t in entry if t is not None)

    def _put(self, key: bytes, entry: tuple) -> bool:
        size = self._entry_bytes(entry)
        if size > self.budget_bytes:
            return False
        while self.bytes + size > self.budget_bytes:
            _, old = self._blocks.popitem(last=False)
            self.bytes -= self._entry_bytes(old)
        self._blocks[key] = entry
        self.bytes += size
        return True

    def load(self, ids: Sequence[int], cache: KVCache) -> "tuple[int, Optional[Tensor]]":
        """Copy the longest cached prefix of `ids` into `cache` from position 0: (tokens it covers,
        the next-token logits (V,) or None). A prompt seen whole before comes back whole, with the
        logits its prefill made, so repeating a request repeats its numbers exactly; otherwise a
        run of full blocks leaving at least one token to prefill (logits None)."""
        if self.budget_bytes <= 0:
            return 0, None
        b = self.block_tokens
        digests = _digests(ids, b, len(ids) // b)
        run: list[bytes] = []
        for digest in digests:
            if digest not in self._blocks:
                break
            run.append(digest)
        whole = _whole(digests, ids, b) if len(run) == len(digests) else None
        if whole is not None and whole in self._blocks:
            keys, filled = run + [whole], len(ids)
        else:
            keys = run[: (len(ids) - 1) // b]
            filled, whole = len(keys) * b, None
        at = 0
        for key in keys:
            k, v, _ = self._blocks[key]
            n = k.shape[2]
            cache.k[:, 0, :, at : at + n] = k
            cache.v[:, 0, :, at : at + n] = v
            at += n
        for key in reversed(keys):  # leaf first: parents end up fresher than their children
            self._blocks.move_to_end(key)
        return filled, (self._blocks[whole][2] if whole is not None else None)

    def store(self, ids: Sequence[int], cache: KVCache, logits: Optional[Tensor] = None) -> None:
        """Keep the full blocks of the prompt `ids`, whose KV `cache` holds from position 0, and
        with `logits` (its last position's, (V,)) the whole prompt."""
        if self.budget_bytes <= 0:
            return
        b = self.block_tokens
        digests = _digests(ids, b, len(ids) // b)
        keys = []
        for i, digest in enumerate(digests):
            if digest not in self._blocks:
                block = (cache.k[:, 0, :, i * b : (i + 1) * b].clone(), cache.v[:, 0, :, i * b : (i + 1) * b].clone(), None)
                if not self._put(digest, block):  # (L, KV, b, hd) each
                    return
            keys.append(digest)
        if logits is not None:
            whole, start = _whole(digests, ids, b), len(digests) * b
            if whole not in self._blocks:
                tail = (cache.k[:, 0, :, start : len(ids)].clone(), cache.v[:, 0, :, start : len(ids)].clone(),
                        logits.detach().clone())
                if self._put(whole, tail):
                    keys.append(whole)
            else:
                keys.append(whole)
        for key in reversed(keys):  # leaf first, as in `load`
            if key in self._blocks:
                self._blocks.move_to_end(key)

    def clear(self) -> None:
        self._blocks.clear()
        self.bytes = 0
