"""Shared fixtures: the real bundled tokenizer and the real MiniLM embedder, loaded once."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tokenizer():
    from memlm.models.loading import bundled_model_dir, load_tokenizer

    return load_tokenizer(bundled_model_dir())  # converts the GGUF once (~30 s) if not cached


@pytest.fixture(scope="session")
def embedder():
    from memlm.index.embedding import load_embedder

    return load_embedder("all-MiniLM-L6-v2")


@pytest.fixture
def store_factory(tmp_path, tokenizer, embedder):
    """Opens MemoryStores on tmp_path with the shared models; closes what is still open after."""
    from memlm.config import StoreSettings
    from memlm.index.memory_store import MemoryStore

    opened = []

    def make(settings: StoreSettings = StoreSettings(), path=None) -> MemoryStore:
        s = MemoryStore.open(path or tmp_path / "data", settings, embedder=embedder, tokenizer=tokenizer)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()
