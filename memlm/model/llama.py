"""A Llama-family decoder owned by memlm, with the extension points the memory modes need.

One file in the manner of nanoGPT / gpt-fast: `LlamaConfig` (read from a Hugging Face
config.json), `KVCache` (fixed-shape, preallocated), `Attention`, `FeedForward`, `Block`, `Llama`,
and `load_llama(folder)` for any local Hugging Face Llama-architecture safetensors folder (the
bundled SmolLM2 included). In fp32 its logits equal transformers' `LlamaForCausalLM`'s (measured
max difference 0 on SmolLM2; tests/memlm/test_owned_model.py asserts < 1e-4).

Extension points, each a plain attribute of a layer (`model.layers[i]`) a memory mode may set:
- `block.attention.backend`: an `AttentionBackend`, how queries read keys/values (default
  `SDPABackend`, causal attention over the cache); knn and landmark attention replace it.
- `block.after_attention`: an `nn.ModuleList` run after the layer's attention on the residual
  stream, each `(x, input_pos) -> x` (empty by default); RETRO's chunked cross-attention goes here.
- `block.feed_forward`: any `(B, T, D) -> (B, T, D)` module (default the SwiGLU MLP); a
  product-key memory replaces it or wraps it to run beside it.
- `Llama.forward(..., prefix_embeds=)` puts extra input embeddings (memory tokens, RMT) before the
  tokens; `Llama.forward_embeds` takes a whole embedded sequence for other arrangements.
- `Llama.rope_offset`: added to `input_pos` for the RoPE lookup only, not for the KV cache slot
  (knn places the local context after its memory this way); the tables must cover the shifted
  positions (`rope_tables(config, length)`).

Batching: `RaggedBatch` in place of the cache runs several sequences' new tokens in one forward
pass without padding (Orca's selective batching): every layer's projections and MLP take all the
tokens at once, and only attention is split, each sequence's piece reading its own KV cache.

Limits: Llama only (no sliding window, no partial rotary, RoPE "default" or "llama3"); the queries
of one forward (of one sequence in a `RaggedBatch`) must be consecutive positions; each KV cache
is sized up front.
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)


@dataclass
class LlamaConfig:
    """The shape of a Llama-family decoder; `from_hf` reads it from a Hugging Face config.json.
    The defaults are the bundled SmolLM2-135M's."""

    vocab_size: int = 49152
    dim: int = 576  # hidden_size: width of the residual stream
    intermediate_size: int = 1536  # width of the SwiGLU MLP
    n_layers: int = 30
    n_heads: int = 9  # query heads
    n_kv_heads: int = 3  # key/value heads (GQA: each serves n_heads // n_kv_heads query heads)
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    # None, or the "llama3" frequency rescaling: factor, low_freq_factor, high_freq_factor,
    # original_max_position_embeddings (Llama 3.1's long-context RoPE).
    rope_scaling: Optional[dict[str, Any]] = None
    max_position_embeddings: int = 8192  # longest sequence the RoPE tables cover
    tie_word_embeddings: bool = True  # the output projection is the token embedding matrix
    attention_bias: bool = False  # biases on the q/k/v/o projections
    mlp_bias: bool = False
    bos_token_id: Optional[int] = 1
    eos_token_ids: tuple[int, ...] = (2,)  # HF's eos_token_id may be one id or a list

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Read a Hugging Face config.json dict; refuse what this decoder does not implement."""
        architectures = hf.get("architectures") or [hf.get("model_type", "unknown")]
        if not any(a in _LLAMA_ARCHITECTURES for a in architectures) and hf.get("model_type") != "llama":
            raise ValueError(
                f"architecture {'/'.join(map(str, architectures))} is not supported by memlm.model "
                f"(expected one of {', '.join(_LLAMA_ARCHITECTURES)})"
            )
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (expected 'silu')")
        n_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        eos_ids = [] if eos is None else eos if isinstance(eos, list) else [eos]
        return cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            **_rope_from_hf(hf),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False),
            mlp_bias=hf.get("mlp_bias", False),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos_ids),
        )

    @classmethod
    def from_folder(cls, folder: str | Path) -> "LlamaConfig":
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (expected a Hugging Face model folder)")
        return cls.from_hf(json.loads(path.read_text()))

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling from either config format: transformers >= 5 writes
    `rope_parameters` (theta inside), older ones `rope_theta` and `rope_scaling` at the top."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    if rope_type == "default":
        return dict(rope_theta=theta, rope_scaling=None)
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return dict(rope_theta=theta, rope_scaling={k: rope[k] for k in keys})
    raise ValueError(f"rope type {rope_type!r} is not supported (expected 'default' or 'llama3')")


class KVCache(nn.Module):
    """Keys and values of every layer for a batch of sequences, preallocated at full length.

    Fixed shapes let a compiled decode step run without reallocating. A forward writes its own
    positions and reads only positions [0, its last] (eager: a slice; compiled: the whole cache
    under a mask), so a cache can be reused for a new sequence without clearing it.
    """

    def __init__(self, n_layers: int, batch: int, n_kv_heads: int, max_seq: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        shape = (n_layers, batch, n_kv_heads, max_seq, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_seq(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, input_pos: Tensor, k: Tensor, v: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Write k, v (B, KV, T, hd) at input_pos (T,); return the layer's keys and values at
        positions [0, kv_len), each (B, KV, kv_len, hd), in k's dtype (a cache kept in a narrower
        dtype, fp16 for a q4_1 model, is stored rounded and read back widened)."""
        k_cache, v_cache = self.k[layer], self.v[layer]  # (B, KV, S_max, hd)
        k_cache.index_copy_(2, input_pos, k.to(k_cache.dtype))
        v_cache.index_copy_(2, input_pos, v.to(v_cache.dtype))
        ks, vs = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]
        return (ks, vs) if ks.dtype == k.dtype else (ks.to(k.dtype), vs.to(k.dtype))


class RaggedBatch:
    """New tokens of several sequences, concatenated into one (1, N) forward pass, each sequence
    with its own KV cache (batch 1): pass it as `cache`, with `input_pos` = `self.input_pos`.

    Sequence i contributes `lengths[i]` tokens at positions [starts[i], starts[i] + lengths[i]) of
    `caches[i]`: a chunk of its prompt (chunked prefill) or its one new token (decoding). Nothing
    is padded; attention runs per sequence (`attend`), everything else once over all N tokens.
    """

    def __init__(self, caches: Sequence[KVCache], starts: Sequence[int], lengths: Sequence[int]):
        if not (len(caches) == len(starts) == len(lengths)) or not caches:
            raise ValueError(f"expected one start and length per cache, got {len(caches)} caches, "
                             f"{len(starts)} starts, {len(lengths)} lengths")
        self.caches, self.starts, self.lengths = list(caches), list(map(int, starts)), list(map(int, lengths))
        device = self.caches[0].k.device
        self._pos: list[Tensor] = []  # each (n_i,)
        self._masks: list[Optional[Tensor]] = []  # (n_i, start_i + n_i) causal, or None where plain causal is right
        for cache, start, n in zip(self.caches, self.starts, self.lengths):
            if n < 1 or start < 0 or start + n > cache.max_seq:
                raise ValueError(f"positions [{start}, {start + n}) do not fit a KV cache of {cache.max_seq}")
            pos = torch.arange(start, start + n, device=device)
            self._pos.append(pos)
            self._masks.append(None if n == 1 or start == 0 else torch.arange(start + n, device=device) <= pos[:, None])
        self.input_pos = torch.cat(self._pos)  # (N,)
        # Where each sequence's last token sits in the N: the rows whose logits are wanted.
        self.last = torch.tensor(list(itertools.accumulate(self.lengths)), device=device) - 1  # (S,)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, backend: "AttentionBackend") -> Tensor:
        """q (1, H, N, hd) and the new k, v (1, KV, N, hd) after RoPE: write each sequence's k, v
        into its cache and run `backend` on its queries over its cache; (1, H, N, hd)."""
        out, at = [], 0
        for cache, start, n, pos, mask in zip(self.caches, self.starts, self.lengths, self._pos, self._masks):
            ks, vs = cache.update(layer, pos, k[:, :, at : at + n], v[:, :, at : at + n], start + n)
            out.append(backend(q[:, :, at : at + n], ks, vs, mask))
            at += n
        return out[0] if len(out) == 1 else torch.cat(out, dim=2)


class AttentionBackend(Protocol):
    """How a layer's queries read its keys and values (the per-layer attention extension point).

    q (B, H, T, hd) and k, v (B, KV, S, hd) come after RoPE and the cache update; k, v hold the
    sequence's positions [0, S). mask is None for plain causal attention with the queries at the
    last T positions (T == S, or T == 1 where every key is visible), else a (T, S) bool tensor,
    True where a query may attend (it also hides cache slots not written yet). Returns
    (B, H, T, hd). H is a multiple of KV (GQA).
    """

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor: ...


class SDPABackend(nn.Module):
    """Causal softmax attention with PyTorch's scaled_dot_product_attention, GQA without copying
    K/V (`enable_gqa`)."""

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                              enable_gqa=gqa)


class Attention(nn.Module):
    """Grouped-query self-attention: fused QKV projection, RoPE, KV cache, then `self.backend`."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, config.n_heads, config.n_kv_heads, config.head_dim
        q_size, kv_size = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
        self.wqkv = nn.Linear(config.dim, q_size + 2 * kv_size, bias=config.attention_bias)  # [q; k; v]
        self.wo = nn.Linear(q_size, config.dim, bias=config.attention_bias)
        self.backend: AttentionBackend = SDPABackend()

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor, mask: Optional[Tensor],
                cache: "Optional[KVCache | RaggedBatch]", kv_len: int) -> Tensor:
        B, T, _ = x.shape  # x (B, T, D)
        H, KV = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x).view(B, T, H + 2 * KV, self.head_dim)  # (B, T, H + 2KV, hd)
        qk = apply_rope(qkv[:, :, : H + KV], rope)  # queries and keys rotated in one go
        q = qk[:, :, :H].transpose(1, 2)  # (B, H, T, hd)
        k = qk[:, :, H:].transpose(1, 2)  # (B, KV, T, hd)
        v = qkv[:, :, H + KV :].transpose(1, 2)  # (B, KV, T, hd)
        if isinstance(cache, RaggedBatch):
            y = cache.attend(self.layer, q, k, v, self.backend)  # (1, H, N, hd)
        else:
            if cache is not None:
                k, v = cache.update(self.layer, input_pos, k, v, kv_len)  # (B, KV, kv_len, hd)
            y = self.backend(q, k, v, mask)  # (B, H, T, hd)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU MLP, gate and up projections fused: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.w13 = nn.Linear(config.dim, 2 * config.intermediate_size, bias=config.mlp_bias)  # [gate; up]
        self.w2 = nn.Linear(config.intermediate_size, config.dim, bias=config.mlp_bias)  # down

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w13(x).split(self.intermediate_size, dim=-1)  # each (B, T, I)
        return self.w2(F.silu(gate) * up)  # (B, T, D)


class RMSNorm(nn.Module):
    """x / rms(x) * weight. PyTorch's rms_norm accumulates in fp32 for low-precision inputs, like
    transformers; it applies the weight before rounding to bf16 where transformers rounds first
    (identical in fp32)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # One op rather than six: per-op overhead is a real share of a decode step on CPU.
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Block(nn.Module):
    """One decoder layer: x + attention(norm(x)), then each `after_attention` module, then
    x + feed_forward(norm(x))."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.attention = Attention(config, layer)
        # Each (x (B, T, D), input_pos (T,)) -> x (B, T, D), and adds its own residual.
        self.after_attention = nn.ModuleList()
        self.ffn_norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.feed_forward: nn.Module = FeedForward(config)
        # (block, x, rope, cache, kv_len) -> x, or None: a fused one-token step for this layer's
        # weight format (memlm.model.quantize sets it for q4_1), tried for single-token decoding
        # and for batched steps (a RaggedBatch as cache: every sequence decoding one token).
        self.decode_fast: Optional[Callable[..., Optional[Tensor]]] = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor, mask: Optional[Tensor],
                cache: Optional[KVCache], kv_len: int) -> Tensor:
        if self.decode_fast is not None and mask is None and (
                (isinstance(cache, KVCache) and x.shape[1] == 1) or isinstance(cache, RaggedBatch)):
            out = self.decode_fast(self, x, rope, cache, kv_len)
            if out is not None:
                return out
        x = x + self.attention(self.attention_norm(x), rope, input_pos, mask, cache, kv_len)
        for module in self.after_attention:
            x = module(x, input_pos)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    """Token embeddings, `config.n_layers` `Block`s, a final norm and the output projection (tied
    to the embeddings when the config says so). RoPE tables for every position are precomputed."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.rms_norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.output.weight = self.tok_embeddings.weight
        cos, sin = rope_tables(config)  # each (max_position_embeddings, hd), fp32
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.rope_offset = 0  # RoPE position = input_pos + rope_offset; cache slots stay input_pos
        # (model, x, rope, input_pos, cache, kv_len) -> the last layer's output, or None: a fused
        # decode step through the layers in as few calls as they allow (memlm.model.quantize sets
        # it for q4_1), tried before the layers' own `decode_fast` when the whole stack runs.
        self.decode_stack: Optional[Callable[..., Optional[Tensor]]] = None
        # The dtype of the KV caches `new_cache` makes (None: the model's): the served model's is set
        # by memlm.models.loading.load_model (`model.kv_cache_dtype`; fp16 with q4_1, as llama.cpp
        # keeps its cache: half the bytes a decode step reads per position; the C layers read it).
        self.kv_dtype: Optional[torch.dtype] = None

    def new_cache(self, batch: int, max_seq: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for `batch` sequences of up to `max_seq` positions, in `dtype`, else
        `self.kv_dtype`, else the model's dtype."""
        if max_seq > self.config.max_position_embeddings:
            raise ValueError(f"max_seq={max_seq} exceeds max_position_embeddings={self.config.max_position_embeddings}")
        c, w = self.config, self.tok_embeddings.weight
        return KVCache(c.n_layers, batch, c.n_kv_heads, max_seq, c.head_dim, dtype or self.kv_dtype or w.dtype, w.device)

    def embed(self, tokens: Tensor) -> Tensor:
        """tokens (B, T) -> embeddings (B, T, D)."""
        return self.tok_embeddings(tokens)

    def forward(self, tokens: Tensor, input_pos: Tensor, cache: Optional[KVCache] = None,
                prefix_embeds: Optional[Tensor] = None) -> Tensor:
        """tokens (B, T) at positions input_pos -> logits (B, T', V).

        prefix_embeds (B, P, D), if given, are input embeddings placed before the tokens (memory
        tokens); input_pos then covers all P + T positions and logits are returned for all
        T' = P + T. Without a cache the tokens attend only to each other (and the prefix).
        """
        x = self.embed(tokens)  # (B, T, D)
        if prefix_embeds is not None:
            x = torch.cat([prefix_embeds.to(x.dtype), x], dim=1)  # (B, P + T, D)
        return self.output(self.forward_embeds(x, input_pos, cache))

    def forward_embeds(self, x: Tensor, input_pos: Tensor, cache: Optional[KVCache] = None,
                       layers: slice = slice(None), norm: bool = True) -> Tensor:
        """Input embeddings x (B, T, D) at positions input_pos (T,) -> final hidden states (B, T, D),
        after the last norm. input_pos must be consecutive (start, ..., start + T - 1), or with a
        `RaggedBatch` as cache, its `input_pos` (x then holds its N tokens, B = 1).

        `layers` runs only those of `self.layers` (x is then the states entering the first of them)
        and `norm=False` leaves out the final norm: the trainer runs a frozen model's lower layers
        once, caches their output and runs the upper ones per step (memlm.train.adapter)."""
        T = x.shape[1]
        if input_pos.shape != (T,):
            raise ValueError(f"input_pos has shape {tuple(input_pos.shape)}, expected ({T},)")
        kv_len, mask = _attention_span(input_pos, cache)
        rope_pos = input_pos + self.rope_offset if self.rope_offset else input_pos
        rope = (self.rope_cos[rope_pos, None].to(x.dtype), self.rope_sin[rope_pos, None].to(x.dtype))  # (T, 1, hd)
        if self.decode_stack is not None and mask is None and layers == slice(None):
            out = self.decode_stack(self, x, rope, input_pos, cache, kv_len)
            if out is not None:
                return self.norm(out) if norm else out
        for layer in self.layers[layers]:
            x = layer(x, rope, input_pos, mask, cache, kv_len)
        return self.norm(x) if norm else x


def _attention_span(input_pos: Tensor, cache: Optional[KVCache]) -> tuple[int, Optional[Tensor]]:
    """How many cached positions the queries at input_pos (T,) read, and the mask for them.

    Eager: the filled prefix [0, start + T), unmasked where plain causal attention is right (no
    cache, a prefill from 0, one token). Under torch.compile: the whole cache, masked, so shapes do
    not change from step to step and no tensor is read back to Python.
    """
    T = input_pos.shape[0]
    if cache is None:
        return T, None  # attention among these T positions only
    if isinstance(cache, RaggedBatch):
        return 0, None  # each sequence's span and mask are the batch's (RaggedBatch.attend)
    if torch.compiler.is_compiling():
        return cache.max_seq, torch.arange(cache.max_seq, device=input_pos.device) <= input_pos[:, None]
    start = int(input_pos[0])
    if start + T > cache.max_seq:
        raise ValueError(f"positions up to {start + T - 1} do not fit a KV cache of {cache.max_seq}")
    if T == 1 or start == 0:
        return start + T, None
    return start + T, torch.arange(start + T, device=input_pos.device) <= input_pos[:, None]  # (T, start + T)


def rope_tables(config: LlamaConfig, length: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """cos and sin (length, head_dim) in fp32 (length: max_position_embeddings by default), in
    transformers' half-split layout (dimension i is paired with i + head_dim/2); sin's first half
    is negated, as `apply_rope` wants it. Rows do not depend on `length`."""
    hd = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))  # (hd/2,)
    if config.rope_scaling is not None:
        inv_freq = _llama3_inv_freq(inv_freq, **config.rope_scaling)
    pos = torch.arange(config.max_position_embeddings if length is None else length, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # (S, hd/2)
    return torch.cat([freqs, freqs], dim=-1).cos(), torch.cat([-freqs, freqs], dim=-1).sin()  # each (S, hd)


def _llama3_inv_freq(inv_freq: Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                     original_max_position_embeddings: int) -> Tensor:
    """Llama 3.1's RoPE: low frequencies slowed by `factor`, high ones kept, a smooth ramp between."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def apply_rope(x: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate x (B, T, heads, hd) by cos, sin (T, 1, hd): transformers' x * cos + rotate_half(x) * sin,
    with rotate_half(x) = [-x2, x1] written as roll(x) = [x2, x1] times the sign folded into sin
    (four ops instead of six; the same roundings as transformers, so fp32 logits match exactly)."""
    cos, sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


def load_llama(folder: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               weights: str = "dense") -> Llama:
    """A `Llama` with the weights of a local Hugging Face Llama folder (model.safetensors, or
    shards listed in model.safetensors.index.json), in `dtype`, in eval mode.

    weights: "dense" keeps the linear layers as loaded (in dtype); "q4_1", "q8_0", "int8" or "int4"
    quantizes them (`memlm.model.quantize.quantize_model`; needs dtype float32)."""
    from safetensors import safe_open

    folder = Path(folder)
    config = LlamaConfig.from_folder(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors or model.safetensors.index.json")
    hf: dict[str, Tensor] = {}
    for name in files:
        with safe_open(str(folder / name), framework="pt", device=str(device)) as f:
            for key in f.keys():
                hf[key] = f.get_tensor(key)

    with torch.device("meta"):
        model = Llama(config)
    state = _state_dict_from_hf(hf, config)
    state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:  # assign=True replaced the shared Parameter; share it again
        model.output.weight = model.tok_embeddings.weight
    cos, sin = rope_tables(config)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    if weights != "dense":
        from memlm.model.quantize import quantize_model

        if dtype != torch.float32:
            raise ValueError(f"weights={weights!r} quantizes fp32 weights; got dtype={dtype} (expected torch.float32)")
        quantize_model(model, weights)
    return model.eval()


def _state_dict_from_hf(hf: dict[str, Tensor], config: LlamaConfig) -> dict[str, Tensor]:
    """Map transformers' LlamaForCausalLM weight names onto this module's, fusing q/k/v and
    gate/up. Fails naming the first missing weight."""
    def take(name: str) -> Tensor:
        if name not in hf:
            raise KeyError(f"weight {name!r} is missing from the checkpoint")
        return hf.pop(name)

    state = {"tok_embeddings.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if config.tie_word_embeddings:
        hf.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
        state["output.weight"] = state["tok_embeddings.weight"]
    else:
        state["output.weight"] = take("lm_head.weight")
    for i in range(config.n_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        attn = p + "self_attn."
        suffixes = ["weight"] + (["bias"] if config.attention_bias else [])
        for s in suffixes:
            state[q + f"attention.wqkv.{s}"] = torch.cat([take(attn + f"{n}_proj.{s}") for n in "qkv"])
            state[q + f"attention.wo.{s}"] = take(attn + f"o_proj.{s}")
        for s in ["weight"] + (["bias"] if config.mlp_bias else []):
            state[q + f"feed_forward.w13.{s}"] = torch.cat([take(p + f"mlp.{n}_proj.{s}") for n in ("gate", "up")])
            state[q + f"feed_forward.w2.{s}"] = take(p + f"mlp.down_proj.{s}")
        state[q + "attention_norm.weight"] = take(p + "input_layernorm.weight")
        state[q + "ffn_norm.weight"] = take(p + "post_attention_layernorm.weight")
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"checkpoint has weights this Llama does not use: {', '.join(sorted(leftover)[:5])}")
    return state
