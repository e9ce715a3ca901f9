"""`retro` settings. `CollectionOptions`: a collection made with retro memory on
(`--memory retro`) keeps every chunk's neighbour states (the frozen base's states of the chunk and
its continuation at the CCA layers, `memlm.modes.retro.memory`), so that a retrieval skips its
base pass; retro also reads a collection without them (computing them per read), as long as its
chunks are the adapter's size, checked per request. `Settings`: the server's section.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

# The layers with CCA by default (after their attention). Megatron's rule for a deep
# model (from layer 9, 1-based, every 3rd: 0-based 8, 11, ..., 29 of 30) was the starting point;
# these copy more with the bundled model (held-out windows, the document's own chunks as
# neighbours, every gate at tanh 0.5, no training: loss 2.675 -> 1.985 against 2.268 with
# Megatron's 8; alone, 18 and 20 copy and 4, 8, 12, 16, 19, 21, 22 do not; /tmp scan in
# session 11) and cost less: neighbours run through 23 layers, not 29.
DEFAULT_LAYERS = (14, 17, 18, 20, 23)


class CollectionOptions(BaseModel):
    """What a collection's neighbour states store (fixed when it is created with `--memory retro`)."""

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float16", "bfloat16"] = Field("float16", description="on-disk dtype of the stored states "
                                                  "(738 KB per chunk in fp16 for the bundled model's 5 CCA layers)")


class Settings(BaseModel):
    weights: Optional[str] = Field(
        None, description="folder of the RETRO adapter (adapter.safetensors + adapter.json from `memlm train "
        "retro`); None = the weights shipped in the package for the bundled model")
    neighbours: Optional[int] = Field(None, gt=0, le=16, description="neighbours per chunk when a request leaves "
                                      "k at 0; None = the adapter's (2)")
    state_cache_mb: int = Field(
        256, ge=0, description="MiB of the base model's states of neighbours kept across generations (keyed by "
        "their token ids; 1.5 MiB per neighbour for the bundled model in fp32): a neighbour read again skips its "
        "pass through the base layers; 0 = none. See README, retro: decode speed")
    align_prompt_end: bool = Field(
        True, description="lay the chunk grid so that the prompt's last token ends a chunk: the prompt's last "
        "chunk (the question) has its neighbours from the first new token on; False: chunks from position 0, as "
        "in training (a prompt shorter than a chunk then reads nothing until its first 64 tokens are done)")
    search_mode: Optional[Literal["dense", "lexical", "hybrid"]] = Field(
        None, description="how each completed chunk's neighbours are searched when a request names no search_mode; "
        "None = the store's (hybrid, as training searched). 'lexical' (BM25 alone) skips embedding the chunk: "
        "~0.8 ms against ~48 ms per chunk on 2 cores (README, retro: decode speed)")
    build_batch_chunks: int = Field(16, gt=0, description="chunks whose neighbour states are built into one segment "
                                    "at a time: one turn of a queued build on the model worker")
    max_segments: int = Field(64, gt=0, description="compact a collection's neighbour states once they have more "
                              "segments than this")
    ingest_waits_for_memory: bool = Field(
        False, description="True: an Ingest into a collection with retro memory answers once its neighbour states "
        "are built; False: right after LMDB commits, the build queued on the model worker (a retro read computes "
        "the states of a chunk not built yet, so nothing waits for it)")
