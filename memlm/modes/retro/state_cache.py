"""The frozen base model's states of a neighbour, kept across generations (an LRU by bytes).

`neighbour_states` runs each neighbour (a stored chunk and its continuation, r tokens) alone
through the base layers below the last CCA layer: on 2 CPU cores ~170 ms per neighbour, most of
what a chunk's retrieval costs (README, retro: decode speed). Those states depend on the
neighbour's token ids only (run alone at positions 0 .. r - 1, causally; the zeros padding a
short neighbour are part of the ids), not on the chunk that retrieved it, so they are keyed by
the ids themselves: a re-ingested or edited document has other ids and never hits a stale
entry, and a deleted one is simply never searched again. What is not cached and runs per chunk:
the neighbour encoder (conditioned on the chunk) and each CCA layer's key/value projection.

A RAG workload reads the same chunks again and again (the same documents answer related
questions, and a document's chunks are neighbours of each other's continuations): those reads
skip the base pass. Entries are kept in the model's dtype: a cached read gives the states a
computed one would (up to the float rounding of computing them in another batch). Used from the
model worker; the lock only guards against a second caller.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor


class NeighbourStateCache:
    """ids (r,) -> {layer: (r, D)} states, least recently used evicted past `max_bytes`."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._entries: OrderedDict[bytes, dict[int, Tensor]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def states(self, ids: Tensor, compute: Callable[[Tensor], dict[int, Tensor]]) -> dict[int, Tensor]:
        """ids (N, r) int64 -> {layer: (N, r, D)}: cached rows as they are, the others by one
        `compute` call over just those rows (same contract as `neighbour_states`)."""
        keys = [row.numpy().tobytes() for row in ids.cpu()]
        first = {}  # distinct ids -> the first row holding them
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        with self._lock:
            rows = {k: self._entries[k] for k in first if k in self._entries}
            for k in rows:
                self._entries.move_to_end(k)
        self.hits += sum(k in rows for k in keys)
        self.misses += sum(k not in rows for k in keys)
        todo = [k for k in first if k not in rows]
        if todo:
            fresh = compute(ids[[first[k] for k in todo]])
            for j, k in enumerate(todo):
                rows[k] = {layer: s[j] for layer, s in fresh.items()}
            self._insert([(k, rows[k]) for k in todo])
        layers = rows[keys[0]].keys() if keys else ()
        return {layer: torch.stack([rows[k][layer] for k in keys]) for layer in layers}

    def _insert(self, items: list[tuple[bytes, dict[int, Tensor]]]) -> None:
        if not self.max_bytes:
            return
        with self._lock:
            for key, value in items:
                size = sum(t.numel() * t.element_size() for t in value.values())
                if size > self.max_bytes or key in self._entries:
                    continue
                # a view of the batch would keep the whole batch alive: own copies
                self._entries[key] = {layer: t.clone() for layer, t in value.items()}
                self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= sum(t.numel() * t.element_size() for t in old.values())
