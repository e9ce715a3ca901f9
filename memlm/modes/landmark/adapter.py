"""Trained landmarks (`memlm train landmark`): Landmark Attention's landmark token and grouped
softmax on the frozen owned `Llama`, as trained and as read.

- Memory: blocks of `block` (64) tokens whose keys and values at every layer are the frozen model's
  own, computed reading them in context (the KV memory's rows; in training, each window's first
  seq - `local` tokens). Block rows are rotated at their offset in the block (0 .. R - 1, the
  `in_block` positions), so every block reads the same wherever it lies.
- Landmarks: one learned input embedding (`embedding`), placed right after a block (position R).
  At each memory layer it attends to that block's rows (the layer's stored keys and values) and to
  itself, at the other layers (the first) to itself alone, through the frozen layers; its key at a
  memory layer, plus a low-rank correction (`lora_a`, `lora_b`; `lora_b` zero-initialised), is the
  block's landmark key there. It depends on the
  block's stored rows alone, so the mode computes it when it loads a collection's memory
  (`landmark_keys`).
- Reading, at the memory layers: each local query (at positions R + t) takes one softmax over its
  causal local keys and the blocks' landmark logits (scale * q . landmark key + `gate_bias` of the
  layer and query head, q and the key both before RoPE: position-free, so a query far after the
  memory scores landmarks as the training's did): the grouped softmax. A block's share is then spread over its rows by a
  softmax of the query over them alone (`grouped_attention`). Training reads every block of its
  window; generation each query head's top-k blocks by landmark logit
  (memlm.kernels.landmark_reference.grouped_read_ref).
- Loss: next-token cross-entropy of each window's last `local` tokens, which see the rest of the
  window only through the landmarks, plus (`distill`, training only) at each memory layer the KL
  divergence from full attention's split of each query's mass (local keys, and per block its
  log-mass logsumexp(scale q . block rows)) to the grouped softmax's (local keys, landmark logits):
  zero exactly when the grouped softmax is full attention, a direct target for the landmark keys
  (the LM loss alone reaches them only through 29 frozen layers).
The backbone stays frozen (the measured choice for a 135M model on CPU: the landmark embedding, a
rank-8 key correction per memory layer and a gate bias per head, ~180k parameters); with the
adapter detached the model is exactly the base model.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.model.llama import Llama, LlamaConfig, SDPABackend, apply_rope
from memlm.train.adapter import Adapter, ParamGroup, TrainBatch

GATE_LR_SCALE = 10.0


@dataclass(frozen=True)
class LandmarkConfig:
    layers: tuple[int, ...] = ()  # memory layers (empty: every layer but the first)
    block: int = 64  # rows per block (the store's chunk size)
    local: int = 64  # the local tokens of each training window (the rest is memory)
    rank: int = 8  # rank of the landmark key correction
    distill: float = 1.0  # weight of the auxiliary loss pulling each landmark logit to its block's log-mass
    # the memory's first rows left out, as the service leaves out each build window's first rows
    # (landmark.min_memory_position: the attention sinks); landmarks trained with them lean on them
    min_memory_position: int = 4
    # weight of a second auxiliary loss: KL from the blocks' split of each query's memory mass
    # (softmax over blocks of their log-masses) to the landmark logits' (softmax over blocks). The
    # distillation above is dominated by the local keys, which take most of a query's mass in running
    # text; this one ranks the blocks against each other, which is what top-k selection needs
    rank_distill: float = 0.0

    def resolved(self, n_layers: int) -> "LandmarkConfig":
        layers = tuple(sorted({l % n_layers for l in self.layers})) if self.layers else tuple(range(1, n_layers))
        return LandmarkConfig(layers, self.block, self.local, self.rank, self.distill, self.min_memory_position,
                              self.rank_distill)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LandmarkConfig":
        return cls(tuple(d.get("layers", ())), d.get("block", 64), d.get("local", 64), d.get("rank", 8),
                   d.get("distill", 1.0), d.get("min_memory_position", 0),  # weights from before it kept every row
                   d.get("rank_distill", 0.0))


def unrotate(model: Llama, q: Tensor, positions: Tensor) -> Tensor:
    """Undo RoPE: q (B, H, T, D) rotated at positions (T,) -> q before RoPE. A landmark logit is
    scale * unrotate(q) . landmark key (both before RoPE) = q . the landmark key rotated at the
    query's own position: it does not depend on where the query sits, so a query any distance
    after the memory scores the landmarks as in training (RoPE's inverse: x cos - roll(x) sin)."""
    positions = positions.to(model.rope_cos.device).long()
    cos, sin = model.rope_cos[positions].to(q), model.rope_sin[positions].to(q)  # (T, D); sin's first half negated
    return q * cos - q.roll(q.shape[-1] // 2, dims=-1) * sin


def grouped_attention(q: Tensor, k: Tensor, v: Tensor, lm_keys: Tensor, block_k: Tensor, block_v: Tensor,
                      block_valid: Tensor, scale: float, gate_bias: Optional[Tensor] = None,
                      mass_error: Optional[list] = None, score_q: Optional[Tensor] = None,
                      rank_error: Optional[list] = None) -> Tensor:
    """The grouped softmax over every block (training): q (B, Hq, T, D) at the last T of the S local
    positions of k, v (B, Hkv, S, D) (causal); lm_keys (B, Hkv, nB, D); block_k, block_v (B, Hkv,
    nB, R, D); block_valid (B, nB, R) bool; gate_bias (Hq,) -> (B, Hq, T, D) in fp32.
    Each query: p = softmax([scale q . k_local (causal); scale q' . lm_b + bias]); out = sum_local p v
    + sum_b p_b * softmax_b(scale q . block rows) @ block values. mass_error, a list, gets the mean
    over queries of KL(target || p), the target putting on each block its log-mass
    logsumexp_b(scale q . rows) in place of the landmark logit: at zero the grouped softmax is
    exactly one softmax over the local keys and every row. q' = score_q (q before RoPE, with
    landmark keys before RoPE: `unrotate`), q when not given. rank_error, a list, gets the mean over
    queries of KL(softmax over blocks of their log-masses || softmax over blocks of the landmark
    logits): the blocks ranked against each other alone."""
    b, hq, t, d = q.shape
    hkv, s, nb, r = k.shape[1], k.shape[2], block_k.shape[2], block_k.shape[3]
    g = hq // hkv
    qg = q.float().reshape(b, hkv, g * t, d)  # (B, Hkv, G*T, D)
    local = (qg @ k.float().transpose(-1, -2)).view(b, hq, t, s) * scale
    causal = torch.arange(s, device=q.device)[None, :] <= (s - t + torch.arange(t, device=q.device))[:, None]
    local = local.masked_fill(~causal, float("-inf"))
    sq = qg if score_q is None else score_q.float().reshape(b, hkv, g * t, d)
    lm = (sq @ lm_keys.float().transpose(-1, -2)).view(b, hq, t, nb) * scale  # (B, Hq, T, nB)
    if gate_bias is not None:
        lm = lm + gate_bias.float().view(1, hq, 1, 1)
    lm = lm.masked_fill(~block_valid.any(-1).view(b, 1, 1, nb), float("-inf"))
    p = torch.softmax(torch.cat([local, lm], -1), -1)  # the grouped softmax's own group
    rows = (qg @ block_k.float().flatten(2, 3).transpose(-1, -2)).view(b, hkv, g * t, nb, r) * scale
    rows = rows.masked_fill(~block_valid.view(b, 1, 1, nb, r), float("-inf"))
    within = torch.softmax(rows, -1).nan_to_num(0.0)  # (B, Hkv, G*T, nB, R); empty blocks: 0
    if mass_error is not None:  # KL(full attention's split of the query's mass || the grouped softmax's)
        log_mass = torch.logsumexp(rows, -1).view(b, hq, t, nb).detach()  # each block's log-mass
        target = torch.log_softmax(torch.cat([local.detach(), log_mass], -1), -1)
        mass_error.append((target.exp() * (target - torch.log_softmax(torch.cat([local, lm], -1), -1)))
                          .nan_to_num(0.0, 0.0, 0.0).sum(-1).mean())
    if rank_error is not None and nb > 1:  # the blocks' split among themselves, the local keys left out
        log_mass = torch.logsumexp(rows, -1).view(b, hq, t, nb).detach()
        target = torch.log_softmax(log_mass, -1)
        rank_error.append((target.exp() * (target - torch.log_softmax(lm, -1))).nan_to_num(0.0, 0.0, 0.0).sum(-1).mean())
    per_block = torch.einsum("bhqnr,bhnrd->bhqnd", within, block_v.float())  # (B, Hkv, G*T, nB, D)
    out = (p[..., :s].reshape(b, hkv, g * t, s) @ v.float()).view(b, hq, t, d)
    return out + torch.einsum("bhqn,bhqnd->bhqd", p[..., s:].reshape(b, hkv, g * t, nb), per_block).view(b, hq, t, d)


class _Memory:
    """What the memory layers read during one forward: per layer (lm_keys, block_k, block_v), the
    blocks' valid mask."""

    def __init__(self, layers: dict[int, tuple[Tensor, Tensor, Tensor]], valid: Tensor, model: Llama,
                 positions: Tensor):
        self.layers, self.valid, self.model, self.positions = layers, valid, model, positions  # the queries' RoPE positions
        self.mass_errors: list[Tensor] = []  # per memory layer, while training (the distillation loss)
        self.rank_errors: list[Tensor] = []  # per memory layer, while training (the block-ranking loss)


class LandmarkBackend(nn.Module):
    """A memory layer's attention while the adapter is attached: the grouped softmax over the
    adapter's current memory, or plain causal attention when there is none."""

    def __init__(self, adapter: "LandmarkAdapter", layer: int, index: int, head_dim: int):
        super().__init__()
        self.layer, self.index, self.scale = layer, index, head_dim ** -0.5
        self._adapter = [adapter]  # a list: not a registered submodule (no parameter cycle)
        self.fallback = SDPABackend()

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        adapter = self._adapter[0]
        memory = adapter.memory
        if memory is None:
            return self.fallback(q, k, v, mask)
        if mask is not None:
            raise NotImplementedError("trained landmark attention reads a whole window (no cache mask)")
        lm, bk, bv = memory.layers[self.layer]
        errors = memory.mass_errors if adapter.training and adapter.config.distill > 0 else None
        ranks = memory.rank_errors if adapter.training and adapter.config.rank_distill > 0 else None
        score_q = unrotate(memory.model, q, memory.positions)
        return grouped_attention(q, k, v, lm, bk, bv, memory.valid, self.scale, adapter.gate_bias[self.index],
                                 errors, score_q, ranks).to(q.dtype)


class LandmarkAdapter(Adapter):
    mode = "landmark"

    def __init__(self, model_config: LlamaConfig, config: LandmarkConfig = LandmarkConfig(), seed: int = 0):
        super().__init__()
        self.config = config.resolved(model_config.n_layers)
        c, n = model_config, len(self.config.layers)
        self.kv_dim = c.n_kv_heads * c.head_dim
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global RNG alone
            torch.manual_seed(seed)
            self.embedding = nn.Parameter(torch.randn(c.dim) * 0.136)  # the token embeddings' std (SmolLM2)
            self.lora_a = nn.Parameter(torch.randn(n, self.config.rank, c.dim) / math.sqrt(c.dim))
        self.lora_b = nn.Parameter(torch.zeros(n, self.kv_dim, self.config.rank))
        self.gate_bias = nn.Parameter(torch.zeros(n, c.n_heads))
        self.memory: Optional[_Memory] = None
        self._saved: dict[int, nn.Module] = {}
        self._backends = [LandmarkBackend(self, l, i, c.head_dim) for i, l in enumerate(self.config.layers)]

    @property
    def first_layer(self) -> int:
        return 0  # the memory is the window's own tokens at every layer

    def attach(self, model: Llama) -> None:
        for backend in self._backends:
            attention = model.layers[backend.layer].attention
            if attention.backend is not backend:
                self._saved[backend.layer] = attention.backend
                attention.backend = backend

    def detach(self, model: Llama) -> None:
        for layer, previous in self._saved.items():
            model.layers[layer].attention.backend = previous
        self._saved.clear()

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @classmethod
    def from_config(cls, model_config: LlamaConfig, config: dict[str, Any], seed: int = 0) -> "LandmarkAdapter":
        return cls(model_config, LandmarkConfig.from_dict(config), seed)

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("lora", [self.lora_a, self.lora_b], 1.0, 0.01),
                ParamGroup("embedding", [self.embedding], 1.0, 0.0),
                ParamGroup("gates", [self.gate_bias], GATE_LR_SCALE, 0.0)]

    # --- landmark keys ----------------------------------------------------------------------

    def landmark_keys(self, model: Llama, block_k: dict[int, Tensor], block_v: dict[int, Tensor],
                      valid: Tensor) -> dict[int, Tensor]:
        """Each block's landmark key at every memory layer: block_k, block_v {memory layer: (N, Hkv,
        R, D)} (keys rotated in_block), valid (N, R) bool -> {memory layer: (N, Hkv, D)}, before
        RoPE (the landmark itself sits at position R, right after its block, while it reads it)."""
        c = model.config
        n, r = valid.shape
        h, kv, hd = c.n_heads, c.n_kv_heads, c.head_dim
        x = self.embedding.to(model.tok_embeddings.weight.dtype).expand(n, 1, c.dim)  # (N, 1, D)
        rope = (model.rope_cos[r : r + 1, None].to(x.dtype), model.rope_sin[r : r + 1, None].to(x.dtype))  # (1, 1, hd)
        visible = torch.cat([valid, valid.new_ones(n, 1)], 1).view(n, 1, 1, r + 1)  # the block's rows and itself
        if valid.dtype != torch.bool:
            raise ValueError("valid must be a bool mask")
        index = {l: i for i, l in enumerate(self.config.layers)}
        out: dict[int, Tensor] = {}
        for l, block in enumerate(model.layers[: self.config.layers[-1] + 1]):
            att = block.attention
            hn = block.attention_norm(x)
            qkv = att.wqkv(hn).view(n, 1, h + 2 * kv, hd)
            if l in index:  # the low-rank key correction, before RoPE
                i = index[l]
                delta = F.linear(F.linear(hn, self.lora_a[i].to(hn.dtype)), self.lora_b[i].to(hn.dtype))  # (N, 1, KV*hd)
                qkv = torch.cat([qkv[:, :, : h], qkv[:, :, h : h + kv] + delta.view(n, 1, kv, hd), qkv[:, :, h + kv :]], 2)
            qk = apply_rope(qkv[:, :, : h + kv], rope)
            q, k, v = qk[:, :, :h].transpose(1, 2), qk[:, :, h:].transpose(1, 2), qkv[:, :, h + kv :].transpose(1, 2)
            if l in index:  # a memory layer: the block's rows and itself
                keys = torch.cat([block_k[l].to(k.dtype), k], 2)  # (N, KV, R + 1, hd)
                values = torch.cat([block_v[l].to(v.dtype), v], 2)
                y = F.scaled_dot_product_attention(q, keys, values, attn_mask=visible, enable_gqa=h != kv)  # (N, H, 1, hd)
            else:  # itself alone: its value
                y = v.repeat_interleave(h // kv, dim=1)
            x = x + att.wo(y.transpose(1, 2).reshape(n, 1, h * hd))
            for module in block.after_attention:
                x = module(x, torch.full((1,), r, device=x.device))
            x = x + block.feed_forward(block.ffn_norm(x))
            if l in index:  # before RoPE: a landmark logit is position-free (see unrotate)
                out[l] = qkv[:, 0, h : h + kv]  # (N, KV, hd)
        return out

    # --- training ---------------------------------------------------------------------------

    def make_batch(self, tokens: Tensor, hidden: Optional[Tensor], extra: dict[str, Any]) -> TrainBatch:
        """extra "plant": (planter, fraction, generator) from `facts.planted_batches`: facts written
        into the windows (`--plant-facts`)."""
        unknown = set(extra) - {"plant"}
        if unknown:
            raise ValueError(f"LandmarkAdapter takes only 'plant' as extra batch data, got {sorted(unknown)}")
        if "plant" in extra:
            planter, fraction, rng = extra["plant"]
            tokens = planter.plant(tokens, fraction, rng)
        return TrainBatch(tokens, hidden)

    def loss(self, model: Llama, batch: TrainBatch) -> Tensor:
        tokens = batch.tokens  # (B, seq + 1)
        cfg = self.config
        b, seq = tokens.shape[0], tokens.shape[1] - 1
        m = seq - cfg.local
        if m <= 0 or m % cfg.block:
            raise ValueError(f"seq {seq} - local {cfg.local} must be a positive multiple of the block {cfg.block}")
        memory = window_memory(model, tokens[:, :m], cfg.block, self.config.layers)
        memory.valid[:, 0, : cfg.min_memory_position] = False  # the window's first rows, as served
        inputs, targets = tokens[:, m:seq], tokens[:, m + 1 :]
        errors: list[Tensor] = []
        ranks: list[Tensor] = []
        logits = self.read(model, memory, inputs, errors, ranks)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten().long())
        if errors:  # training only: each landmark logit pulled towards its block's log-mass
            loss = loss + cfg.distill * torch.stack(errors).mean()
        if ranks:  # training only: the blocks ranked among themselves as their log-masses rank them
            loss = loss + cfg.rank_distill * torch.stack(ranks).mean()
        return loss

    @torch.no_grad()
    def baseline_losses(self, model: Llama, tokens: Tensor) -> dict[str, float]:
        """What the local tokens' loss is worth against: without the memory ("local_only": the
        last `local` tokens alone) and with the whole window in context ("full_context"), the
        base model's plain attention. tokens (B, seq + 1)."""
        seq, local = tokens.shape[1] - 1, self.config.local
        saved, self.memory = self.memory, None  # the backends fall back to plain causal attention
        try:
            only = model(tokens[:, seq - local : seq], torch.arange(local, device=tokens.device))
            full = model(tokens[:, :seq], torch.arange(seq, device=tokens.device))[:, seq - local :]
        finally:
            self.memory = saved
        target = tokens[:, seq - local + 1 :].flatten().long()
        return {"local_only": float(F.cross_entropy(only.float().flatten(0, 1), target)),
                "full_context": float(F.cross_entropy(full.float().flatten(0, 1), target))}

    def read(self, model: Llama, memory: "WindowMemory", inputs: Tensor, mass_errors: Optional[list] = None,
             rank_errors: Optional[list] = None) -> Tensor:
        """Logits (B, T, V) of `inputs` (B, T) read after `memory`'s blocks through the landmarks
        (the adapter attached); the local tokens sit at positions R .. R + T - 1. mass_errors gets
        the memory layers' distillation errors, rank_errors their block-ranking errors (training)."""
        nb, r = memory.num_blocks, self.config.block
        keys = self.landmark_keys(model, _per_block(memory.block_k), _per_block(memory.block_v),
                                  memory.valid.flatten(0, 1))  # {layer: (B*nB, Hkv, D)}
        b = inputs.shape[0]
        layers = {l: (keys[l].view(b, nb, *keys[l].shape[1:]).transpose(1, 2), memory.block_k[l], memory.block_v[l])
                  for l in self.config.layers}
        previous, offset = self.memory, model.rope_offset
        positions = r + torch.arange(inputs.shape[1], device=inputs.device)
        self.memory, model.rope_offset = _Memory(layers, memory.valid, model, positions), r
        if mass_errors is not None:
            self.memory.mass_errors = mass_errors
        if rank_errors is not None:
            self.memory.rank_errors = rank_errors
        try:
            x = model.forward_embeds(model.embed(inputs), torch.arange(inputs.shape[1], device=inputs.device))
            return model.output(x)
        finally:
            self.memory, model.rope_offset = previous, offset


def _per_block(t: dict[int, Tensor]) -> dict[int, Tensor]:
    """{layer: (B, Hkv, nB, R, D)} -> {layer: (B*nB, Hkv, R, D)}, block-major."""
    return {l: x.transpose(1, 2).flatten(0, 1) for l, x in t.items()}


@dataclass
class WindowMemory:
    """A batch of windows' memory blocks at the memory layers: block_k, block_v {layer: (B, Hkv,
    nB, R, D)} (keys rotated in_block), valid (B, nB, R)."""

    block_k: dict[int, Tensor]
    block_v: dict[int, Tensor]
    valid: Tensor

    @property
    def num_blocks(self) -> int:
        return self.valid.shape[1]


@torch.no_grad()
def window_memory(model: Llama, tokens: Tensor, block: int, layers) -> WindowMemory:
    """The frozen model's keys and values of tokens (B, M) read in context (positions 0 .. M - 1),
    at `layers`, cut into M / block blocks, keys re-rotated at their offset in the block (the KV
    memory's in_block positions)."""
    layers = tuple(layers)
    last_layer = max(layers)
    c = model.config
    b, m = tokens.shape
    h, kv, hd = c.n_heads, c.n_kv_heads, c.head_dim
    captured: dict[int, tuple[Tensor, Tensor]] = {}

    def saver(layer: int):
        def hook(_module, _inputs, output):  # (B, M, (H + 2KV) * hd): [q; k; v], keys before RoPE
            t = output.view(b, m, h + 2 * kv, hd)
            captured[layer] = (t[:, :, h : h + kv], t[:, :, h + kv :])  # (B, M, KV, hd) each
        return hook

    hooks = [model.layers[l].attention.wqkv.register_forward_hook(saver(l)) for l in layers]
    try:
        model.forward_embeds(model.embed(tokens), torch.arange(m, device=tokens.device), layers=slice(last_layer + 1))
    finally:
        for hook in hooks:
            hook.remove()
    nb = m // block
    pos = torch.arange(block, device=tokens.device).repeat(nb)  # in_block positions
    rope = (model.rope_cos[pos, None].to(tokens.device), model.rope_sin[pos, None].to(tokens.device))  # (M, 1, hd)
    block_k, block_v = {}, {}
    for l, (k, v) in captured.items():
        k = apply_rope(k.float(), rope).to(k.dtype)  # (B, M, KV, hd)
        block_k[l] = k.permute(0, 2, 1, 3).reshape(b, kv, nb, block, hd)
        block_v[l] = v.permute(0, 2, 1, 3).reshape(b, kv, nb, block, hd)
    return WindowMemory(block_k, block_v, torch.ones(b, nb, block, dtype=torch.bool, device=tokens.device))


ADAPTER = LandmarkAdapter  # what memlm.train.adapter.adapter_class("landmark") loads
