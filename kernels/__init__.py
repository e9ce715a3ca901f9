"""Memory-layer kernels: exact top-k retrieval over memory, kNN-augmented attention, state merging.

Model code calls these three functions; the dispatcher runs the Triton kernel on CUDA and the
PyTorch reference on CPU (MEMLM_KERNELS=triton|reference|auto, or backend=, forces a choice).
Triton kernels live in the *_triton modules, the references in reference.py; nothing here imports
triton, so this package imports without it and before TRITON_INTERPRET is set.
"""
from .dispatch import choose_backend, knn_attention, memory_topk, merge_attention_states
from .reference import AttentionState, check_gqa, expand_shared_indices, group_queries

__all__ = [
    "AttentionState",
    "check_gqa",
    "choose_backend",
    "expand_shared_indices",
    "group_queries",
    "knn_attention",
    "memory_topk",
    "merge_attention_states",
]
