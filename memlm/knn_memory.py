"""Putting a Hugging Face Llama-family model into `knn` memory mode for one generation.

    with knn_mode(model, kv_memory, KNNConfig.from_name("default")):
        ...  # memlm.generation.generate_tokens(model, ...) as usual

Inside the block, at each memory layer every query retrieves its top-k rows of that layer's KV
memory and attends to them and to its local context in one softmax (`memlm.memory_attention`);
the other layers run SDPA exactly as before. On exit the model is as it was (attention
implementation, hooks, per-layer state), also after an exception.

How it plugs in: transformers 5.x looks the attention function up by `config._attn_implementation`
in `AttentionInterface`; we register "memlm_knn" once (it falls back to SDPA for layers without
memory) and give the same name SDPA's mask builder. The memory of a layer is attached to its
attention module as `_memlm_knn`, so two models never share state.

Positions (RoPE). The memory holds keys before RoPE with the position each had in its build
window; on entry they are rotated once, by `KNNConfig.positions`:
- "fixed": every memory key at position 0 (RoPE at 0 is the identity: no work); the local context
  is moved to start at `local_offset`, so every memory sits `local_offset` + i tokens before
  query i (Extended Mind likewise gives retrieved memories one fixed position).
- "original": each key at its position in the window it was computed in (0..window-1); the local
  context starts at `window`, as if that window had come right before the prompt.
The local context is moved by a forward pre-hook on the model's rotary embedding (position ids
+ offset), so the KV cache and masks are untouched.

Limits: batch size 1 without padding (what memlm.generation runs). The rotated fp32 copies of
the memory layers live in RAM for the duration of the block: 2 x Hkv x D x 4 bytes per token and
layer (1.5 KiB for SmolLM2).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Iterator, Optional, Sequence, Union

import torch

from memlm.index.kv_memory import KVMemory
from memlm.memory_attention import memory_attention

ATTN_NAME = "memlm_knn"
LAYER_PRESETS = ("all", "every4", "middle_third", "last_half", "first_half", "upper_two_thirds")
POSITION_STRATEGIES = ("fixed", "original")


@dataclass(frozen=True)
class KNNConfig:
    """How one generation reads its KV memory. Presets: `KNNConfig.from_name`."""

    layers: Union[str, tuple[int, ...]] = "all"  # a LAYER_PRESETS name or explicit layer indices
    top_k: int = 8  # memory rows retrieved per query (per head, see shared_per_kv_head)
    shared_per_kv_head: bool = False  # True: one retrieved set per KV head (group mean query)
    positions: str = "fixed"  # a POSITION_STRATEGIES name
    local_offset: Optional[int] = None  # first local position; None: 0 for "fixed", window for "original"
    min_memory_position: int = 0  # drop memory rows computed at window positions below this (sinks)

    def __post_init__(self):
        if self.positions not in POSITION_STRATEGIES:
            raise ValueError(f"positions={self.positions!r} is not one of {POSITION_STRATEGIES}")
        if isinstance(self.layers, str) and self.layers not in LAYER_PRESETS:
            raise ValueError(f"layers={self.layers!r} is not one of {LAYER_PRESETS} or a tuple of indices")
        if self.top_k < 1:
            raise ValueError(f"top_k={self.top_k} must be >= 1")

    @classmethod
    def from_name(cls, name: str, **overrides) -> "KNNConfig":
        return replace(PRESETS[name], **overrides)


# Chosen by measurement (pass key in 4,105 tokens of filler, local prompt = the question only,
# greedy; 2 trials, seeds 4096000 and 4096010, depths 0.55 and 0.16):
#   .venv/bin/python benchmarks/passkey.py --lengths 4096 --trials 3 --methods knn --sweep
#   (a) positions, all layers, per-query-head, k=8: fixed@local_offset 0: 2/2, fixed@64: 2/2,
#       fixed@1024: 2/2, original (local context at `window`): 2/2, fixed@0 dropping the 4 first
#       rows of each window (sinks): 2/2  -> a tie; "fixed" kept: no rotation at load and mem_k is
#       then one tensor the fused kernel reads as is.
#   (b) layers (fixed@0, per-query, k=8): all 30: 2/2; every4: 0/2; middle_third: 0/2;
#       last_half: 0/2; first_half: 0/2  -> all layers (as Extended Mind found: most layers).
#   (c) per-KV-head (group mean query): 1/2; per-query-head: 2/2  -> per query head.
#   (d) k: 4: 0/2; 8: 2/2; 16: 2/2  -> 8 (the cheaper of the two that work).
# Small samples: these are directions, not estimates. See benchmarks/passkey.py for the prose run.
PRESETS: dict[str, KNNConfig] = {
    "default": KNNConfig(layers="all", top_k=8, shared_per_kv_head=False, positions="fixed", local_offset=0),
}


def resolve_layers(spec: Union[str, Sequence[int]], num_layers: int) -> tuple[int, ...]:
    """A preset name or explicit indices -> sorted layer indices in [0, num_layers)."""
    if isinstance(spec, str):
        third = num_layers // 3
        table = {
            "all": range(num_layers),
            "every4": range(0, num_layers, 4),
            "middle_third": range(third, num_layers - third),
            "last_half": range(num_layers // 2, num_layers),
            "first_half": range(0, num_layers // 2),
            "upper_two_thirds": range(third, num_layers),
        }
        if spec not in table:
            raise ValueError(f"layer preset {spec!r} is not one of {sorted(table)}")
        return tuple(table[spec])
    layers = tuple(sorted(set(int(l) for l in spec)))
    bad = [l for l in layers if not 0 <= l < num_layers]
    if bad:
        raise ValueError(f"layers {bad} are outside [0, {num_layers})")
    return layers


@dataclass
class LayerMemory:
    """What one attention module reads in knn mode: rotated keys and values, (Hkv, N, D) fp32."""

    keys: torch.Tensor
    values: torch.Tensor
    top_k: int
    shared_per_kv_head: bool
    calls: int = field(default=0)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_keys(model, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Apply the model's own RoPE to keys (Hkv, N, D) at positions (N,): (Hkv, N, D) fp32."""
    rotary = model.model.rotary_emb
    k = keys.float()
    cos, sin = rotary(k, positions.view(1, -1).long())  # (1, N, D) each
    return k * cos + _rotate_half(k) * sin


def _knn_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The "memlm_knn" attention function: memory attention where a layer has memory, else SDPA.

    query (B, Hq, Tq, D), key/value (B, Hkv, Tk, D) after RoPE and the cache update.
    Returns (B, Tq, Hq, D) and no attention weights, like transformers' SDPA function.
    """
    mem: Optional[LayerMemory] = getattr(module, "_memlm_knn", None)
    if mem is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    if query.shape[0] != 1:
        raise NotImplementedError(f"knn memory attention runs batch size 1, got {query.shape[0]}")
    mem.calls += 1
    out = memory_attention(
        query, key, value, mem.keys, mem.values, mem.top_k, shared_per_kv_head=mem.shared_per_kv_head, scale=scaling
    )  # (B, Hq, Tq, D); causal on the local part, the same mask SDPA would apply for batch 1
    return out.transpose(1, 2).contiguous(), None


_registered = False


def register_attention() -> None:
    """Register "memlm_knn" with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _knn_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _registered = True


def prepare_layer_memories(model, memory: KVMemory, config: KNNConfig) -> dict[int, LayerMemory]:
    """Load and rotate the memory of each chosen layer (fp32, in RAM)."""
    layers = resolve_layers(config.layers, model.config.num_hidden_layers)
    missing = [l for l in layers if l not in memory.layers]
    if missing:
        raise ValueError(f"layers {missing} are not in the KV memory (it holds {memory.layers})")
    positions = torch.from_numpy(memory.positions().astype("int64"))  # (N,)
    keep = positions >= config.min_memory_position if config.min_memory_position > 0 else None
    out = {}
    for l in layers:
        k, v = memory.layer(l)  # (Hkv, N, D) each, pre-RoPE
        if keep is not None:
            k, v = k[:, keep], v[:, keep]
        if config.positions == "original":
            pos = positions if keep is None else positions[keep]
            k = rotate_keys(model, k, pos)
        else:  # "fixed": position 0, RoPE is the identity
            k = k.float()
        out[l] = LayerMemory(k.contiguous(), v.float().contiguous(), config.top_k, config.shared_per_kv_head)
    return out


def local_offset(memory: KVMemory, config: KNNConfig) -> int:
    if config.local_offset is not None:
        return int(config.local_offset)
    return memory.manifest.window if config.positions == "original" else 0


@contextmanager
def knn_mode(
    model, memory: KVMemory, config: KNNConfig = KNNConfig(), layer_memories: Optional[dict[int, LayerMemory]] = None
) -> Iterator[dict[int, LayerMemory]]:
    """Put `model` into knn mode for the block; yields the per-layer memories (for inspection).

    layer_memories: pass what `prepare_layer_memories` returned to reuse it across generations.
    """
    register_attention()
    mems = layer_memories if layer_memories is not None else prepare_layer_memories(model, memory, config)
    offset = local_offset(memory, config)
    decoder = model.model.layers
    old_impl = model.config._attn_implementation
    hook = None
    try:
        for l, m in mems.items():
            decoder[l].self_attn._memlm_knn = m
        model.config._attn_implementation = ATTN_NAME
        if offset:
            def shift_positions(_module, args, kwargs):
                if "position_ids" in kwargs and kwargs["position_ids"] is not None:
                    kwargs["position_ids"] = kwargs["position_ids"] + offset
                elif len(args) > 1:
                    args = (args[0], args[1] + offset, *args[2:])
                return args, kwargs

            hook = model.model.rotary_emb.register_forward_pre_hook(shift_positions, with_kwargs=True)
        yield mems
    finally:
        if hook is not None:
            hook.remove()
        model.config._attn_implementation = old_impl
        for layer in decoder:
            if hasattr(layer.self_attn, "_memlm_knn"):
                del layer.self_attn._memlm_knn
