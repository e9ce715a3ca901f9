"""Memory-layer kernels: exact top-k retrieval over memory, kNN-augmented attention, landmark
(block-retrieval) attention, state merging, RETRO's chunked cross-attention.

Model code calls these functions; the dispatcher runs the Triton kernel on CUDA and the
PyTorch reference on CPU (MEMLM_KERNELS=triton|reference|auto, or backend=, forces a choice).
Triton kernels live in the *_triton modules, the references in reference.py (RETRO's in
chunked_attention.py, landmark's in landmark_reference.py); nothing here imports triton, so this
package imports without it and before TRITON_INTERPRET is set.
"""
from .dispatch import (
    chunked_cross_attention, choose_backend, knn_attention, landmark_attention, memory_topk, merge_attention_states,
)
from .landmark_reference import BlockReads
from .reference import AttentionState, check_gqa, expand_shared_indices, group_queries

__all__ = [
    "AttentionState",
    "BlockReads",
    "check_gqa",
    "chunked_cross_attention",
    "choose_backend",
    "expand_shared_indices",
    "group_queries",
    "knn_attention",
    "landmark_attention",
    "memory_topk",
    "merge_attention_states",
]
