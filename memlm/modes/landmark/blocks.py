"""Block memory: a layer's stored keys and values grouped into blocks (the store's chunks), each
with a representation the queries score, so that every query head reads the rows of its top-k
blocks, chosen by the model's own attention (Landmark Attention's retrieval, training-free in the
manner of InfLLM and Quest).

`BlockKV` is a `TensorKV` (memlm.modes.knn.attention) whose `search` scores blocks, not rows:
per query head, the block scores (`representation`: "mean", q . mean key; "minmax", Quest's upper
bound sum_d max(q_d min_d, q_d max_d); "max", the block's best row score, exact: every row
scored, the ceiling the others are measured against, not flat in memory size), their top-k, and every row of those blocks as the rows
retrieved (-1 where a block is shorter than the longest). `BlockKV.attention` scores, selects and
attends to them and to the local context in one softmax through `memlm.kernels.landmark_attention`:
on CUDA one fused Triton kernel (no block score written out), on CPU its PyTorch reference, or, for
"max" over large memories, FAISS choosing the blocks first.

Positions (`load_block_memories`, POSITIONS): "fixed" leaves every memory key at position 0
(RoPE is the identity; the local context from 0): InfLLM's rule, far blocks without their
offsets; "in_block" rotates each key at its offset within its block (0 .. 63) and starts the
local context at the block size, so whatever blocks a head reads sit right before the prompt,
each in its own order; "original" rotates each key at the position it had in its build window
(0 .. window - 1, knn's rule) and starts the local context after one window, so neighbouring
blocks of a document keep their relative order (a fact cut by a block boundary reads whole).
None depends on where a block lies in the memory, so memories far beyond the model's 8k
positions read the same way.

Shapes: Hkv KV heads, Hq = G * Hkv query heads, D head dim, N rows, nB blocks, R the longest
block's rows.
"""
from __future__ import annotations

from functools import partial
from typing import Optional

import numpy as np
import torch

from memlm.index.kv_memory import KVMemory
from memlm.kernels import landmark_attention
from memlm.kernels.landmark_reference import block_scores_ref, grouped_read_ref, read_blocks_ref
from memlm.modes.knn.attention import TensorKV
from memlm.modes.knn.reading import (
    LayerMemories, LayerMemory, ReadConfig, _pick_rows, _read_layer, num_layers, resolve_layers, rotate_keys,
)

POSITIONS = ("fixed", "in_block", "original")
REPRESENTATIONS = ("mean", "minmax", "max", "trained")
# "max" on CPU scores rows through FAISS from this many rows on; below, one torch matmul is faster
# (benchmarks/landmark_decode.py, 2 threads: 4k rows 5.90 vs 4.40 tok/s, 16k 3.49 vs 3.24, 64k 0.92 vs 1.94).
FAISS_FROM_ROWS = 16384


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
    """One layer's memory as blocks: rows (keys rotated as they are read), the block table, and the
    blocks' representations: per group of `group` rows of a block (the whole block by default)
    its mean key ("mean") or its min and max keys ("minmax"), a block scoring as its best group;
    "max" keeps none and scores every row. `candidates` > 0: the representations only shortlist
    that many blocks per query head, which are then ranked by their best row (exact)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, representation: str = "minmax",
                 group: Optional[int] = None, candidates: int = 0, faiss_from_rows: int = FAISS_FROM_ROWS,
                 landmarks: Optional[torch.Tensor] = None, gate_bias: Optional[torch.Tensor] = None,
                 grouped_softmax: bool = True):
        super().__init__(keys, values)
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation={representation!r} is not one of {REPRESENTATIONS}")
        if (representation == "trained") != (landmarks is not None):
            raise ValueError("representation 'trained' needs the blocks' landmark keys (Hkv, nB, D), and only it")
        self.rows, self.representation, self.candidates = rows.to(keys.device), representation, candidates  # (nB, R)
        self.reads = torch.zeros(rows.shape[0], dtype=torch.int64)  # per block: query heads that read it
        self.mass = torch.zeros(rows.shape[0], dtype=torch.float64)  # per block: decode steps' attention on it
        nb, r = self.rows.shape
        self.group = max(1, min(group or r or 1, r or 1))
        s_ = -(-r // self.group) if r else 0  # groups per block
        grouped = torch.nn.functional.pad(self.rows, (0, s_ * self.group - r), value=-1).view(nb, s_, self.group)
        # the kernel's representation arguments: entries (Hkv, nB*S, D), block -> its S entries (-1: none)
        self.reps: dict[str, torch.Tensor] = {}
        self.gate_bias = gate_bias  # "trained": (Hq,) added to the landmark logits
        # "trained": True, the paper's grouped softmax (a block's share = its landmark logit); False,
        # the landmarks only choose the blocks and their rows enter the one softmax (a block's share =
        # its rows' own attention, as for the other representations)
        self.grouped = grouped_softmax
        # "trained": (q (B, H, T, D), RoPE positions (T,)) -> q before RoPE, and the local context's
        # first RoPE position: landmark logits are position-free (memlm.modes.landmark.adapter.unrotate)
        self.unrotate, self.query_offset = None, 0
        if representation == "trained":  # one landmark key per block; read by the grouped softmax
            self.reps = {"rep_k": landmarks.to(keys.device), "rep_rows": torch.arange(nb, device=keys.device).view(nb, 1)}
        elif representation != "max":  # "max": the rows themselves (the kernel's default)
            present = (grouped >= 0)[None, ..., None]  # (1, nB, S, g, 1)
            gathered = keys[:, grouped.clamp(min=0)].float()  # (Hkv, nB, S, g, D)
            entries = torch.arange(nb * s_, device=keys.device).view(nb, s_).masked_fill(~(grouped >= 0).any(-1), -1)
            self.reps["rep_rows"] = entries
        if representation == "mean":
            self.reps["rep_k"] = ((gathered * present).sum(3) / present.sum(3).clamp(min=1)).flatten(1, 2)
        elif representation == "minmax":
            big = torch.finfo(torch.float32).max
            self.reps["rep_k"] = torch.where(present, gathered, -big).amax(3).flatten(1, 2)  # upper keys
            self.reps["rep_low"] = torch.where(present, gathered, big).amin(3).flatten(1, 2)
        self._key_index = None  # "max" on CPU: per KV head a FAISS fp16 index over the keys (a second fp16 copy)
        if representation == "max" and keys.device.type == "cpu" and nb and self.num_rows >= faiss_from_rows:
            import faiss

            self._key_index = []
            for h in range(self.num_kv_heads):
                ix = faiss.IndexScalarQuantizer(self.head_dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
                ix.add(np.ascontiguousarray(keys[h].float().numpy()))
                self._key_index.append(ix)
            row_block = np.full(self.num_rows, -1, np.int64)
            r_idx = self.rows.cpu().numpy()
            row_block[r_idx[r_idx >= 0]] = np.nonzero(r_idx >= 0)[0]
            self._row_block = row_block

    @property
    def num_blocks(self) -> int:
        return self.rows.shape[0]

    @property
    def nbytes(self) -> int:
        return super().nbytes + sum(t.nbytes for t in self.reps.values()) + self.rows.nbytes

    def block_scores(self, q: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, Tq, D) -> scores (B, Hq, Tq, nB) fp32 by the representation (GQA: head h
        scores KV head h // G's blocks)."""
        if self.representation == "max":  # every row scored, the block's best: the selection's ceiling
            return block_scores_ref(q, self.keys, self.rows)
        if self.representation == "trained":
            return block_scores_ref(q, self.reps["rep_k"], self.reps["rep_rows"])
        return block_scores_ref(q, self.reps["rep_k"], self.reps["rep_rows"], self.reps.get("rep_low"))

    def _best_rows(self, q: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, Tq, D), blocks (B, Hq, Tq, M) -> each block's best row score (B, Hq, Tq, M) fp32
        (GQA: head h reads KV head h // G)."""
        rows = self.rows[blocks]  # (B, Hq, Tq, M, R)
        hq = q.shape[1]
        head = (torch.arange(hq, device=q.device) // (hq // self.num_kv_heads)).view(1, hq, 1, 1, 1)
        k = self.keys[head.expand_as(rows), rows.clamp(min=0)].float()  # (B, Hq, Tq, M, R, D)
        s = torch.einsum("bhtd,bhtmrd->bhtmr", q.float(), k).masked_fill(rows < 0, float("-inf"))
        return s.amax(-1)

    def _faiss_top_blocks(self, q: torch.Tensor, kb: int) -> tuple[torch.Tensor, torch.Tensor]:
        """"max" through FAISS (the CPU path, batch 1): per KV head the top kb * R rows of each
        query (an fp16 scan in C++, like ungated knn's), their blocks in order of first appearance
        (= by best row), the first kb: the same blocks as `block_scores` + topk (kb * R rows always
        hold kb distinct blocks). -> (scores, blocks) (1, Hq, Tq, kb)."""
        _, hq, tq, d = q.shape
        hkv, g = self.num_kv_heads, hq // self.num_kv_heads
        m = min(self.num_rows, kb * self.rows.shape[1])
        qg = q.float().reshape(hkv, g * tq, d).cpu().numpy()
        scores = np.full((hkv, g * tq, kb), -np.inf, np.float32)
        blocks = np.zeros((hkv, g * tq, kb), np.int64)
        for h in range(hkv):
            dist, idx = self._key_index[h].search(np.ascontiguousarray(qg[h]), m)  # (G*Tq, m), best first
            found = self._row_block[np.where(idx >= 0, idx, 0)]
            for j in range(g * tq):
                _, first = np.unique(found[j], return_index=True)
                first = np.sort(first)[:kb]
                blocks[h, j, : len(first)], scores[h, j, : len(first)] = found[j, first], dist[j, first]
        return (torch.from_numpy(scores).view(1, hq, tq, kb).to(q.device),
                torch.from_numpy(blocks).view(1, hq, tq, kb).to(q.device))

    def select_blocks(self, q, k, *, shared_per_kv_head=False) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query head's top-k blocks (at most the block count): (scores, blocks) (B, Hq, Tq, kb)
        -- through FAISS ("max" on CPU from `faiss_from_rows` rows), the shortlist (`candidates`),
        per KV group (shared_per_kv_head, by the group's mean score), or all block scores."""
        b, hq, tq, _ = q.shape
        kb = min(k, self.num_blocks)
        if self._key_index is not None and b == 1 and not shared_per_kv_head and kb:
            return self._faiss_top_blocks(q, kb)
        scores = self.block_scores(q)
        if shared_per_kv_head:
            g = hq // self.num_kv_heads
            scores = scores.view(b, self.num_kv_heads, g, tq, -1).mean(2, keepdim=True).expand(-1, -1, g, -1, -1)
            scores = scores.reshape(b, hq, tq, -1)
        if self._shortlists(kb):
            shortlist = scores.topk(self.candidates, dim=-1).indices  # (B, Hq, Tq, M)
            top_scores, pick = self._best_rows(q, shortlist).topk(kb, dim=-1)
            return top_scores, shortlist.gather(-1, pick)
        return scores.topk(kb, dim=-1)  # (B, Hq, Tq, kb)

    def _shortlists(self, kb: int) -> bool:
        return kb < self.candidates < self.num_blocks and self.representation not in ("max", "trained")

    def search(self, q, k, *, shared_per_kv_head=False):
        """Every row of each query head's top-k blocks: (scores (B, Hq, Tq, kb * R), rows, -1 padded)."""
        top_scores, top = self.select_blocks(q, k, shared_per_kv_head=shared_per_kv_head)
        self.reads += torch.bincount(top.flatten().cpu(), minlength=self.num_blocks)
        rows = self.rows[top]  # (B, Hq, Tq, kb, R)
        return top_scores[..., None].expand_as(rows).flatten(-2), rows.flatten(-2)

    def attention(self, q, k_cache, v_cache, top_k, *, shared_per_kv_head=False, scale=None, gate=None):
        """`KVStore.attention`: one softmax over the local context and the top blocks' rows. Scoring
        by the representations, selection and the read run in one `memlm.kernels.landmark_attention`
        call (the fused Triton kernel on CUDA, its reference on CPU); the CPU's FAISS "max", the
        shortlist and shared selection choose first and read through the reference. Counts the
        blocks each query head read (`reads`) and, at a decode step (Tq = 1), the share of the
        softmax that fell on each block's rows, summed over heads (`mass`: what citations rank by).
        With a gate (Memorizing Transformers' mix) the reading is knn's, through `search`."""
        if gate is not None or self.num_blocks == 0:
            return super().attention(q, k_cache, v_cache, top_k, shared_per_kv_head=shared_per_kv_head, scale=scale,
                                     gate=gate)
        kb = min(top_k, self.num_blocks)
        if self.representation == "trained":  # the grouped softmax over position-free landmark logits
            tk, tq = k_cache.shape[2], q.shape[2]
            positions = self.query_offset + torch.arange(tk - tq, tk, device=q.device)
            score_q = self.unrotate(q, positions) if self.unrotate is not None else q
        if self.representation == "trained" and not shared_per_kv_head:
            out, reads = landmark_attention(q, k_cache, v_cache, self.keys, self.values, self.rows, top_k,
                                            grouped=self.grouped, gate_bias=self.gate_bias if self.grouped else None,
                                            score_q=score_q, scale=scale, **self.reps)
        elif self.representation == "trained" and not self.grouped:  # one choice per KV group, rows read
            top_scores, top = self.select_blocks(score_q, top_k, shared_per_kv_head=True)
            out, reads, _ = read_blocks_ref(q, k_cache, v_cache, self.keys, self.values, self.rows, top, top_scores,
                                            scale=scale)
        elif self.representation == "trained":  # one choice per KV group, then the grouped softmax
            top_scores, top = self.select_blocks(score_q, top_k, shared_per_kv_head=True)
            scale = q.shape[-1] ** -0.5 if scale is None else scale
            logits = top_scores * scale
            if self.gate_bias is not None:
                logits = logits + self.gate_bias.to(logits.device, logits.dtype).view(1, -1, 1, 1)
            out, reads, _ = grouped_read_ref(q, k_cache, v_cache, self.keys, self.values, self.rows, top, logits,
                                             scale=scale)
        elif self._key_index is None and not shared_per_kv_head and not self._shortlists(kb):
            out, reads = landmark_attention(q, k_cache, v_cache, self.keys, self.values, self.rows, top_k,
                                            scale=scale, **self.reps)
        else:
            top_scores, top = self.select_blocks(q, top_k, shared_per_kv_head=shared_per_kv_head)
            out, reads, _ = read_blocks_ref(q, k_cache, v_cache, self.keys, self.values, self.rows, top, top_scores,
                                            scale=scale)
        read = reads.blocks >= 0
        self.reads += torch.bincount(reads.blocks[read].cpu(), minlength=self.num_blocks)
        if q.shape[2] == 1:
            self.mass.index_add_(0, reads.blocks[read].cpu(), reads.mass[read].double().cpu())
        return out


def load_block_memories(model, memory: KVMemory, *, layers, top_k: int, representation: str, positions: str,
                        min_memory_position: int = 4, group: Optional[int] = None, candidates: int = 0,
                        landmarks=None, grouped: bool = True) -> tuple[LayerMemories, np.ndarray, int]:
    """Every live row of `memory` at `layers` as `BlockKV` stores, blocks = chunks -> (layer
    memories, the chunk id of each block, the local context's first position). representation
    "trained": `landmarks` (a `memlm.modes.landmark.adapter.LandmarkAdapter`) computes each block's
    landmark key from its rows at its memory layers, which are then the layers read (positions
    in_block, as trained); grouped: read them by the grouped softmax (True) or only choose the
    blocks by them and read the chosen rows in the one softmax (False; `BlockKV`)."""
    if representation == "trained":
        if landmarks is None:
            raise ValueError("representation 'trained' needs the trained landmarks (memlm train landmark)")
        if positions != "in_block":
            raise ValueError(f"trained landmarks read blocks at in_block positions (as trained), not {positions!r}")
        missing = sorted(set(landmarks.config.layers) - set(memory.layers))
        if missing:
            raise ValueError(f"trained landmarks need the memory's keys and values at layers {missing} too")
        layers = landmarks.config.layers
    layers = resolve_layers(layers, num_layers(model))
    layers = tuple(l for l in layers if l in memory.layers) or tuple(memory.layers)
    device = next(model.parameters()).device
    if positions not in POSITIONS:
        raise ValueError(f"positions={positions!r} is not one of {POSITIONS}")
    picks, row_chunks, window_pos, _ids = _pick_rows(memory, memory.manifest.segments, min_memory_position)
    block_ids, rows, offsets = block_layout(row_chunks)
    offset = {"fixed": 0, "in_block": rows.shape[1], "original": memory.manifest.window}[positions]
    at = {"in_block": torch.from_numpy(offsets), "original": window_pos}.get(positions)
    config = ReadConfig(layers=layers, top_k=top_k, positions="fixed", local_offset=offset,
                        min_memory_position=min_memory_position)
    out = LayerMemories(config, device, memory.manifest.segments, row_chunks)
    rows_t = torch.from_numpy(rows)
    kv = {}
    for l in layers:
        k, v = _read_layer(memory, picks, l)  # on-disk dtype (fp16): what the attention gathers from
        if at is not None:
            k = rotate_keys(model, k, at).to(v.dtype)
        kv[l] = (k.to(device), v.to(device))
    keys = _landmark_keys(model, landmarks, kv, rows_t.to(device)) if representation == "trained" else {}
    for l in layers:
        extra = {}
        if representation == "trained":
            extra = dict(landmarks=keys[l], gate_bias=landmarks.gate_bias[landmarks.config.layers.index(l)].detach(),
                         grouped_softmax=grouped)
        store = BlockKV(*kv[l], rows_t, representation, group=group, candidates=candidates, **extra)
        if representation == "trained":
            from memlm.modes.landmark.adapter import unrotate

            store.unrotate, store.query_offset = partial(unrotate, model), offset
        out[l] = LayerMemory(store, top_k, False)
    return out, block_ids, offset


_LANDMARK_BLOCKS = 256  # blocks whose landmark keys are computed at a time


@torch.no_grad()
def _landmark_keys(model, landmarks, kv: dict, rows: torch.Tensor) -> dict[int, torch.Tensor]:
    """{memory layer: (Hkv, nB, D)} landmark keys of every block, from its rows' keys (rotated
    in_block) and values at the memory layers."""
    parts: dict[int, list] = {l: [] for l in landmarks.config.layers}
    for b0 in range(0, rows.shape[0], _LANDMARK_BLOCKS):
        r = rows[b0 : b0 + _LANDMARK_BLOCKS]
        idx = r.clamp(min=0)
        bk = {l: k[:, idx].transpose(0, 1) for l, (k, _) in kv.items()}  # (n, Hkv, R, D)
        bv = {l: v[:, idx].transpose(0, 1) for l, (_, v) in kv.items()}
        for l, key in landmarks.landmark_keys(model, bk, bv, r >= 0).items():
            parts[l].append(key)
    return {l: torch.cat(p).transpose(0, 1).contiguous() if p else kv[l][0].new_zeros(kv[l][0].shape[0], 0,
                                                                                        kv[l][0].shape[2])
            for l, p in parts.items()}


def blocks_read(memories: LayerMemories, block_ids: np.ndarray, n: Optional[int] = None) -> list[tuple[int, float]]:
    """(chunk id, share) of the blocks read most, most first: by the attention the decode steps
    put on their rows (summed over heads and layers, as a share of all of it), or, before any
    decode step, by how often heads picked them."""
    mass = sum((m.store.mass for m in memories.values()), torch.zeros(len(block_ids), dtype=torch.float64))
    if not mass.sum() > 0:
        mass = sum((m.store.reads for m in memories.values()), torch.zeros(len(block_ids), dtype=torch.int64)).double()
    total = float(mass.sum()) or 1.0
    order = torch.argsort(mass, descending=True, stable=True)
    picked = [(int(block_ids[i]), float(mass[i]) / total) for i in order.tolist() if mass[i] > 0]
    return picked[:n] if n is not None else picked
