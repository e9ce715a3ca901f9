"""RETRO's neighbour encoder and chunked cross-attention (CCA), for a frozen owned `Llama`.

From "Improving language models by retrieving from trillions of tokens" (Borgeaud et al. 2022:
section 2 and its Listing 1; RETRO-fitting: the base frozen, only the encoder and the CCA trained)
with Megatron-LM's layout for deep models (CCA every third layer from layer 9, a 2-layer encoder,
2 neighbours).

A sequence is cut into chunks of m tokens (64): chunk u holds positions [u*m, (u+1)*m). Each
completed chunk u gets k neighbours from the store (2), each a retrieved chunk and its
continuation (64 + 64 tokens; fewer at a document's end, none when the store has nothing). At the
first CCA layer the encoder reads each neighbour bidirectionally, cross-attending to the decoder's
states of chunk u there (H_u: the residual stream after that layer's self-attention), and gives
E_u, k * r rows of width E. At every CCA layer the queries at positions
[u*m + m - 1, (u+1)*m + m - 1) attend to E_u (`memlm.kernels.chunked_attention`): a neighbour of
chunk u is read from u's last token on, never earlier; the first m - 1 positions read nothing.
The CCA's queries and keys are RMS-normed per head (QK-norm: logits of O(1) from the start, so
attention can pick the matching rows instead of averaging them; the embedded neighbour tokens are
RMS-normed too). A CCA layer adds tanh(gate) * wo(attention) to the residual stream with gate initialised to 0, so
before training, or with no neighbours, the model is exactly the base model.

Generation with a KV cache runs the same modules one token at a time: a `RetroState` holds each
chunk's neighbours (set by the mode before the forward pass that needs them), the encoder's
outputs and each CCA layer's projected keys/values per chunk (computed once per chunk), and the
decoder states of the chunk not completed yet (at most m - 1 rows). Nothing earlier is recomputed.

Shapes: B batch, T queries, D decoder width, E encoder width, m chunk tokens, k neighbours, r
neighbour tokens (<= neighbour_tokens + continuation_tokens), L = k * r rows per chunk, Hc heads
of dh = E // Hc (encoder and CCA alike).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.kernels import chunked_cross_attention
from memlm.kernels.chunked_attention import chunk_read_by
from memlm.model.llama import LlamaConfig, RMSNorm, apply_rope


@dataclass
class RetroConfig:
    chunk_tokens: int = 64  # m
    neighbours: int = 2  # k per chunk
    neighbour_tokens: int = 64  # the retrieved chunk
    continuation_tokens: int = 64  # and what follows it in its document
    # CCA after the attention of these layers (negative: from the top). Megatron's rule for a deep
    # model: from layer 9 (1-based) every 3rd -> 0-based 8, 11, ..., 29 for 30 layers.
    layers: tuple[int, ...] = (8, 11, 14, 17, 20, 23, 26, 29)
    encoder_layers: int = 2
    encoder_dim: int = 128  # E (small: 2.3M trainable parameters in all with these defaults)
    heads: int = 4  # Hc, encoder and CCA (dh = 32)
    encoder_ffn: int = 384  # SwiGLU width of the encoder
    rope_theta: float = 10000.0  # positions inside a neighbour (encoder self-attention)

    @property
    def neighbour_length(self) -> int:  # r at most
        return self.neighbour_tokens + self.continuation_tokens

    def resolved(self, n_layers: int) -> "RetroConfig":
        """With layers as sorted 0-based indices of a model of n_layers; ValueError if they do not fit."""
        if not self.layers or any(not -n_layers <= i < n_layers for i in self.layers):
            raise ValueError(f"retro layers {self.layers} do not fit a model of {n_layers} layers")
        if self.encoder_dim % self.heads:
            raise ValueError(f"encoder_dim={self.encoder_dim} is not a multiple of heads={self.heads}")
        if self.chunk_tokens < 1 or self.neighbours < 1 or self.neighbour_tokens < 1 or self.continuation_tokens < 0:
            raise ValueError(f"retro chunk/neighbour sizes must be positive: {self}")
        return dataclasses.replace(self, layers=tuple(sorted({i % n_layers for i in self.layers})))

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RetroConfig":
        d = dict(d)
        if "layers" in d:
            d["layers"] = tuple(d["layers"])
        return cls(**d)


def _heads(x: Tensor, h: int) -> Tensor:
    """(N, S, h * dh) -> (N, h, S, dh)."""
    return x.unflatten(-1, (h, -1)).transpose(1, 2)


def _masked_attention(q: Tensor, k: Tensor, v: Tensor, valid: Optional[Tensor]) -> Tensor:
    """q (N, h, S, dh), k, v (N, h, S', dh), valid (N, S') bool or None -> (N, h, S, dh).
    A finite floor for hidden keys: a row with none valid gets uniform weights, never NaN."""
    mask = None
    if valid is not None:
        mask = torch.zeros(valid.shape, dtype=q.dtype, device=q.device).masked_fill(~valid, torch.finfo(q.dtype).min)
        mask = mask[:, None, None, :]  # (N, 1, 1, S')
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class EncoderLayer(nn.Module):
    """Bidirectional self-attention within a neighbour, cross-attention to its chunk's decoder
    states, SwiGLU MLP; pre-norm residual blocks."""

    def __init__(self, config: RetroConfig, context_dim: int, eps: float):
        super().__init__()
        E, self.h = config.encoder_dim, config.heads
        self.self_norm = RMSNorm(E, eps)
        self.wqkv = nn.Linear(E, 3 * E, bias=False)
        self.wo = nn.Linear(E, E, bias=False)
        self.cross_norm = RMSNorm(E, eps)
        self.wq_cross = nn.Linear(E, E, bias=False)
        self.wkv_cross = nn.Linear(context_dim, 2 * E, bias=False)
        self.wo_cross = nn.Linear(E, E, bias=False)
        nn.init.zeros_(self.wo_cross.weight)  # the encoder starts as the neighbour's own; conditioning is learned
        self.ffn_norm = RMSNorm(E, eps)
        self.w13 = nn.Linear(E, 2 * config.encoder_ffn, bias=False)
        self.w2 = nn.Linear(config.encoder_ffn, E, bias=False)

    def forward(self, h: Tensor, valid: Tensor, rope: tuple[Tensor, Tensor], context: Tensor,
                context_valid: Optional[Tensor]) -> Tensor:
        """h (N, r, E), valid (N, r), rope cos/sin (r, 1, dh), context (N, m, D) and which of its rows
        are real (N, m) or None (all) -> (N, r, E)."""
        qkv = self.wqkv(self.self_norm(h)).unflatten(-1, (3 * self.h, -1))  # (N, r, 3h, dh)
        qk = apply_rope(qkv[:, :, : 2 * self.h], rope)
        q, k = qk[:, :, : self.h].transpose(1, 2), qk[:, :, self.h :].transpose(1, 2)  # (N, h, r, dh)
        v = qkv[:, :, 2 * self.h :].transpose(1, 2)
        h = h + self.wo(_masked_attention(q, k, v, valid).transpose(1, 2).flatten(2))
        q = _heads(self.wq_cross(self.cross_norm(h)), self.h)  # (N, h, r, dh)
        k, v = (_heads(t, self.h) for t in self.wkv_cross(context).chunk(2, dim=-1))  # (N, h, m, dh)
        h = h + self.wo_cross(_masked_attention(q, k, v, context_valid).transpose(1, 2).flatten(2))
        gate, up = self.w13(self.ffn_norm(h)).chunk(2, dim=-1)
        return h + self.w2(F.silu(gate) * up)


class NeighbourEncoder(nn.Module):
    """Neighbour tokens (embedded by the frozen decoder's table) -> E rows, conditioned on the
    decoder's states of the chunk they were retrieved for."""

    def __init__(self, model_config: LlamaConfig, config: RetroConfig):
        super().__init__()
        D, E, eps = model_config.dim, config.encoder_dim, model_config.rms_norm_eps
        self.config = config
        self.embed_norm = RMSNorm(D, eps)  # the token signal at the scale of the decoder-state branch
        self.proj = nn.Linear(D, E, bias=False)
        self.context_norm = RMSNorm(D, eps)
        self.layers = nn.ModuleList(EncoderLayer(config, D, eps) for _ in range(config.encoder_layers))
        self.norm = RMSNorm(E, eps)
        dh = E // config.heads
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, dh, 2).float() / dh))
        freqs = torch.outer(torch.arange(config.neighbour_length).float(), inv)
        self.register_buffer("rope_cos", torch.cat([freqs, freqs], -1).cos(), persistent=False)
        self.register_buffer("rope_sin", torch.cat([-freqs, freqs], -1).sin(), persistent=False)

    def forward(self, embeds: Tensor, valid: Tensor, context: Tensor, context_valid: Optional[Tensor] = None) -> Tensor:
        """embeds (N, r, D) of N neighbours, valid (N, r), context (N, m, D) with its real rows
        (N, m) or None (all) -> (N, r, E)."""
        r = embeds.shape[1]
        rope = (self.rope_cos[:r, None].to(embeds.dtype), self.rope_sin[:r, None].to(embeds.dtype))
        h = self.proj(self.embed_norm(embeds))
        context = self.context_norm(context)
        for layer in self.layers:
            h = layer(h, valid, rope, context, context_valid)
        return self.norm(h)


class RetroState:
    """The neighbours of a batch of sequences and what was computed from them, chunk by chunk.

    `set_neighbours(u, ids, valid)` before the forward pass that reaches u's last token: ids
    (B, k, r) token ids, valid (B, k, r) bool (a missing neighbour: all False). The first CCA layer
    then encodes u (`encode`); each CCA layer projects u's rows once (`chunk_kv`).

    `phase` shifts the chunk grid: chunk u holds positions [u*m - phase, (u+1)*m - phase), so the
    first chunk is m - phase tokens long. Generation sets it so that the prompt's last token ends a
    chunk (its question has neighbours from the first new token on); training uses 0."""

    def __init__(self, config: RetroConfig, embed: Callable[[Tensor], Tensor], phase: int = 0):
        if not 0 <= phase < config.chunk_tokens:
            raise ValueError(f"phase={phase} must lie in [0, chunk_tokens={config.chunk_tokens})")
        self.config, self.embed, self.phase = config, embed, phase
        self.neighbours: dict[int, tuple[Tensor, Tensor]] = {}
        self.encoded: dict[int, tuple[Tensor, Tensor]] = {}  # u -> (rows (B, L, E), valid (B, L))
        self._kv: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (layer, u) -> k, v (B, Hc, L, dh)
        self._context: Optional[Tensor] = None  # (B, n, D): decoder states from grid position _context_start on
        self._context_start = 0
        self.encode_s = 0.0  # seconds spent encoding

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        """Sequence positions [first, end) of chunk (the first chunk may be shorter)."""
        m = self.config.chunk_tokens
        return max(chunk * m - self.phase, 0), (chunk + 1) * m - self.phase

    def set_neighbours(self, chunk: int, ids: Tensor, valid: Tensor) -> None:
        if ids.shape != valid.shape or ids.dim() != 3:
            raise ValueError(f"neighbours of chunk {chunk}: ids {tuple(ids.shape)} and valid {tuple(valid.shape)} "
                             "must both be (B, k, r)")
        self.neighbours[chunk] = (ids, valid)

    def encode(self, encoder: NeighbourEncoder, x: Tensor, start: int) -> None:
        """The first CCA layer's input x (B, T, D) at grid positions start.. (sequence positions
        + phase): keep the decoder states of the chunk not completed yet, and encode the
        neighbours of every chunk completed in these T."""
        import time

        m, T = self.config.chunk_tokens, x.shape[1]
        if self._context is None or start == self.phase:  # a new sequence
            self._context, self._context_start = x, start
        else:
            if self._context_start + self._context.shape[1] != start:
                raise ValueError(f"retro state holds decoder states up to {self._context_start + self._context.shape[1]}, "
                                 f"the forward pass starts at {start}")
            self._context = torch.cat([self._context, x], dim=1)
        end = start + T
        done = [u for u in range(self._context_start // m, end // m) if u in self.neighbours and u not in self.encoded]
        if done:
            t0 = time.perf_counter()
            ids = torch.stack([self.neighbours[u][0] for u in done], 1)  # (B, G, k, r)
            valid = torch.stack([self.neighbours[u][1] for u in done], 1)
            B, G, k, r = ids.shape
            ctx, ctx_valid = zip(*(self._chunk_context(u) for u in done))
            ctx = torch.stack(ctx, 1)[:, :, None].expand(B, G, k, m, x.shape[-1]).reshape(B * G * k, m, -1)
            ctx_valid = torch.stack(ctx_valid)[None, :, None].expand(B, G, k, m).reshape(B * G * k, m)
            safe = valid.clone().reshape(B * G * k, r)
            safe[:, 0] = True  # a missing neighbour still attends somewhere; its rows stay invalid below
            rows = encoder(self.embed(ids.reshape(B * G * k, r).clamp(min=0)), safe, ctx, ctx_valid)  # (BGk, r, E)
            rows = rows.view(B, G, k * r, -1)
            valid = valid.reshape(B, G, k * r)
            for g, u in enumerate(done):
                self.encoded[u] = (rows[:, g], valid[:, g])
            self.encode_s += time.perf_counter() - t0
        keep = (end // m) * m  # states of completed chunks are not needed again
        if keep > self._context_start:
            self._context = self._context[:, keep - self._context_start :]
            self._context_start = keep

    def _chunk_context(self, chunk: int) -> tuple[Tensor, Tensor]:
        """Chunk's decoder states (B, m, D), zero-padded in front for a short first chunk, and
        which rows are real (m,)."""
        m = self.config.chunk_tokens
        first = max(chunk * m, self._context_start)
        rows = self._context[:, first - self._context_start : (chunk + 1) * m - self._context_start]
        pad = first - chunk * m
        valid = torch.arange(m, device=rows.device) >= pad
        return (F.pad(rows, (0, 0, pad, 0)) if pad else rows), valid

    def chunk_kv(self, layer: int, chunk: int, project: Callable[[Tensor], tuple[Tensor, Tensor]]
                 ) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """Layer `layer`'s keys, values (B, Hc, L, dh) (`project` of the rows (B, L, E)) and valid
        (B, L) of chunk's rows, or None."""
        if chunk not in self.encoded:
            return None
        rows, valid = self.encoded[chunk]
        key = (layer, chunk)
        if key not in self._kv:
            self._kv[key] = project(rows)
        return (*self._kv[key], valid)


class StateSlot:
    """Where the CCA layers find the current `RetroState` (a plain holder, not a module: the
    layers share it without it becoming part of their parameters)."""

    state: Optional[RetroState] = None


class ChunkedCrossAttention(nn.Module):
    """x + tanh(gate) * wo(CCA(norm(x), E)); sits in `Block.after_attention` ((x, input_pos) -> x).
    The first one also owns the encoder and runs it (`encoder` is not None)."""

    def __init__(self, model_config: LlamaConfig, config: RetroConfig, layer: int, slot: StateSlot,
                 encoder: Optional[NeighbourEncoder] = None):
        super().__init__()
        D, E = model_config.dim, config.encoder_dim
        self.config, self.layer, self.slot, self.heads = config, layer, slot, config.heads
        self.norm = RMSNorm(D, model_config.rms_norm_eps)
        self.wq = nn.Linear(D, E, bias=False)
        self.wkv = nn.Linear(E, 2 * E, bias=False)
        self.wo = nn.Linear(E, D, bias=False)
        # QK-norm (per head): logits of O(1) at init, so attention can be sharp (pick the rows that
        # match) early, not a near-uniform mean of 2 x 128 rows, the same for any neighbour.
        self.q_norm = RMSNorm(E // config.heads, model_config.rms_norm_eps)
        self.k_norm = RMSNorm(E // config.heads, model_config.rms_norm_eps)
        self.gate = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: the base model until trained
        self.encoder = encoder

    def forward(self, x: Tensor, input_pos: Tensor) -> Tensor:
        state = self.slot.state
        if state is None:
            return x
        m, start, T = self.config.chunk_tokens, int(input_pos[0]) + state.phase, x.shape[1]  # grid positions
        if self.encoder is not None:
            state.encode(self.encoder, x, start)
        lo, hi = max(chunk_read_by(start, m), 0), chunk_read_by(start + T - 1, m)  # chunks these queries read
        if T == 1:  # a decode step reads one chunk's rows as they are: no padded copy
            kv = state.chunk_kv(self.layer, hi, self._project) if hi >= 0 else None
            if kv is None or not bool(kv[2].any(-1).all()):
                return x if kv is None else self._padded(x, {hi: kv}, start)
            q = self._query(x)  # (B, Hc, 1, dh)
            y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=kv[2][:, None, None, :])
            return x + torch.tanh(self.gate).to(x.dtype) * self.wo(y.transpose(1, 2).flatten(2))
        kvs = {u: state.chunk_kv(self.layer, u, self._project) for u in range(lo, hi + 1)}
        kvs = {u: kv for u, kv in kvs.items() if kv is not None}
        return self._padded(x, kvs, start) if kvs else x

    def _query(self, x: Tensor) -> Tensor:
        return self.q_norm(_heads(self.wq(self.norm(x)), self.heads))

    def _project(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Encoded rows (B, L, E) -> keys, values (B, Hc, L, dh)."""
        k, v = self.wkv(rows).chunk(2, dim=-1)
        return self.k_norm(_heads(k, self.heads)), _heads(v, self.heads)

    def _padded(self, x: Tensor, kvs: dict[int, tuple[Tensor, Tensor, Tensor]], start: int) -> Tensor:
        """The queries x at grid positions start.. over the chunks kvs, their rows padded to one length."""
        m = self.config.chunk_tokens
        lo, hi = min(kvs), max(kvs)
        B, L = x.shape[0], max(kv[0].shape[2] for kv in kvs.values())
        k = x.new_zeros(B, hi - lo + 1, self.heads, L, self.config.encoder_dim // self.heads)
        v, valid = torch.zeros_like(k), torch.zeros(B, hi - lo + 1, L, dtype=torch.bool, device=x.device)
        for u, (ku, vu, ok) in kvs.items():
            n = ku.shape[2]
            k[:, u - lo, :, :n], v[:, u - lo, :, :n], valid[:, u - lo, :n] = ku, vu, ok
        q = self._query(x)  # (B, Hc, T, dh)
        y = chunked_cross_attention(q, k, v, valid, start, m, lo)  # (B, Hc, T, dh)
        return x + torch.tanh(self.gate).to(x.dtype) * self.wo(y.transpose(1, 2).flatten(2))
