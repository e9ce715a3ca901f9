"""RETRO's neighbour encoder and chunked cross-attention (CCA), for a frozen owned `Llama`.

From "Improving language models by retrieving from trillions of tokens" (Borgeaud et al. 2022:
section 2 and its Listing 1; RETRO-fitting: the base frozen, only the encoder and the CCA trained)
with Megatron-LM's layout for deep models (CCA every third layer from layer 9, 2 neighbours, a
2-layer encoder).

A sequence is cut into chunks of m tokens (64): chunk u holds positions [u*m, (u+1)*m). Each
completed chunk u gets k neighbours from the store (2), each a retrieved chunk and its
continuation (64 + 64 tokens; fewer at a document's end, none when the store has nothing). The
queries at positions [u*m + m - 1, (u+1)*m + m - 1) attend to u's neighbours
(`memlm.kernels.chunked_attention`): a neighbour of chunk u is read from u's last token on, never
earlier; the first m - 1 positions read nothing.

What the CCA at layer l reads, and how (memlm's RETRO-fitting, measured in session 10/11: a
from-scratch encoder and CCA over a frozen 135M model ignored their neighbours after 150 CPU steps,
own text and random ids scoring the same):
- the neighbour rows are the frozen base model's own states of the neighbour's tokens entering
  layer l (each neighbour run alone through layers 0 .. l - 1 at positions 0 .. r - 1, once per
  chunk), plus a learned correction from the neighbour encoder;
- the CCA is layer l's own attention: its norm, query, key and value projections and output
  projection, frozen and shared with the base (no copy in the adapter), the keys rotated at the
  neighbour's positions and the query at r + its distance from the chunk's last token, as if the
  neighbour and its continuation were the text just before it. So the base model's heads that
  copy from context (induction heads) copy from the neighbours from the start;
- a gate per query head, tanh(gate_h) on that head's output before the output projection,
  initialised to 0: before training, or with no neighbours, the model is exactly the base model.
  Training learns which heads of which layers should read the neighbours.
The neighbour encoder is RETRO's: bidirectional over each neighbour, cross-attending to the
decoder's states of the chunk it was retrieved for (H_u: the residual stream after the first CCA
layer's self-attention). It reads the base states at the first CCA layer and adds, per CCA layer,
a zero-initialised projection of its output to that layer's neighbour states before they are
projected to keys and values.

Generation with a KV cache runs the same modules one token at a time: a `RetroState` holds each
chunk's neighbours (set by the mode before the forward pass that needs them), their base states
and encoder rows, each CCA layer's keys/values per chunk (computed once per chunk), and the decoder
states of the chunk not completed yet (at most m - 1 rows). Nothing earlier is recomputed.

Shapes: B batch, T queries, D decoder width, H query heads and KV key/value heads of hd (the
base's), m chunk tokens, k neighbours, r neighbour tokens (<= neighbour_tokens +
continuation_tokens), L = k * r rows per chunk, E encoder width with Hc heads of E // Hc.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.kernels import chunked_cross_attention
from memlm.kernels.chunked_attention import chunk_read_by
from memlm.model.llama import Llama, LlamaConfig, RMSNorm, apply_rope
from memlm.modes.retro.settings import DEFAULT_LAYERS
from memlm.modes.retro.state_cache import NeighbourStateCache


# The decode step's cross-attention in one C call where the layer is q4_1 on CPU
# (`ChunkedCrossAttention._c_step`); False keeps the PyTorch ops (tests and benchmarks compare).
C_CROSS_ATTENTION = True


@dataclass
class RetroConfig:
    chunk_tokens: int = 64  # m
    neighbours: int = 2  # k per chunk
    neighbour_tokens: int = 64  # the retrieved chunk
    continuation_tokens: int = 64  # and what follows it in its document
    layers: tuple[int, ...] = DEFAULT_LAYERS  # CCA after the attention of these (negative: from the top)
    encoder_layers: int = 2
    encoder_dim: int = 128  # E
    heads: int = 4  # Hc, the encoder's (E // Hc = 32)
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


@torch.no_grad()
def neighbour_states(model: Llama, ids: Tensor, layers: tuple[int, ...]) -> dict[int, Tensor]:
    """ids (N, r) of N neighbours -> the frozen base's residual stream entering each of `layers`
    (sorted), {layer: (N, r, D)}: each neighbour run alone, causally, at positions 0 .. r - 1,
    through the plain blocks (no adapter modules, no cache)."""
    x, r = model.embed(ids), ids.shape[1]
    pos = torch.arange(r, device=ids.device)
    rope = (model.rope_cos[:r, None].to(x.dtype), model.rope_sin[:r, None].to(x.dtype))
    states = {}
    for i, block in enumerate(model.layers[: layers[-1] + 1]):
        if i in layers:
            states[i] = x
        if i == layers[-1]:
            break
        x = x + block.attention(block.attention_norm(x), rope, pos, None, None, r)
        x = x + block.feed_forward(block.ffn_norm(x))
    return states


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
    """The base's states of the neighbour tokens at the first CCA layer (N, r, D) -> E rows,
    bidirectional, conditioned on the decoder's states of the chunk they were retrieved for."""

    def __init__(self, model_config: LlamaConfig, config: RetroConfig):
        super().__init__()
        D, E, eps = model_config.dim, config.encoder_dim, model_config.rms_norm_eps
        self.config = config
        self.input_norm = RMSNorm(D, eps)
        self.proj = nn.Linear(D, E, bias=False)
        self.context_norm = RMSNorm(D, eps)
        self.layers = nn.ModuleList(EncoderLayer(config, D, eps) for _ in range(config.encoder_layers))
        self.norm = RMSNorm(E, eps)
        dh = E // config.heads
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, dh, 2).float() / dh))
        freqs = torch.outer(torch.arange(config.neighbour_length).float(), inv)
        self.register_buffer("rope_cos", torch.cat([freqs, freqs], -1).cos(), persistent=False)
        self.register_buffer("rope_sin", torch.cat([-freqs, freqs], -1).sin(), persistent=False)

    def forward(self, states: Tensor, valid: Tensor, context: Tensor, context_valid: Optional[Tensor] = None) -> Tensor:
        """states (N, r, D) of N neighbours, valid (N, r), context (N, m, D) with its real rows
        (N, m) or None (all) -> (N, r, E)."""
        r = states.shape[1]
        rope = (self.rope_cos[:r, None].to(states.dtype), self.rope_sin[:r, None].to(states.dtype))
        h = self.proj(self.input_norm(states))
        context = self.context_norm(context)
        for layer in self.layers:
            h = layer(h, valid, rope, context, context_valid)
        return self.norm(h)


@dataclass
class _Chunk:
    """One chunk's neighbours as read: the base states still to project {layer: (B*k, r, D)}, the
    encoder rows (B*k, r, E), valid (B, L)."""

    states: dict[int, Tensor]
    rows: Tensor
    valid: Tensor


class RetroState:
    """The neighbours of a batch of sequences and what was computed from them, chunk by chunk.

    `set_neighbours(u, ids, valid)` before the forward pass that reaches u's last token: ids
    (B, k, r) token ids, valid (B, k, r) bool (a missing neighbour: all False). The first CCA layer
    then encodes u (`encode`: the base states of its neighbours and the encoder's rows); each CCA
    layer projects u's rows once (`chunk_kv`).

    `cache` (a `NeighbourStateCache`, optional) keeps the base states of neighbours across
    states: a neighbour read before skips its base pass.

    `phase` shifts the chunk grid: chunk u holds positions [u*m - phase, (u+1)*m - phase), so the
    first chunk is m - phase tokens long. Generation sets it so that the prompt's last token ends a
    chunk (its question has neighbours from the first new token on); training uses 0."""

    def __init__(self, config: RetroConfig, model: Llama, phase: int = 0, cache: Optional[NeighbourStateCache] = None):
        if not 0 <= phase < config.chunk_tokens:
            raise ValueError(f"phase={phase} must lie in [0, chunk_tokens={config.chunk_tokens})")
        self.config, self.model, self.phase, self.cache = config, model, phase, cache
        self.neighbours: dict[int, tuple[Tensor, Tensor]] = {}
        self.encoded: dict[int, _Chunk] = {}
        self._kv: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (layer, u) -> k, v (B, KV, L, hd)
        self._rows: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}  # (layer, u) -> valid k, v (KV, L', hd), B = 1
        self._context: Optional[Tensor] = None  # (B, n, D): decoder states from grid position _context_start on
        self._context_start = 0
        self.encode_s = 0.0  # seconds spent encoding (base states of the neighbours and the encoder)

    def chunk_span(self, chunk: int) -> tuple[int, int]:
        """Sequence positions [first, end) of chunk (the first chunk may be shorter)."""
        m = self.config.chunk_tokens
        return max(chunk * m - self.phase, 0), (chunk + 1) * m - self.phase

    def set_neighbours(self, chunk: int, ids: Tensor, valid: Tensor) -> None:
        if ids.shape != valid.shape or ids.dim() != 3:
            raise ValueError(f"neighbours of chunk {chunk}: ids {tuple(ids.shape)} and valid {tuple(valid.shape)} "
                             "must both be (B, k, r)")
        self.neighbours[chunk] = (ids, valid)

    def encodes_at(self, start: int, T: int) -> bool:
        """Whether `encode` of T positions from grid position `start` would encode neighbours (a
        chunk with neighbours completes in them), rather than only keep the decoder states."""
        m = self.config.chunk_tokens
        first = start if self._context is None or start == self.phase else self._context_start
        return any(u in self.neighbours and u not in self.encoded for u in range(first // m, (start + T) // m))

    def encode(self, encoder: NeighbourEncoder, x: Tensor, start: int) -> None:
        """The first CCA layer's input x (B, T, D) at grid positions start.. (sequence positions
        + phase): keep the decoder states of the chunk not completed yet, and encode the
        neighbours of every chunk completed in these T."""
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
            flat = ids.reshape(B * G * k, r).clamp(min=0)
            if self.cache is None:
                states = neighbour_states(self.model, flat, self.config.layers)
            else:  # base states of neighbours read before are kept (they depend on the ids only)
                states = self.cache.states(flat, lambda some: neighbour_states(self.model, some, self.config.layers))
            ctx, ctx_valid = zip(*(self._chunk_context(u) for u in done))
            ctx = torch.stack(ctx, 1)[:, :, None].expand(B, G, k, m, x.shape[-1]).reshape(B * G * k, m, -1)
            ctx_valid = torch.stack(ctx_valid)[None, :, None].expand(B, G, k, m).reshape(B * G * k, m)
            safe = valid.clone().reshape(B * G * k, r)
            safe[:, 0] = True  # a missing neighbour still attends somewhere; its rows stay invalid below
            first = self.config.layers[0]
            rows = encoder(states[first].to(x.dtype), safe, ctx, ctx_valid).view(B, G, k, r, -1)  # (B, G, k, r, E)
            states = {i: s.view(B, G, k, r, -1) for i, s in states.items()}
            valid = valid.reshape(B, G, k * r)
            for g, u in enumerate(done):
                self.encoded[u] = _Chunk({i: s[:, g].flatten(0, 1) for i, s in states.items()},
                                         rows[:, g].flatten(0, 1), valid[:, g])
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

    def chunk_kv(self, cca: "ChunkedCrossAttention", chunk: int) -> Optional[tuple[Tensor, Tensor, Tensor]]:
        """The keys, values (B, KV, L, hd) and valid (B, L) of chunk's rows at `cca`'s layer, or
        None. Projected once; the layer's base states are dropped then."""
        c = self.encoded.get(chunk)
        if c is None:
            return None
        key = (cca.layer, chunk)
        if key not in self._kv:
            B = c.valid.shape[0]
            k, v = cca.project(self.model, c.states.pop(cca.layer), c.rows)  # (B*k, KV, r, hd)
            self._kv[key] = tuple(t.unflatten(0, (B, -1)).transpose(1, 2).flatten(2, 3) for t in (k, v))
        return (*self._kv[key], c.valid)


    def chunk_rows(self, cca: "ChunkedCrossAttention", chunk: int) -> tuple[Tensor, Tensor]:
        """Chunk's valid rows at `cca`'s layer for the one sequence of a batch of 1: keys, values
        (KV, L, hd) contiguous (what the C decode step reads; kept while the chunk is read)."""
        key = (cca.layer, chunk)
        rows = self._rows.get(key)
        if rows is None:
            k, v, valid = self.chunk_kv(cca, chunk)
            ok = valid[0]
            rows = (k[0].contiguous(), v[0].contiguous()) if bool(ok.all()) else (k[0][:, ok].contiguous(), v[0][:, ok].contiguous())
            self._rows = {kk: r for kk, r in self._rows.items() if kk[0] != cca.layer or kk[1] >= chunk - 1}
            self._rows[key] = rows
        return rows


class StateSlot:
    """Where the CCA layers find the current `RetroState` (a plain holder, not a module: the
    layers share it without it becoming part of their parameters)."""

    state: Optional[RetroState] = None


class ChunkedCrossAttention(nn.Module):
    """x + wo(tanh(gate) * CCA(norm(x), neighbours)) with layer `layer`'s own norm and projections;
    sits in `Block.after_attention` ((x, input_pos) -> x). Its parameters: the per-head gate and the
    projection of the encoder's rows into this layer's neighbour states. The first one also owns
    the encoder and runs it (`encoder` is not None)."""

    def __init__(self, model_config: LlamaConfig, config: RetroConfig, layer: int, slot: StateSlot,
                 encoder: Optional[NeighbourEncoder] = None):
        super().__init__()
        self.config, self.layer, self.slot = config, layer, slot
        self.n_heads, self.n_kv_heads, self.head_dim = model_config.n_heads, model_config.n_kv_heads, model_config.head_dim
        self.rows_out = nn.Linear(config.encoder_dim, model_config.dim, bias=False)
        nn.init.zeros_(self.rows_out.weight)  # the neighbours start as the base model's own states
        self.gate = nn.Parameter(torch.zeros(model_config.n_heads))  # tanh(0) = 0: the base model until trained
        self.encoder = encoder

    def forward(self, x: Tensor, input_pos: Tensor) -> Tensor:
        state = self.slot.state
        if state is None:
            return x
        m, start, T = self.config.chunk_tokens, int(input_pos[0]) + state.phase, x.shape[1]  # grid positions
        if self.encoder is not None:
            state.encode(self.encoder, x, start)
        model = state.model
        lo, hi = max(chunk_read_by(start, m), 0), chunk_read_by(start + T - 1, m)  # chunks these queries read
        if T == 1:  # a decode step reads one chunk's rows as they are: no padded copy
            kv = state.chunk_kv(self, hi) if hi >= 0 else None
            if kv is None or not bool(kv[2].any(-1).all()):
                return x if kv is None else self._padded(model, x, {hi: kv}, start)
            if C_CROSS_ATTENTION and self._c_step_applies(model, x):
                return self._c_step(model, x, start, state.chunk_rows(self, hi))
            q = self._query(model, x, start)  # (B, H, 1, hd)
            y = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=kv[2][:, None, None, :], enable_gqa=True)
            return self._out(model, x, y)
        kvs = {u: state.chunk_kv(self, u) for u in range(lo, hi + 1)}
        kvs = {u: kv for u, kv in kvs.items() if kv is not None}
        return self._padded(model, x, kvs, start) if kvs else x

    def stack_step(self, model: Llama, x: Tensor, input_pos: Tensor):
        """This layer's part of a decode step that runs the whole stack in C
        (`memlm.model.quantize.q4_1_decode_stack`): the C cross-attention step of `forward`'s
        decode path as a row of the step's cross table (a `StackStep`), or None where that path
        does not apply this token (then every layer runs its own path: a chunk completing, whose
        neighbours the encoder turns into rows before this layer reads them; a neighbour with no
        valid row; not the C step's case)."""
        from memlm.kernels import qmatmul_cpu
        from memlm.model.quantize import StackStep

        state = self.slot.state
        if state is None:
            return StackStep((2,) + (0,) * (qmatmul_cpu.STACK_CROSS - 1))
        if not (C_CROSS_ATTENTION and self._c_step_applies(model, x)):
            return None
        m, start = self.config.chunk_tokens, int(input_pos[0]) + state.phase
        capture, after = None, None
        if self.encoder is not None:  # the first CCA layer keeps the decoder states of the chunk
            if state.encodes_at(start, 1):
                return None
            capture = torch.empty(x.shape[-1])
            after = lambda: state.encode(self.encoder, capture.view(1, 1, -1), start)  # noqa: E731
        hi = chunk_read_by(start, m)
        kv = state.chunk_kv(self, hi) if hi >= 0 else None
        if kv is not None and not bool(kv[2].any(-1).all()):
            return None
        cap = 0 if capture is None else capture.data_ptr()
        if kv is None:
            return StackStep((2, 0, 0, 0, 0, 0, 0, 0, cap, 0), (capture,), after)
        k, v = state.chunk_rows(self, hi)
        cos, sin, gate = self._c_inputs(model, start)
        pair = self._c_weights(model)
        values = (1, pair.ptrs.data_ptr(), k.data_ptr(), v.data_ptr(), k.shape[1], gate.data_ptr(), cos.data_ptr(),
                  sin.data_ptr(), cap, 0)
        return StackStep(values, (pair, k, v, gate, cos, sin, capture), after)

    def _c_step_applies(self, model: Llama, x: Tensor) -> bool:
        """One fp32 token on CPU, no gradient wanted, and this layer's norm and projections what
        `qmatmul_cpu.q4_1_cross_attention_step` computes (RMSNorm, bias-free Q4_1 wqkv and wo)."""
        from memlm.model.quantize import Q4_1Linear

        block = model.layers[self.layer]
        att = block.attention
        return (x.shape[:2] == (1, 1) and x.dtype == torch.float32 and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and self.gate.requires_grad)
                and type(block.attention_norm) is RMSNorm and self.head_dim % 8 == 0
                and all(type(m) is Q4_1Linear and m.kernel_ready and m.bias is None for m in (att.wqkv, att.wo)))

    def _c_step(self, model: Llama, x: Tensor, start: int, rows: tuple[Tensor, Tensor]) -> Tensor:
        """The decode step of `forward` in one C call: the same query, rotation, attention over the
        chunk's valid rows, gates and output projection."""
        from memlm.kernels import qmatmul_cpu

        block = model.layers[self.layer]
        cos, sin, gate = self._c_inputs(model, start)
        out = qmatmul_cpu.q4_1_cross_attention_step(
            x.view(-1), self.n_heads, block.attention_norm.eps, block.attention_norm.weight, self._c_weights(model),
            cos, sin, *rows, gate)
        return out.view_as(x)

    def _c_inputs(self, model: Llama, start: int) -> tuple[Tensor, Tensor, Tensor]:
        """The C step's RoPE rows for the query at grid position `start` (its distance from the last
        token of the chunk it reads, past the neighbours' full length) and the tanh'd gates."""
        m = self.config.chunk_tokens
        pos = self.config.neighbour_length + (start - (m - 1)) % m
        return (model.rope_cos[pos].float().contiguous(), model.rope_sin[pos].float().contiguous(),
                torch.tanh(self.gate.float()).contiguous())

    def _c_weights(self, model: Llama):
        """The layer's wqkv and wo as the C step reads them, made once while it holds the same projections."""
        from memlm.kernels import qmatmul_cpu

        att = model.layers[self.layer].attention
        cached = self.__dict__.get("_c_weights_pair")
        if cached is None or cached[0] is not att.wqkv or cached[1] is not att.wo:
            cached = self.__dict__["_c_weights_pair"] = (att.wqkv, att.wo, qmatmul_cpu.ProjectionPair(
                att.wqkv.kernel_weights(), att.wo.kernel_weights()))
        return cached[2]

    def _query(self, model: Llama, x: Tensor, start: int) -> Tensor:
        """Layer queries (B, H, T, hd) of x at grid positions start.., each rotated to r + its
        distance from the last token of the chunk it reads (r = the neighbours' full length)."""
        H, hd, T = self.n_heads, self.head_dim, x.shape[1]
        block = model.layers[self.layer]  # its projections in whatever weight format the model runs
        q = block.attention.wqkv(block.attention_norm(x))[..., : H * hd].view(x.shape[0], T, H, hd)
        m = self.config.chunk_tokens
        grid = torch.arange(start, start + T, device=x.device)
        pos = self.config.neighbour_length + torch.remainder(grid - (m - 1), m)
        rope = (model.rope_cos[pos, None].to(x.dtype), model.rope_sin[pos, None].to(x.dtype))
        return apply_rope(q, rope).transpose(1, 2)

    def project(self, model: Llama, states: Tensor, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Base states (N, r, D) of N neighbours + this layer's share of the encoder rows (N, r, E)
        -> keys (rotated at 0 .. r - 1), values (N, KV, r, hd)."""
        N, r, _ = states.shape
        H, KV, hd = self.n_heads, self.n_kv_heads, self.head_dim
        block = model.layers[self.layer]
        s = block.attention_norm(states.to(rows.dtype) + self.rows_out(rows))
        kv = block.attention.wqkv(s)[..., H * hd :].view(N, r, 2 * KV, hd)
        rope = (model.rope_cos[:r, None].to(s.dtype), model.rope_sin[:r, None].to(s.dtype))
        k = apply_rope(kv[:, :, :KV], rope)
        return k.transpose(1, 2), kv[:, :, KV:].transpose(1, 2)

    def _out(self, model: Llama, x: Tensor, y: Tensor) -> Tensor:
        """x + the layer's output projection of y (B, H, T, hd) scaled per head by tanh(gate), its
        bias (if any) left out: zero gates add exactly 0."""
        wo = model.layers[self.layer].attention.wo
        y = wo((y * torch.tanh(self.gate).to(y.dtype)[:, None, None]).transpose(1, 2).flatten(2))
        bias = getattr(wo, "bias", None)
        return x + (y if bias is None else y - bias)

    def _padded(self, model: Llama, x: Tensor, kvs: dict[int, tuple[Tensor, Tensor, Tensor]], start: int) -> Tensor:
        """The queries x at grid positions start.. over the chunks kvs, their rows padded to one length."""
        m, G = self.config.chunk_tokens, self.n_heads // self.n_kv_heads
        lo, hi = min(kvs), max(kvs)
        B, L = x.shape[0], max(kv[0].shape[2] for kv in kvs.values())
        k = x.new_zeros(B, hi - lo + 1, self.n_heads, L, self.head_dim)
        v, valid = torch.zeros_like(k), torch.zeros(B, hi - lo + 1, L, dtype=torch.bool, device=x.device)
        for u, (ku, vu, ok) in kvs.items():
            n = ku.shape[2]
            k[:, u - lo, :, :n] = ku.repeat_interleave(G, dim=1)  # GQA: query head h reads KV head h // G
            v[:, u - lo, :, :n] = vu.repeat_interleave(G, dim=1)
            valid[:, u - lo, :n] = ok
        y = chunked_cross_attention(self._query(model, x, start), k, v, valid, start, m, lo)  # (B, H, T, hd)
        return self._out(model, x, y)
