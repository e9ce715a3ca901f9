"""`rag`: search the collection for the prompt (store.search_mode, the request's filter), put the
chunks into the prompt in rank order (memlm.prompts: as many as fit); citations are the chunks
that went in."""
from __future__ import annotations

from memlm.modes.base import MemoryModeBase, ReadPlan, search_for_prompt


class Mode(MemoryModeBase):
    name = "rag"
    summary = "the collection's best chunks for the prompt, put into the prompt"
    k_means = "chunks retrieved"
    batchable = True

    async def plan(self, request) -> ReadPlan:
        hits, ms = await search_for_prompt(self.runtime.store, request, request.k or self.settings.k)
        return ReadPlan(citations=hits, prompt_chunks=hits, retrieval_ms=ms)
