"""The one derived-data lifecycle (`index.derived`) on a real store with a real data dir: the rule
`bring_up_to_date` itself; each of the store's derived structures (FAISS, metadata, BM25) applied
commit by commit answers as it does rebuilt from LMDB; at open after a crash the vector index
replays the oplog past its snapshot's watermark, and rebuilds when its file is lost; the oplog is
never truncated past the lowest durable watermark, and structures in memory only hold none back."""
from __future__ import annotations

import logging

import numpy as np
import pytest

from memlm.config import StoreSettings
from memlm.index.derived import Change, DerivedStructure, bring_up_to_date
from memlm.index.types import Document

from test_recovery import check_consistent, doc  # tests/index is on sys.path (pytest rootdir-less imports)


def derived(store, name):
    return store._collections[name].derived  # noqa: SLF001 - the structures under test


def crash(store) -> None:
    """What kill -9 leaves: LMDB as committed, no snapshot written at close."""
    store._closed = True  # noqa: SLF001 - the fixture's close() then does nothing
    store._lmdb.close()  # noqa: SLF001


def answers(store, name, queries):
    """Every search mode's ranking (doc id, chunk id) for each query, with the scores of dense ones.
    BM25 scores are left out: removed chunks count in its document frequencies until a compaction
    (as Lucene's deleted documents do until a merge), so an index that applied deletes scores a
    little otherwise than one rebuilt without them, by design."""
    out = []
    for q, f in queries:
        for mode in ("dense", "lexical", "hybrid"):
            hits = store.search(name, q, k=5, filter=f, mode=mode)
            out.append([(h.doc_id, h.chunk_id) + ((round(h.score, 4),) if mode == "dense" else ()) for h in hits])
    return out


# ---------------------------------------------------------------- the rule


def test_the_rule_replays_the_net_change_when_the_log_reaches_back_else_rebuilds():
    log = {1: ([1, 2], []), 2: ([3], [1]), 3: ([4], [3])}  # seq -> (added, removed)

    def feed(after, upto):
        if after < 1:  # entries up to 1 are "truncated"
            return None
        return [(seq, *log[seq]) for seq in sorted(log) if after < seq <= upto]

    def never(*_a):
        raise AssertionError("the feed was read")

    assert bring_up_to_date(3, 3, never, apply=never, rebuild=never) is None  # in step: reads nothing
    change = bring_up_to_date(1, 3, feed, apply=lambda c: c, rebuild=lambda: "rebuilt")
    assert change.seq == 3 and change.payload is None
    assert change.removed.tolist() == [1, 3] and change.added.tolist() == [4]  # 3 came and went
    assert bring_up_to_date(0, 3, feed, apply=lambda c: c, rebuild=lambda: "rebuilt") == "rebuilt"  # truncated
    for unknown in (-1, 7):  # no watermark, or one ahead of the log (a dropped namesake's)
        assert bring_up_to_date(unknown, 3, never, apply=never, rebuild=lambda: "rebuilt") == "rebuilt"
    assert Change.net(3, []).added.dtype == np.int64


# ---------------------------------------------------------------- each structure


def test_every_structure_applied_commit_by_commit_answers_as_rebuilt(store_factory):
    s = store_factory()
    s.create_collection("c", index_factory="HNSW32")
    s.ingest("c", [doc(i) for i in range(8)])
    s.delete("c", ["d2", "d5"])
    s.ingest("c", [Document("d3", "Record 3 was rewritten: keyword3 now sits beside a lighthouse.", {"n": 3, "x": 1})])
    s.ingest("c", [doc(9)])
    structures = derived(s, "c")
    assert all(isinstance(x, DerivedStructure) for x in structures)
    assert [x.durable for x in structures] == [True, False, False]
    assert structures.metadata.applied_seq == structures.lexical.applied_seq == -1  # memory only: no watermark
    queries = [("keyword3 lighthouse", None), ("keyword7", {"n": 7}), ("entry filler", {"n": [1, 3, 9]})]
    before = answers(s, "c", queries)
    stored = s.chunk_ids("c")
    for x in structures:
        assert np.array_equal(x.ids(), stored) and len(x) == len(stored), x.name
        x.rebuild()
        assert np.array_equal(x.ids(), stored), x.name
        assert answers(s, "c", queries) == before, f"the {x.name} rebuilt answers otherwise"
    check_consistent(s, "c", {"d0", "d1", "d4", "d6", "d7", "d9"}, {"d2", "d5"})


def test_a_structure_in_memory_only_refuses_a_replay(store_factory):
    s = store_factory()
    s.create_collection("c")
    for x in derived(s, "c")[1:]:
        with pytest.raises(ValueError, match=f"the {x.name} lives in memory only"):
            x.apply(Change(1, np.array([0]), np.array([], np.int64)))


# ---------------------------------------------------------------- open


def test_open_after_a_crash_replays_past_the_snapshot_watermark(store_factory, tmp_path, caplog):
    s = store_factory(StoreSettings(snapshot_every_ops=1000))
    s.create_collection("c")
    s.ingest("c", [doc(i) for i in range(4)])
    s.snapshot("c")  # index-<1>.faiss
    assert derived(s, "c").vectors.applied_seq == 1
    s.ingest("c", [doc(4), doc(5)])  # seq 2
    s.delete("c", ["d0"])  # seq 3
    s.ingest("c", [Document("d1", "Record 1: keyword1 was replaced after the snapshot.", {"n": 1})])  # seq 4
    crash(s)
    files = sorted(p.name for p in (tmp_path / "data" / "collections" / "c").glob("index-*.faiss"))
    assert files == [f"index-{1:016d}.faiss"]  # the index file is older than LMDB

    with caplog.at_level(logging.INFO, logger="memlm.index.memory_store"):
        s2 = store_factory()
    assert "vector index loaded at seq 1 and replayed the oplog to 4" in caplog.text
    assert "metadata index rebuilt from stored document headers" in caplog.text
    assert "lexical index rebuilt from stored chunk texts" in caplog.text
    vectors = derived(s2, "c").vectors
    assert vectors.applied_seq == 1 and s2.describe("c").pending_ops == 3  # durable once the next snapshot runs
    check_consistent(s2, "c", {"d1", "d2", "d3", "d4", "d5"}, {"d0"})
    assert s2.search("c", "replaced after the snapshot", k=1, mode="lexical")[0].doc_id == "d1"
    s2.snapshot("c")
    assert vectors.applied_seq == 4 and s2.describe("c").pending_ops == 0


def test_a_lost_index_file_is_rebuilt_and_written_again(store_factory, tmp_path, caplog):
    s = store_factory(StoreSettings(snapshot_every_ops=1000))
    s.create_collection("c", index_factory="IVF16,Flat")
    s.ingest("c", [doc(i) for i in range(5)])
    s.delete("c", ["d4"])
    s.close()
    folder = tmp_path / "data" / "collections" / "c"
    for p in folder.glob("index-*.faiss"):
        p.unlink()
    with caplog.at_level(logging.INFO, logger="memlm.index.memory_store"):
        s2 = store_factory()
    assert "vector index rebuilt from stored vectors" in caplog.text
    assert derived(s2, "c").vectors.applied_seq == s2.last_seq("c") == 2  # written at open
    assert [p.name for p in folder.glob("index-*.faiss")] == [f"index-{2:016d}.faiss"]
    check_consistent(s2, "c", {f"d{i}" for i in range(4)}, {"d4"})


# ---------------------------------------------------------------- the oplog


def test_the_oplog_is_kept_back_to_the_lowest_durable_watermark(store_factory):
    s = store_factory(StoreSettings(snapshot_every_ops=2))
    s.create_collection("plain")
    s.create_collection("kv", memory={"knn": {}})
    s.set_watermark("kv", "knn", 1)
    for i in range(6):
        for name in ("plain", "kv"):
            s.ingest(name, [doc(10 * i + 1)])
            vectors = derived(s, name).vectors
            # Whatever has been snapshotted, the vector index can always replay past its file.
            assert s.changes(name, max(vectors.applied_seq, 0), s.last_seq(name)) is not None
    # The in-memory structures (watermark -1) keep nothing: "plain"'s oplog goes with each snapshot.
    assert derived(s, "plain").vectors.applied_seq == 6 and s.changes("plain", 5, 6) is None
    # The knn watermark (1) is the lowest durable one of "kv": nothing past it is gone.
    assert [seq for seq, _, _ in s.changes("kv", 1, 6)] == [2, 3, 4, 5, 6] and s.changes("kv", 0, 6) is None
