"""`retro` settings. RETRO keeps nothing per collection beyond what the store already has (its
64-token chunks, their embeddings and index): a collection it reads needs chunks of the adapter's
chunk size, checked per request. So there is no `CollectionOptions`, only the server's section."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field

# The layers with CCA by default (after their attention). Megatron's rule for a deep
# model (from layer 9, 1-based, every 3rd: 0-based 8, 11, ..., 29 of 30) was the starting point;
# these copy more with the bundled model (held-out windows, the document's own chunks as
# neighbours, every gate at tanh 0.5, no training: loss 2.675 -> 1.985 against 2.268 with
# Megatron's 8; alone, 18 and 20 copy and 4, 8, 12, 16, 19, 21, 22 do not; /tmp scan in
# session 11) and cost less: neighbours run through 23 layers, not 29.
DEFAULT_LAYERS = (14, 17, 18, 20, 23)


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
