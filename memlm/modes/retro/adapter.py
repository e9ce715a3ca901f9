"""RETRO as a trainable adapter of a frozen owned `Llama` (`memlm train retro`, and what the mode
loads at start): the neighbour encoder and one `ChunkedCrossAttention` per CCA layer, attached to
`layers[i].after_attention`.

`RetroAdapter.reading(model, state)` is the context a forward pass reads neighbours in (training
and generation alike); outside it the CCA layers pass x through untouched.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor, nn

from memlm.model.llama import Llama, LlamaConfig
from memlm.modes.retro.model import ChunkedCrossAttention, NeighbourEncoder, RetroConfig, RetroState, StateSlot
from memlm.train.adapter import (Adapter, ParamGroup, TrainBatch, attach_after_attention, detach_after_attention,
                                 next_token_loss)

GATE_LR_SCALE = 10.0


@dataclass
class RetroBatch(TrainBatch):
    """A micro-batch with each chunk's neighbours: ids (B, n, k, r) (n = T // m chunks of the
    inputs), valid (B, n, k, r) bool."""

    neighbours: Optional[Tensor] = None
    neighbour_valid: Optional[Tensor] = None


class RetroAdapter(Adapter):
    mode = "retro"

    def __init__(self, model_config: LlamaConfig, config: RetroConfig = RetroConfig(), seed: int = 0):
        super().__init__()
        self.config = config.resolved(model_config.n_layers)
        self.slot = StateSlot()
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global RNG alone
            torch.manual_seed(seed)
            encoder = NeighbourEncoder(model_config, self.config)
            first, *rest = self.config.layers
            self.cca = nn.ModuleDict({str(first): ChunkedCrossAttention(model_config, self.config, first, self.slot, encoder)})
            for i in rest:
                self.cca[str(i)] = ChunkedCrossAttention(model_config, self.config, i, self.slot)

    @property
    def encoder(self) -> NeighbourEncoder:
        return self.cca[str(self.config.layers[0])].encoder

    @property
    def first_layer(self) -> int:
        return self.config.layers[0]

    def attach(self, model: Llama) -> None:
        attach_after_attention(model, self.cca)

    def detach(self, model: Llama) -> None:
        detach_after_attention(model, self.cca)

    def new_state(self, model: Llama, phase: int = 0, cache=None) -> RetroState:
        return RetroState(self.config, model, phase, cache)

    def state_for(self, model: Llama, ids: Tensor, valid: Tensor) -> RetroState:
        """A state holding every chunk's neighbours at once: ids, valid (B, n, k, r) (training, scoring)."""
        state = self.new_state(model)
        for u in range(ids.shape[1]):
            state.set_neighbours(u, ids[:, u], valid[:, u])
        return state

    @contextmanager
    def attached_reading(self, model: Llama, ids: Tensor, valid: Tensor) -> Iterator[RetroState]:
        """Attached to model for the block, its forward passes reading `state_for(ids, valid)`."""
        self.attach(model)
        try:
            with self.reading(self.state_for(model, ids, valid)) as state:
                yield state
        finally:
            self.detach(model)

    @contextmanager
    def reading(self, state: RetroState) -> Iterator[RetroState]:
        """Forward passes inside read `state`'s neighbours (the adapter must be attached)."""
        previous, self.slot.state = self.slot.state, state
        try:
            yield state
        finally:
            self.slot.state = previous

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_config(cls, model_config: LlamaConfig, config: dict[str, Any], seed: int = 0) -> "RetroAdapter":
        return cls(model_config, RetroConfig.from_dict(config), seed)

    def param_groups(self) -> list[ParamGroup]:
        # Matrices decay; norm gains and the CCA gates do not (a gate decaying pulls towards the base).
        # The gates learn 10x faster: they choose which of the base's heads read the neighbours, and
        # at 1x they open ~0.01 per step (benchmarks/retro_copy_probe.py --gate-lr-scale).
        gates = [m.gate for m in self.cca.values()]
        mats = [p for p in self.parameters() if p.dim() >= 2]
        norms = [p for p in self.parameters() if p.dim() < 2 and all(p is not g for g in gates)]
        return [ParamGroup("matrices", mats, 1.0, 0.01), ParamGroup("norms", norms, 1.0, 0.0),
                ParamGroup("gates", gates, GATE_LR_SCALE, 0.0)]

    def make_batch(self, tokens: Tensor, hidden: Optional[Tensor], extra: dict[str, Any]) -> RetroBatch:
        return RetroBatch(tokens, hidden, **extra)

    def loss(self, model: Llama, batch: TrainBatch) -> Tensor:
        if not isinstance(batch, RetroBatch) or batch.neighbours is None:
            raise ValueError("retro trains on RetroBatch micro-batches with neighbours")
        with self.reading(self.state_for(model, batch.neighbours, batch.neighbour_valid)):
            return next_token_loss(model, batch, self.first_layer)


ADAPTER = RetroAdapter  # what memlm.train.adapter.adapter_class("retro") loads
