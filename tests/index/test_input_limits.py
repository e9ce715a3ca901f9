"""MemoryStore's input checks in process, on real LMDB + FAISS files: re-ingest of unchanged
documents, the collection ceiling LMDB imposes, query vectors at the edges of float32."""
from __future__ import annotations

import numpy as np
import pytest

from memlm.config import StoreSettings
from memlm.errors import InvalidArgument, ResourceExhausted, bounded, quoted, quoted_items
from memlm.index.lmdb_store import MAX_COLLECTIONS, LmdbStore
from memlm.index.types import CollectionConfig, Document

DOCS = [
    Document("cats", "Cats are small domesticated felines that purr and chase mice.", {"tag": ["pets"], "year": 2020}),
    Document("rust", "Rust is a systems programming language focused on memory safety.", {"year": 2015}),
]


class CountingEmbedder:
    """The real embedder, counting the texts it is asked to embed."""

    def __init__(self, inner):
        self.inner, self.texts = inner, 0
        self.name, self.dim = inner.name, inner.dim

    def embed(self, texts):
        self.texts += len(texts)
        return self.inner.embed(texts)


def test_unchanged_documents_are_not_embedded_or_rewritten(tmp_path, tokenizer, embedder):
    from memlm.index.memory_store import MemoryStore

    counting = CountingEmbedder(embedder)
    with MemoryStore.open(tmp_path / "data", embedder=counting, tokenizer=tokenizer) as s:
        s.create_collection("c")
        first = s.ingest("c", DOCS)
        stored = s.get("c", ["cats", "rust"])
        seq, embedded = s.describe("c").pending_ops, counting.texts
        again = s.ingest("c", [DOCS[0], Document("rust", DOCS[1].text, {"year": 2016})])
        assert [(r.status, r.chunk_ids) for r in again[:1]] == [("unchanged", first[0].chunk_ids)]
        assert again[1].status == "replaced"
        assert counting.texts - embedded == again[1].chunks  # only the changed one was embedded
        assert s.get("c", ["cats"])[0].updated_at == stored[0].updated_at
        assert s.describe("c").pending_ops == seq + 1  # one commit, for "rust" alone
        only_unchanged = s.ingest("c", DOCS[:1])
        assert only_unchanged[0].status == "unchanged" and s.describe("c").pending_ops == seq + 1  # no commit


def test_max_collections_is_checked_before_lmdb_runs_out(store_factory):
    s = store_factory(StoreSettings(max_collections=2))
    s.create_collection("a")
    s.create_collection("b")
    with pytest.raises(ResourceExhausted, match=r"limit is 2 \(store\.max_collections\)"):
        s.create_collection("c")
    s.drop("a")
    s.create_collection("c")  # room again
    with pytest.raises(ValueError, match=str(MAX_COLLECTIONS)):
        StoreSettings(max_collections=MAX_COLLECTIONS + 1)


def test_lmdb_holds_max_collections_and_refuses_more_cleanly(tmp_path, monkeypatch):
    """The ceiling store.max_collections may be set to really fits in LMDB; past LMDB's own limit a
    create is RESOURCE_EXHAUSTED and leaves nothing behind."""
    import lmdb

    real_open = lmdb.open  # without fsync: 4,096 synced commits would only time the disk (35 s)
    monkeypatch.setattr(lmdb, "open", lambda *a, **kw: real_open(*a, **{**kw, "sync": False, "metasync": False}))
    lmdb_store = LmdbStore(tmp_path / "data", 2**30)
    try:
        for i in range(MAX_COLLECTIONS):
            lmdb_store.create_collection(CollectionConfig(name=f"c{i}"))
        made = len(lmdb_store.records())
        assert made == MAX_COLLECTIONS
        with pytest.raises(ResourceExhausted, match="drop one first"):
            for i in range(MAX_COLLECTIONS, MAX_COLLECTIONS + 8):  # LMDB's slack runs out within these
                lmdb_store.create_collection(CollectionConfig(name=f"c{i}"))
                made += 1
        assert len(lmdb_store.records()) == made  # the refused one left no record
    finally:
        lmdb_store.close()


@pytest.mark.parametrize("scale", [np.float32(3e38), np.float32(1e-40)], ids=["huge", "subnormal"])
def test_query_vector_scale_does_not_matter(store_factory, embedder, scale):
    s = store_factory()
    s.create_collection("v")
    s.ingest("v", DOCS)
    v = embedder.embed(["a purring pet"])[0]
    v = v / np.abs(v).max()
    want = s.search("v", vector=v, k=2)
    got = s.search("v", vector=v * scale, k=2)
    assert [h.doc_id for h in got] == [h.doc_id for h in want] == ["cats", "rust"]
    assert [h.score for h in got] == pytest.approx([h.score for h in want], abs=1e-5)
    with pytest.raises(InvalidArgument, match="all zeros"):
        s.search("v", vector=np.zeros(384, np.float32), k=2)


def test_quoting_helpers_bound_what_they_quote():
    assert quoted("abc") == "'abc'"
    assert quoted("n" * 15_000) == "'" + "n" * 79 + "... (15000 characters)"
    assert quoted_items(["a", "b"]) == "['a', 'b']"
    assert quoted_items([f"id{i}" for i in range(1500)]) == "['id0', 'id1', 'id2', 'id3', 'id4', ... and 1495 more]"
    assert len(bounded("x" * 100_000)) <= 2000 and "100000" in bounded("x" * 100_000)
    assert bounded("short") == "short"
