"""Memory-layer kernels: exact top-k retrieval over memory, kNN-augmented attention, state merging,
RETRO's chunked cross-attention.

Model code calls these functions; the dispatcher runs the Triton kernel on CUDA and the
PyTorch reference on CPU (MEMLM_KERNELS=triton|reference|auto, or backend=, forces a choice).
Triton kernels live in the *_triton modules, the references in reference.py (RETRO's in
chunked_attention.py); nothing here imports triton, so this package imports without it and before
TRITON_INTERPRET is set.
"""
from .dispatch import chunked_cross_attention, choose_backend, knn_attention, memory_topk, merge_attention_states
from .reference import AttentionState, check_gqa, expand_shared_indices, group_queries

__all__ = [
    "AttentionState",
    "check_gqa",
    "chunked_cross_attention",
    "choose_backend",
    "expand_shared_indices",
    "group_queries",
    "knn_attention",
    "memory_topk",
    "merge_attention_states",
]
