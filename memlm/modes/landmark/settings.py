"""`landmark` settings. `CollectionOptions`: what a collection's block memory stores (fixed at
creation, the same options as knn's KV memory: it is one); `Settings`: how generations pick blocks
(per generation) and what building the memory may cost (per process, knn's `BuildSettings`)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from memlm.modes.knn.settings import BuildSettings, CollectionOptions as KVMemoryOptions

REPRESENTATIONS = ("mean", "minmax", "max", "trained")
POSITIONS = ("fixed", "in_block", "original")


class CollectionOptions(KVMemoryOptions):
    """What a collection's block memory stores (`--memory landmark`): the keys and values of every
    token at `layers`, in knn's KV segment format; a block is one of the store's chunks."""


class Settings(BuildSettings):
    top_k: int = Field(4, gt=0, le=64, description="blocks (stored chunks) each query head reads per memory layer "
                       "when a request leaves k at 0 (the Landmark Attention paper's top-4)")
    representation: Literal["mean", "minmax", "max", "trained"] = Field(
        "max", description="how a block is scored for a query: 'mean' (q . the block's mean key, InfLLM-like), "
        "'minmax' (Quest: sum over dims of max(q * min, q * max), an upper bound of the block's best q . k), 'max' "
        "(the block's best q . k, exact: every row scored per step, cost growing with the memory) or 'trained' "
        "(the trained landmark token's key, one per block, read by the grouped softmax: `weights`). Default by "
        "measurement: pass key at 4k, 15 trials, max 15/15, minmax 6/15, mean 0/15 (README, landmark)")
    weights: Optional[str] = Field(
        None, description="'trained': folder of the landmark adapter (adapter.safetensors + adapter.json from "
        "`memlm train landmark`); None = the weights shipped in the package for the bundled model")
    group: int = Field(64, gt=0, le=64, description="'mean'/'minmax': rows per representation (a block scores as "
                       "its best group; 64 = one per block)")
    candidates: int = Field(0, ge=0, description="'mean'/'minmax': shortlist this many blocks per head by the "
                            "representation, then rank them by their best row (exact); 0 = no shortlist")
    positions: Literal["fixed", "in_block", "original"] = Field(
        "in_block", description="RoPE of the blocks read: 'fixed' (every memory key at position 0, the local context "
        "from 0: InfLLM's rule, no positional offset for far blocks), 'in_block' (each key at its offset in its block, "
        "the local context from the block size on: every block read sits just before the prompt, its order kept), "
        "'original' (each key at its position in its build window, the local context after one window: neighbouring "
        "blocks keep their order)")
    layers: str = Field("all_but_first", description="the memory layers read: a knn LAYER_PRESETS name or indices; "
                        "layers the collection's memory does not store are skipped")
    min_memory_position: int = Field(4, ge=0, description="memory rows computed at build-window positions below "
                                     "this are left out (attention sinks)")
