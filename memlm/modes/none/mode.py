"""`none`: the prompt as given, no collection, no memory."""
from __future__ import annotations

from memlm.modes.base import MemoryModeBase, ReadPlan


class Mode(MemoryModeBase):
    name = "none"
    summary = "plain generation: the prompt as given, nothing read from memory"
    reads_collection = False
    batchable = True

    async def plan(self, request) -> ReadPlan:
        return ReadPlan()
