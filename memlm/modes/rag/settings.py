"""`rag` settings. It reads the store's own indexes, so a collection needs nothing for it."""
from __future__ import annotations

from pydantic import BaseModel, Field


class Settings(BaseModel):
    k: int = Field(4, ge=1, le=100, description="chunks retrieved when a request leaves k at 0 (the bundled model's "
                   "context holds a few; prompt building drops the ones that do not fit)")
