"""Block memory: a layer's stored keys and values grouped into blocks (the store's chunks), each
with a representation the queries score, so that every query head reads the rows of its top-k
blocks, chosen by the model's own attention (Landmark Attention's retrieval, training-free in the
manner of InfLLM and Quest).

`BlockKV` is a `TensorKV` (memlm.modes.knn.attention) whose `search` scores blocks, not rows:
per query head, the block scores (`representation`: "mean", q . mean key; "minmax", Quest's upper
bound sum_d max(q_d min_d, q_d max_d)), their top-k, and every row of those blocks as the rows
retrieved (-1 where a block is shorter than the longest). `KVStore.attention` then attends to them
and to the local context in one softmax (`memlm.kernels.knn_attention`). On CPU that is the
PyTorch reference; the fused GPU kernel (scoring, selection and gather without writing scores out)
is not written yet.

Positions (`load_block_memories`): "fixed" leaves every memory key at position 0 (RoPE is the
identity; the local context from 0): InfLLM's rule, far blocks without their offsets; "in_block"
rotates each key at its offset within its block (0 .. 63) and starts the local context at the
block size, so whatever blocks a head reads sit right before the prompt, each in its own order.
Neither depends on where a block lies in the memory, so memories far beyond the model's 8k
positions read the same way.

Shapes: Hkv KV heads, Hq = G * Hkv query heads, D head dim, N rows, nB blocks, R the longest
block's rows.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from memlm.index.kv_memory import KVMemory
from memlm.modes.knn.attention import TensorKV
from memlm.modes.knn.reading import (
    LayerMemories, LayerMemory, ReadConfig, _pick_rows, _read_layer, num_layers, resolve_layers, rotate_keys,
)


def block_layout(row_blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """row_blocks (N,) block id of each row, rows of a block contiguous -> (block ids (nB,) in
    memory order, rows (nB, R) int64 row indices padded with -1, offsets (N,) each row's index
    within its block)."""
    n = len(row_blocks)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.concatenate([[True], row_blocks[1:] != row_blocks[:-1]]))
    lengths = np.diff(np.concatenate([starts, [n]]))
    offsets = np.arange(n) - np.repeat(starts, lengths)
    rows = np.full((len(starts), int(lengths.max())), -1, np.int64)
    rows[np.repeat(np.arange(len(starts)), lengths), offsets] = np.arange(n)
    return row_blocks[starts].astype(np.int64), rows, offsets


class BlockKV(TensorKV):
    """One layer's memory as blocks: rows (keys rotated as they are read), the block table, and
    each block's representation (Hkv, nB, D) ("mean") or its min and max keys ("minmax")."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, representation: str = "minmax"):
        super().__init__(keys, values)
        if representation not in ("mean", "minmax"):
            raise ValueError(f"representation={representation!r} is not 'mean' or 'minmax'")
        self.rows, self.representation = rows.to(keys.device), representation  # (nB, R)
        self.reads = torch.zeros(rows.shape[0], dtype=torch.int64)  # per block: query heads that read it
        if self.rows.numel() == 0:  # no blocks
            self.mean = self.low = self.high = keys.new_zeros(self.num_kv_heads, self.rows.shape[0], self.head_dim).float()
            return
        present = (self.rows >= 0)[None, :, :, None]  # (1, nB, R, 1)
        gathered = keys[:, self.rows.clamp(min=0)].float()  # (Hkv, nB, R, D)
        if representation == "mean":
            self.mean = (gathered * present).sum(2) / present.sum(2).clamp(min=1)  # (Hkv, nB, D)
        else:
            big = torch.finfo(torch.float32).max
            self.low = torch.where(present, gathered, big).amin(2)  # (Hkv, nB, D)
            self.high = torch.where(present, gathered, -big).amax(2)

    @property
    def num_blocks(self) -> int:
        return self.rows.shape[0]

    @property
    def nbytes(self) -> int:
        reps = self.mean.nbytes if self.representation == "mean" else self.low.nbytes + self.high.nbytes
        return super().nbytes + reps + self.rows.nbytes

    def block_scores(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, Tq, D) -> scores (B, Hq, Tq, nB) fp32 (GQA: head h scores KV head h // G's blocks)."""
        b, hq, tq, d = q.shape
        hkv = self.num_kv_heads
        qg = q.float().reshape(b, hkv, (hq // hkv) * tq, d)  # (B, Hkv, G*Tq, D)
        if self.representation == "mean":
            s = qg @ self.mean.transpose(1, 2)
        else:  # Quest: per dim the larger of q * min and q * max
            s = qg.clamp(min=0) @ self.high.transpose(1, 2) + qg.clamp(max=0) @ self.low.transpose(1, 2)
        return s.view(b, hq, tq, -1)

    def search(self, q, k, *, shared_per_kv_head=False):
        """Every row of each query head's top-k blocks: (scores (B, Hq, Tq, k * R), rows, -1 padded)."""
        b, hq, tq, _ = q.shape
        kb = min(k, self.num_blocks)
        if kb == 0:
            empty = torch.zeros(b, hq, tq, 0, device=q.device)
            return empty, empty.long()
        scores = self.block_scores(q)
        if shared_per_kv_head:  # one choice per KV group, by the group's mean score
            g = hq // self.num_kv_heads
            scores = scores.view(b, self.num_kv_heads, g, tq, -1).mean(2, keepdim=True).expand(-1, -1, g, -1, -1)
            scores = scores.reshape(b, hq, tq, -1)
        top_scores, top = scores.topk(kb, dim=-1)  # (B, Hq, Tq, kb)
        self.reads += torch.bincount(top.flatten().cpu(), minlength=self.num_blocks)
        rows = self.rows[top]  # (B, Hq, Tq, kb, R)
        return top_scores[..., None].expand_as(rows).flatten(-2), rows.flatten(-2)


def load_block_memories(model, memory: KVMemory, *, layers, top_k: int, representation: str, positions: str,
                        min_memory_position: int = 4) -> tuple[LayerMemories, np.ndarray, int]:
    """Every live row of `memory` at `layers` as `BlockKV` stores, blocks = chunks -> (layer
    memories, the chunk id of each block, the local context's first position)."""
    layers = resolve_layers(layers, num_layers(model))
    layers = tuple(l for l in layers if l in memory.layers) or tuple(memory.layers)
    device = next(model.parameters()).device
    picks, row_chunks, _pos, _ids = _pick_rows(memory, memory.manifest.segments, min_memory_position)
    block_ids, rows, offsets = block_layout(row_chunks)
    offset = rows.shape[1] if positions == "in_block" else 0
    config = ReadConfig(layers=layers, top_k=top_k, positions="fixed", local_offset=offset,
                        min_memory_position=min_memory_position)
    out = LayerMemories(config, device, memory.manifest.segments, row_chunks)
    rows_t = torch.from_numpy(rows)
    for l in layers:
        k, v = _read_layer(memory, picks, l)  # on-disk dtype (fp16): what the attention gathers from
        if positions == "in_block":
            k = rotate_keys(model, k, torch.from_numpy(offsets)).to(v.dtype)
        out[l] = LayerMemory(BlockKV(k.to(device), v.to(device), rows_t, representation), top_k, False)
    return out, block_ids, offset


def blocks_read(memories: LayerMemories, block_ids: np.ndarray, n: Optional[int] = None) -> list[int]:
    """The chunk ids of the blocks read most (query heads x layers x steps), most first."""
    total = sum((m.store.reads for m in memories.values()), torch.zeros(len(block_ids), dtype=torch.int64))
    order = torch.argsort(total, descending=True, stable=True)
    picked = [int(block_ids[i]) for i in order.tolist() if total[i] > 0]
    return picked[:n] if n is not None else picked
