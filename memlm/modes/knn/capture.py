"""Capturing a model's keys and values into a `KVMemory` (memlm.index.kv_memory): the model-side
half of the knn mode's derived memory. The store never runs the model; the knn mode calls this
on the model worker (memlm.modes.knn.memories).

`build_kv_memory` reads each document's token stream in windows (`window` tokens, `overlap`
shared), packs short windows into one forward pass without padding, and stops the forward after
the last stored layer. `kv_memory_for_model` creates an empty memory with the model's shape.

Two captures with one interface, `run(input_ids, position_ids) -> {layer: (K, V)}`: `_OwnedKVCapture`
for memlm's own `Llama` (what the service runs: it runs the layers itself, with a block-diagonal
causal mask for packed windows) and `_KVCapture` for transformers' Llama layout
(`model.model.layers[i].self_attn.{k,v}_proj`), the reference. Both store the same keys and
values (tests/memlm/test_owned_knn.py). Limits: Llama models; batch 1.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch

from memlm.index.kv_memory import KVMemory
from memlm.model import Llama
from memlm.models.loading import model_facts

# Windows shorter than this are packed into one forward pass (block-diagonal mask from position
# ids): on 2 CPU cores 16 documents of 64 tokens took 7.2-7.5 s one by one, 6.2-6.5 s in packs of
# 128-256 tokens and 8.0 s in one pack of 1,024 (attention under a mask grows quadratically).
PACK_TOKENS = 512


def kv_memory_for_model(path: "str | os.PathLike", model, layers: Optional[Sequence[int]] = None, **kw) -> KVMemory:
    """`KVMemory.create` with the shape facts of the model (owned or transformers; all layers by default)."""
    f = model_facts(model)
    layers = range(f.layers) if layers is None else layers
    return KVMemory.create(path, layers, f.kv_heads, f.head_dim, **kw)


@torch.inference_mode()
def build_kv_memory(
    memory: KVMemory,
    model,
    token_id_lists: Sequence[Sequence[int]],
    chunk_ids: Sequence[int],
    documents: Optional[Sequence[object]] = None,
    pack_tokens: int = PACK_TOKENS,
) -> int:
    """Run `model` over the text and store K/V of every token at `memory`'s layers (one new segment).

    token_id_lists[i] holds the token ids of chunk chunk_ids[i] (as `MemoryStore.chunk_tokens`
    returns them); consecutive chunks with the same documents[i] (default: all one document)
    are read as one token stream. A stream longer than `window` is read in windows of `window`
    tokens that overlap by `overlap`: each window starts at position 0, and of every window
    after the first only the last window - overlap tokens are kept (they had `overlap` tokens of
    left context). Windows shorter than `pack_tokens` (short documents, the tails of long
    ones) are packed, in order, into forward passes of up to `pack_tokens` tokens without
    padding. Returns rows added (one segment).
    """
    if len(token_id_lists) != len(chunk_ids):
        raise ValueError(f"{len(token_id_lists)} token lists for {len(chunk_ids)} chunk ids")
    documents = [0] * len(chunk_ids) if documents is None else list(documents)
    m = memory.manifest
    streams: list[tuple[list[int], list[int]]] = []  # (token ids, chunk id per token)
    for i, (toks, cid) in enumerate(zip(token_id_lists, chunk_ids)):
        toks = [int(t) for t in toks]
        if i == 0 or documents[i] != documents[i - 1]:
            streams.append(([], []))
        streams[-1][0].extend(toks)
        streams[-1][1].extend([int(cid)] * len(toks))

    # Windows of every stream: (token ids, first row kept, chunk id per kept row).
    pieces: list[tuple[list[int], int, list[int]]] = []
    stride = m.window - m.overlap
    for toks, cids in streams:
        start = 0
        while True:
            piece = toks[start : start + m.window]
            keep_from = 0 if start == 0 else m.overlap
            if len(piece) > keep_from:
                pieces.append((piece, keep_from, cids[start + keep_from : start + len(piece)]))
            if start + m.window >= len(toks):
                break
            start += stride

    captured = _OwnedKVCapture(model, m.layers) if isinstance(model, Llama) else _KVCapture(model, m.layers)
    keys: dict[int, list[torch.Tensor]] = {l: [] for l in m.layers}
    values: dict[int, list[torch.Tensor]] = {l: [] for l in m.layers}
    row_chunks: list[np.ndarray] = []
    row_pos: list[np.ndarray] = []
    try:
        for pack in _packs(pieces, pack_tokens):
            # One forward pass over several short windows, positions restarting at 0 in each, under
            # a block-diagonal causal mask (transformers builds it from the position ids; the owned
            # capture from where they restart): every window sees only itself, exactly as when run
            # alone (no padding anywhere).
            ids = [t for piece, _, _ in pack for t in piece]
            positions = None
            if len(pack) > 1:
                positions = torch.cat([torch.arange(len(piece)) for piece, _, _ in pack]).view(1, -1)
            kv = captured.run(torch.tensor([ids], dtype=torch.long), positions)
            offset = 0
            for piece, keep_from, cids in pack:
                lo, hi = offset + keep_from, offset + len(piece)
                for l in m.layers:
                    k, v = kv[l]  # (Hkv, T, D) each
                    keys[l].append(k[:, lo:hi].clone())
                    values[l].append(v[:, lo:hi].clone())
                row_chunks.append(np.asarray(cids, dtype=np.int64))
                row_pos.append(np.arange(keep_from, len(piece), dtype=np.int32))
                offset += len(piece)
    finally:
        captured.remove()
    if not row_chunks:
        return 0
    return memory.add(
        {l: torch.cat(keys[l], dim=1) for l in m.layers},
        {l: torch.cat(values[l], dim=1) for l in m.layers},
        np.concatenate(row_chunks),
        np.concatenate(row_pos),
    )


def _packs(pieces: list, limit: int):
    """Consecutive pieces grouped so each group's tokens stay within `limit` (a longer piece alone)."""
    group: list = []
    size = 0
    for p in pieces:
        n = len(p[0])
        if group and size + n > limit:
            yield group
            group, size = [], 0
        group.append(p)
        size += n
    if group:
        yield group


class _StopForward(Exception):
    pass


class _KVCapture:
    """Forward hooks on k_proj / v_proj of the chosen decoder layers (Llama-family layout:
    model.model.layers[i].self_attn.{k,v}_proj). k_proj's output is the key BEFORE RoPE. The
    forward stops after the last chosen layer (no later layers, no LM head)."""

    def __init__(self, model, layers: Sequence[int]):
        self.base = getattr(model, "model", model)
        c = model.config
        self.hkv = c.num_key_value_heads
        self.out: dict[int, list[Optional[torch.Tensor]]] = {l: [None, None] for l in layers}
        self.hooks = []
        decoder = self.base.layers
        for l in layers:
            attn = decoder[l].self_attn
            self.hooks.append(attn.k_proj.register_forward_hook(self._save(l, 0)))
            self.hooks.append(attn.v_proj.register_forward_hook(self._save(l, 1)))
        self.hooks.append(decoder[max(layers)].register_forward_hook(self._stop))

    def _save(self, layer: int, which: int):
        def hook(_module, _inputs, output):  # output (1, T, Hkv*D)
            t = output[0]
            self.out[layer][which] = t.view(t.shape[0], self.hkv, -1).transpose(0, 1)  # (Hkv, T, D)
        return hook

    @staticmethod
    def _stop(*_):
        raise _StopForward

    def run(
        self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """input_ids (1, T) -> {layer: (keys (Hkv, T, D), values (Hkv, T, D))}; positions 0..T-1
        unless position_ids (1, T) says otherwise (packed windows restart at 0)."""
        try:
            self.base(input_ids=input_ids, position_ids=position_ids, use_cache=False)
        except _StopForward:
            pass
        return {l: (kv[0], kv[1]) for l, kv in self.out.items()}

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


class _OwnedKVCapture:
    """`_KVCapture` for memlm's own `Llama`: runs its blocks up to the last chosen layer (no later
    layers, no output projection), taking each chosen layer's keys BEFORE RoPE and values from its
    fused QKV projection (a forward hook on `attention.wqkv`)."""

    def __init__(self, model: Llama, layers: Sequence[int]):
        self.model, self.last = model, max(layers)
        c = model.config
        self.split = (c.n_heads, c.n_kv_heads, c.head_dim)
        self.out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.hooks = [model.layers[l].attention.wqkv.register_forward_hook(self._save(l)) for l in layers]

    def _save(self, layer: int):
        H, KV, hd = self.split

        def hook(_module, _inputs, output):  # output (1, T, (H + 2KV) * hd): [q; k; v]
            t = output[0].view(output.shape[1], H + 2 * KV, hd)  # (T, H + 2KV, hd)
            self.out[layer] = (t[:, H : H + KV].transpose(0, 1), t[:, H + KV :].transpose(0, 1))  # (KV, T, hd) each
        return hook

    def run(
        self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None
    ) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """input_ids (1, T) -> {layer: (keys (Hkv, T, D), values (Hkv, T, D))}; positions 0..T-1
        unless position_ids (1, T) says otherwise (packed windows, each restarting at 0)."""
        model, T = self.model, input_ids.shape[1]
        mask = None  # plain causal
        pos = torch.arange(T, device=input_ids.device)
        if position_ids is not None:
            pos = position_ids.view(-1).to(input_ids.device)
            window = torch.cumsum(pos == 0, 0)  # (T,) which packed window each token is in
            # (T, T): True where query i may read key j: same window, j <= i
            mask = (window[:, None] == window[None, :]) & (pos[None, :] <= pos[:, None])
        x = model.embed(input_ids)  # (1, T, D)
        rope = (model.rope_cos[pos, None].to(x.dtype), model.rope_sin[pos, None].to(x.dtype))  # (T, 1, hd)
        slots = torch.arange(T, device=input_ids.device)  # no cache: slots unused but by after_attention modules
        for block in model.layers[: self.last + 1]:
            x = block(x, rope, slots, mask, None, T)
        return dict(self.out)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
