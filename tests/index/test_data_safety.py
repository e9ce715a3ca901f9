"""A write is acknowledged by its LMDB commit, so nothing after the commit may turn it into an error:
a failure in any derived-index step (FAISS add/remove, the metadata and lexical indexes, the
snapshot) is repaired from LMDB and the call still succeeds; a collection whose indexes cannot be
recovered becomes unavailable (FAILED_PRECONDITION naming why) without stopping the store, and
Reindex or a restart brings it back."""
from __future__ import annotations

import pytest

from memlm.config import StoreSettings
from memlm.errors import FailedPrecondition, InvalidArgument
from memlm.index.filters import MetadataIndex
from memlm.index.lexical_index import LexicalIndex
from memlm.index.lmdb_store import LmdbStore
from memlm.index.types import Document
from memlm.index.vector_index import VectorIndex

from test_recovery import check_consistent, doc  # tests/index is on sys.path (pytest rootdir-less imports)

# (class, method, the call that reaches it after the commit)
STEPS = [
    (VectorIndex, "add", "ingest"),
    (VectorIndex, "remove", "replace"),
    (VectorIndex, "remove", "delete"),
    (MetadataIndex, "add", "ingest"),
    (MetadataIndex, "remove", "delete"),
    (LexicalIndex, "apply", "ingest"),
    (LexicalIndex, "apply", "delete"),
    (VectorIndex, "save", "ingest"),  # the snapshot (snapshot_every_ops=1)
]


def fail(monkeypatch, cls, method, times):
    """Make cls.method raise on its next `times` calls (None: every call)."""
    real = getattr(cls, method)
    left = [times]

    def broken(self, *args, **kwargs):
        if left[0] is None or left[0] > 0:
            if left[0] is not None:
                left[0] -= 1
            raise RuntimeError(f"injected failure in {cls.__name__}.{method}")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, broken)


def write(store, call):
    if call == "ingest":
        results = store.ingest("c", [doc(7)])
        assert [r.status for r in results] == ["created"]
        return {"d1", "d2", "d7"}, set()
    if call == "replace":
        changed = Document("d1", "Record 1: the 1th entry mentions keyword1 and new words.", {"n": 1})
        assert [r.status for r in store.ingest("c", [changed])] == ["replaced"]
        assert store.get("c", ["d1"])[0].text == changed.text
        return {"d1", "d2"}, set()
    assert store.delete("c", ["d2"]) == ["d2"]
    return {"d1"}, {"d2"}


@pytest.mark.parametrize("cls,method,call", STEPS, ids=[f"{c.__name__}.{m}-{call}" for c, m, call in STEPS])
def test_a_failure_after_the_commit_is_repaired_and_the_call_succeeds(
    store_factory, monkeypatch, caplog, cls, method, call
):
    s = store_factory(StoreSettings(snapshot_every_ops=1))
    s.create_collection("c")
    s.ingest("c", [doc(1), doc(2)])
    fail(monkeypatch, cls, method, times=1)
    present, absent = write(s, call)
    assert f"injected failure in {cls.__name__}.{method}" in caplog.text  # logged, not answered
    assert s.describe("c").problem is None
    check_consistent(s, "c", present, absent)
    monkeypatch.undo()
    s.close()
    check_consistent(store_factory(), "c", present, absent)  # and the same after a restart


def test_when_recovery_fails_too_the_write_stands_and_the_collection_is_unavailable(store_factory, monkeypatch):
    s = store_factory()
    s.create_collection("c")
    s.create_collection("other")
    s.ingest("c", [doc(1)])
    s.ingest("other", [doc(5)])
    fail(monkeypatch, VectorIndex, "add", times=None)  # the rebuild from LMDB fails as well
    assert [r.status for r in s.ingest("c", [doc(2)])] == ["created"]  # committed: acknowledged
    problem = s.describe("c").problem
    assert problem and "injected failure in VectorIndex.add" in problem
    for call in (lambda: s.search("c", "keyword1"), lambda: s.ingest("c", [doc(3)]), lambda: s.delete("c", ["d1"])):
        with pytest.raises(FailedPrecondition, match=r"collection 'c' is unavailable: .*Reindex it"):
            call()
    assert {d.id for d in s.get("c", ["d1", "d2"])} == {"d1", "d2"}  # LMDB still answers
    assert s.search("other", "keyword5", k=1)[0].doc_id == "d5"  # the other collection serves
    monkeypatch.undo()
    assert s.reindex("c").index_factory == "Flat"  # the repair
    check_consistent(s, "c", {"d1", "d2"}, set())
    s.close()
    check_consistent(store_factory(), "c", {"d1", "d2"}, set())


def test_reindex_changes_the_index_type_durably(store_factory, tmp_path):
    s = store_factory(StoreSettings(snapshot_every_ops=1000))
    s.create_collection("c")
    s.ingest("c", [doc(i) for i in range(6)])
    s.delete("c", ["d0"])
    with pytest.raises(InvalidArgument, match="HNSW0"):
        s.reindex("c", "HNSW0")
    assert s.collection_config("c").index_factory == "Flat"  # a refused reindex changes nothing
    assert s.reindex("c", "HNSW16").index_factory == "HNSW16"
    files = sorted(p.name for p in (tmp_path / "data" / "collections" / "c").glob("index-*.faiss"))
    assert len(files) == 1  # the old factory's snapshot is gone
    check_consistent(s, "c", {f"d{i}" for i in range(1, 6)}, {"d0"})
    s.ingest("c", [doc(9)])
    s.close()
    s2 = store_factory()
    assert s2.collection_config("c").index_factory == "HNSW16"
    check_consistent(s2, "c", {f"d{i}" for i in range(1, 6)} | {"d9"}, {"d0"})


@pytest.mark.parametrize("factory", ["HNSW0", "NSG32", "IVF0,Flat"])
def test_a_stored_collection_with_an_unservable_factory_opens_unavailable(store_factory, tmp_path, factory):
    """A data dir written before factories were checked: the store opens (HNSW0 used to abort the
    process in recovery), reports the collection, serves the others, and can repair or drop it."""
    s = store_factory()
    s.create_collection("bad")
    s.create_collection("good")
    s.ingest("bad", [doc(1), doc(2)])
    s.ingest("good", [doc(3)])
    s.close()
    lmdb = LmdbStore(tmp_path / "data", 2**30)
    lmdb.set_index_factory("bad", factory)  # what an old server accepted at CreateCollection
    lmdb.close()
    for p in (tmp_path / "data" / "collections" / "bad").glob("index-*"):
        p.unlink()  # no snapshot: recovery must build one of that type

    s2 = store_factory()
    problem = s2.describe("bad").problem
    assert problem and f"index factory {factory!r} cannot be served" in problem
    assert s2.describe("bad").documents == 2
    with pytest.raises(FailedPrecondition, match="unavailable"):
        s2.search("bad", "keyword1")
    check_consistent(s2, "good", {"d3"}, set())
    s2.reindex("bad", "Flat")
    check_consistent(s2, "bad", {"d1", "d2"}, set())
    s2.drop("good")  # and a drop works on any of them
    assert [c.name for c in s2.list_collections()] == ["bad"]


def test_a_full_lmdb_map_is_resource_exhausted_and_stores_nothing(store_factory):
    from memlm.errors import ResourceExhausted

    s = store_factory(StoreSettings(map_size_gib=2 / 1024))  # a 2 MiB map
    s.create_collection("c")
    s.ingest("c", [doc(1)])
    big = [Document(f"big{i}", f"Filler text number {i} about nothing in particular. " * 200) for i in range(20)]
    with pytest.raises(ResourceExhausted, match=r"store\.map_size_gib.*nothing from this call was stored"):
        s.ingest("c", big)
    assert s.describe("c").documents == 1
    s.close()
    check_consistent(store_factory(StoreSettings(map_size_gib=2 / 1024)), "c", {"d1"}, set())
