"""`retro` settings. RETRO keeps nothing per collection beyond what the store already has (its
64-token chunks, their embeddings and index): a collection it reads needs chunks of the adapter's
chunk size, checked per request. So there is no `CollectionOptions`, only the server's section."""
from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, Field


class Settings(BaseModel):
    weights: Optional[str] = Field(
        None, description="folder of the RETRO adapter (adapter.safetensors + adapter.json from `memlm train "
        "retro`); None = the weights shipped in the package for the bundled model")
    neighbours: Optional[int] = Field(None, gt=0, le=16, description="neighbours per chunk when a request leaves "
                                      "k at 0; None = the adapter's (2)")
    align_prompt_end: bool = Field(
        True, description="lay the chunk grid so that the prompt's last token ends a chunk: the prompt's last "
        "chunk (the question) has its neighbours from the first new token on; False: chunks from position 0, as "
        "in training (a prompt shorter than a chunk then reads nothing until its first 64 tokens are done)")
