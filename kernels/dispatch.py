"""Dispatch each memory op to its Triton kernel or its PyTorch reference; callers never care which.

Choice, per call:
- backend="triton" | "reference" (argument) wins; then the MEMLM_KERNELS environment variable
  (triton | reference | auto, read at each call); then "auto".
- auto: Triton when the tensors are on CUDA and triton imports; the reference otherwise. CPU
  tensors always get the reference under auto, even with TRITON_INTERPRET=1 set, so that the
  kernel tests' interpreter setting cannot slow the rest of a test session down.
- forced "triton" on CPU tensors runs the Triton interpreter, which needs TRITON_INTERPRET=1 set
  before the *_triton modules are first imported (tests/kernels/conftest.py does it).
Triton is imported lazily, here and nowhere at package import, so `import memlm.kernels` works
without triton installed and before TRITON_INTERPRET is set.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Literal, Sequence

import torch

from . import reference
from .reference import AttentionState

Backend = Literal["triton", "reference"]
_CHOICES = ("triton", "reference", "auto")


@functools.cache
def triton_available() -> bool:
    """True when triton imports (it is an optional dependency)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(device: torch.device, backend: str | None = None) -> Backend:
    """Which implementation runs for tensors on `device`, given an optional forced choice."""
    choice = (backend or os.environ.get("MEMLM_KERNELS") or "auto").lower()
    if choice not in _CHOICES:
        raise ValueError(f"kernel backend {choice!r} is not one of {_CHOICES} (argument or MEMLM_KERNELS)")
    if choice == "reference":
        return "reference"
    if choice == "triton":
        if not triton_available():
            raise RuntimeError("kernel backend 'triton' was forced but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(f"kernel backend 'triton' on {device.type} tensors needs TRITON_INTERPRET=1 "
                               "set before memlm.kernels' Triton modules are imported")
        return "triton"
    return "triton" if device.type == "cuda" and triton_available() else "reference"


def _triton_module(name: str):
    """Import memlm.kernels.<name> (a *_triton module) on first use."""
    return importlib.import_module(f"{__package__}.{name}")


def memory_topk(
    q: torch.Tensor,  # (B, Hq, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    k: int,
    *,
    valid_n: int | None = None,
    shared_per_kv_head: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact MIPS top-k over memory: (scores (B, H, k) fp32, indices (B, H, k) int64, -1 padded).

    H = Hq, or Hkv with shared_per_kv_head (see reference.memory_topk_ref).
    """
    if choose_backend(q.device, backend) == "triton":
        fn = _triton_module("memory_topk_triton").memory_topk
    else:
        fn = reference.memory_topk_ref
    return fn(q, mem_k, k, valid_n=valid_n, shared_per_kv_head=shared_per_kv_head)


def knn_attention(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor | None,  # (B, Hkv, Tk, D)
    v_cache: torch.Tensor | None,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    mem_idx: torch.Tensor,  # (B, Hq, Tq, K) int64, -1 = absent
    *,
    scale: float | None = None,
    cache_len: int | torch.Tensor | None = None,
    return_state: bool = False,
    memory_only: bool = False,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, AttentionState]:
    """One softmax over causal local keys ∪ retrieved memory rows (see reference.knn_attention_ref)."""
    if choose_backend(q.device, backend) == "triton":
        fn = _triton_module("knn_attention_triton").knn_attention
    else:
        fn = reference.knn_attention_ref
    return fn(q, k_cache, v_cache, mem_k, mem_v, mem_idx, scale=scale, cache_len=cache_len,
              return_state=return_state, memory_only=memory_only)


def merge_attention_states(
    states: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],  # S x (m, l, acc)
    *,
    backend: str | None = None,
) -> tuple[torch.Tensor, AttentionState]:
    """Exact log-sum-exp merge of partial states: (out (B, Hq, Tq, D) fp32, merged state)."""
    if len(states) == 0:
        raise ValueError("merge_attention_states needs at least one state")
    if choose_backend(states[0][0].device, backend) == "triton":
        fn = _triton_module("merge_states_triton").merge_attention_states
    else:
        fn = reference.merge_attention_states_ref
    return fn(states)


def landmark_attention(
    q: torch.Tensor,  # (B, Hq, Tq, D)
    k_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    v_cache: torch.Tensor,  # (B, Hkv, Tk, D)
    mem_k: torch.Tensor,  # (Hkv, N, D)
    mem_v: torch.Tensor,  # (Hkv, N, D)
    block_rows: torch.Tensor,  # (nB, R) int64, -1 padded
    top_k: int,
    *,
    rep_k: torch.Tensor | None = None,  # (Hkv, E, D); None: a block scores as its best row
    rep_rows: torch.Tensor | None = None,  # (nB, S) int64, -1 padded
    rep_low: torch.Tensor | None = None,  # (Hkv, E, D): Quest's bound with rep_k the upper keys
    grouped: bool = False,  # trained landmarks: Landmark Attention's grouped softmax
    gate_bias: torch.Tensor | None = None,  # (Hq,) grouped: added to the landmark logits
    score_q: torch.Tensor | None = None,  # (B, Hq, Tq, D) the queries that score the blocks (default q)
    scale: float | None = None,
    cache_len: int | torch.Tensor | None = None,
    return_state: bool = False,
    backend: str | None = None,
):
    """Block retrieval and one softmax over local keys and the top-k blocks' rows: (out, BlockReads
    [, AttentionState]) (see landmark_reference.landmark_attention_ref)."""
    if choose_backend(q.device, backend) == "triton":
        fn = _triton_module("landmark_attention_triton").landmark_attention
    else:
        from .landmark_reference import landmark_attention_ref as fn
    return fn(q, k_cache, v_cache, mem_k, mem_v, block_rows, top_k, rep_k=rep_k, rep_rows=rep_rows, rep_low=rep_low,
              grouped=grouped, gate_bias=gate_bias, score_q=score_q, scale=scale, cache_len=cache_len,
              return_state=return_state)


def chunked_cross_attention(
    q: torch.Tensor,  # (B, H, T, dh)
    k: torch.Tensor,  # (B, G, H, L, dh)
    v: torch.Tensor,  # (B, G, H, L, dh)
    valid: torch.Tensor,  # (B, G, L) bool
    start: int,
    chunk_tokens: int,
    first_chunk: int,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """RETRO's chunked cross-attention (see chunked_attention.chunked_cross_attention_ref); the
    Triton path packs the valid rows first and reads no padding."""
    from . import chunked_attention

    if choose_backend(q.device, backend) == "triton":
        kp, vp, offsets = chunked_attention.pack_rows(k, v, valid)
        return _triton_module("chunked_attention_triton").chunked_cross_attention_packed(
            q, kp, vp, offsets, start, chunk_tokens, first_chunk, scale)
    return chunked_attention.chunked_cross_attention_ref(q, k, v, valid, start, chunk_tokens, first_chunk, scale)
