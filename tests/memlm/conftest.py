"""One ModelHost on the real bundled model for the whole session (loading takes ~3 s)."""
from __future__ import annotations

import asyncio

import pytest

from memlm.config import ModelSettings
from memlm.engine import GenerationRequest, GenerationResult, TextDelta
from memlm.errors import NotFound
from memlm.index.types import SearchHit


def hit(chunk_id: int, text: str, doc_id: str = "doc") -> SearchHit:
    return SearchHit(chunk_id=chunk_id, doc_id=doc_id, score=1.0 - chunk_id / 100, text=text, metadata={},
                     chunk_index=chunk_id, start=0, end=len(text))


class ListMemory:
    """A test double of the store's `MemoryReader` interface: fixed hits for one collection,
    recording each search call. (The real store is tested under tests/index.)"""

    def __init__(self, collection: str, hits: list[SearchHit]):
        self.collection, self.hits, self.calls = collection, hits, []

    def search(self, collection, query=None, vector=None, k=10, filter=None, mode=None):
        self.calls.append(dict(collection=collection, query=query, k=k, filter=filter, mode=mode))
        if collection != self.collection:
            raise NotFound(f"collection {collection!r} does not exist")
        return self.hits[:k]


PASS_KEY = "48213"
PASS_KEY_HITS = [
    hit(0, f"The pass key is {PASS_KEY}. Remember it. {PASS_KEY} is the pass key."),
    hit(1, "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."),
]


@pytest.fixture(scope="session")
def memory() -> ListMemory:
    store = ListMemory("notes", PASS_KEY_HITS)
    store.pass_key = PASS_KEY  # only the first hit states it
    return store


@pytest.fixture(scope="session")
def host(memory):
    from memlm.host import ModelHost

    # dense weights: tests here hold the served owned model to transformers token for token; the
    # served default (q4_1) runs in every test that starts a server (tests/services, tests/modes).
    h = ModelHost.load(ModelSettings(weights="dense"), memory=memory)
    yield h
    asyncio.run(h.close())


async def _collect(host, request: GenerationRequest):
    deltas, results = [], []
    async for event in host.generate(request):
        (deltas if isinstance(event, TextDelta) else results).append(event)
    assert len(results) == 1 and isinstance(results[0], GenerationResult)
    return [d.text for d in deltas], results[0]


def _collect_sync(host, request: GenerationRequest) -> tuple[list[str], GenerationResult]:
    return asyncio.run(_collect(host, request))


@pytest.fixture(scope="session")
def collect():
    """`collect(host, request)` runs one request to the end: (streamed delta texts, final result)."""
    return _collect_sync
