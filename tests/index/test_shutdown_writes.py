"""`MemoryStore.stop_writes()` (what the server calls when its shutdown grace period ends): a long
ingest or delete still running stops before its commit, raises Unavailable, and stores nothing.
The faults are injected in-process on a real store with real LMDB files."""
import pytest

from memlm.errors import Unavailable
from memlm.index.lmdb_store import LmdbStore
from memlm.index.types import Document


def _docs(n: int) -> list[Document]:
    return [Document(id=f"d{i}", text=f"document number {i} about topic {i % 13}") for i in range(n)]


def test_stop_during_embedding_stores_nothing(store_factory, embedder, monkeypatch):
    store = store_factory()
    store.create_collection("c")
    real_embed, batches = embedder.embed, []

    def embed(texts):
        batches.append(len(texts))
        if len(batches) == 2:
            store.stop_writes()  # SIGTERM's grace period ends while the call embeds
        return real_embed(texts)

    monkeypatch.setattr(embedder, "embed", embed)
    with pytest.raises(Unavailable, match="nothing from this call was stored"):
        store.ingest("c", _docs(600))
    assert len(batches) == 2, "embedding went on after the stop"
    assert store.describe("c").documents == 0 and store.describe("c").chunks == 0


def test_stop_during_a_long_delete_aborts_its_transaction(store_factory, monkeypatch):
    store = store_factory()
    store.create_collection("c")
    store.ingest("c", _docs(600))
    real_delete_chunks, calls = LmdbStore._delete_chunks, []

    def delete_chunks(txn, dbs, chunk_ids):
        calls.append(1)
        if len(calls) == 300:
            store.stop_writes()  # half the documents are deleted inside the open transaction
        real_delete_chunks(txn, dbs, chunk_ids)

    monkeypatch.setattr(LmdbStore, "_delete_chunks", staticmethod(delete_chunks))
    with pytest.raises(Unavailable, match="nothing from this call was stored"):
        store.delete("c", [f"d{i}" for i in range(600)])
    assert len(calls) < 600, "the delete ran to its end"
    assert store.describe("c").documents == 600
    assert [d.id for d in store.get("c", ["d0", "d299", "d599"])] == ["d0", "d299", "d599"]
    assert len(store.search("c", query="topic 3", k=5)) == 5
    with pytest.raises(Unavailable):  # and every later write is refused
        store.ingest("c", _docs(1))
