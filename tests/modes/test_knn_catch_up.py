"""The knn mode's KV memory kept in step by watermark (KVMemoryManager.catch_up) on a real store and
the real bundled model: in step it reads one LMDB record and never lists the collection's chunks;
behind, it applies the oplog past its watermark; when the oplog no longer reaches back or its
folder is lost, it rebuilds by comparing chunk ids; bounded catch-ups finish in several turns."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from memlm.config import StoreSettings
from memlm.index.types import Document

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def parts(bundled_model_dir):
    from memlm.index.embedding import load_embedder
    from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(None)
    return load_model(model_dir), load_tokenizer(model_dir), load_embedder("all-MiniLM-L6-v2")  # as the host loads them


@pytest.fixture
def setup(parts, tmp_path):
    from memlm.index.memory_store import MemoryStore
    from memlm.modes.knn.memories import KVMemoryManager
    from memlm.modes.knn.settings import Settings

    model, tokenizer, embedder = parts
    store = MemoryStore.open(tmp_path / "data", StoreSettings(snapshot_every_ops=2), embedder=embedder, tokenizer=tokenizer)
    store.create_collection("kv", memory={"knn": {"layers": "1,15", "window": 128, "overlap": 16}})
    manager = KVMemoryManager(store, model, Settings(build_batch_tokens=64), model_name=store.tokenizer_name)
    yield store, manager
    store.close()


def doc(i: int) -> Document:
    return Document(f"d{i}", f"Record {i}: the lighthouse keeper wrote down the tide at {i} o'clock. " * 4)


def rows_by_chunk(manager) -> dict[int, int]:
    ids = manager.memory("kv").chunk_ids()
    return {int(c): int(n) for c, n in zip(*np.unique(ids, return_counts=True))}


def test_in_step_costs_no_scan_and_behind_replays_the_oplog(setup, monkeypatch):
    store, manager = setup
    store.ingest("kv", [doc(0), doc(1)])
    first = manager.catch_up("kv")
    assert first.done and first.built_documents == 2 and manager.memory("kv").manifest.applied_seq == store.last_seq("kv")
    assert store.describe("kv").memory_lag == {"knn": 0}

    def no_scan(*_a, **_k):
        raise AssertionError("catch_up listed every chunk of the collection")

    monkeypatch.setattr(store, "chunk_ids", no_scan)
    assert manager.catch_up("kv").added_rows == 0  # in step: nothing read but the record

    store.ingest("kv", [Document("d0", "Record 0 was rewritten: the keeper moved inland.")])  # replace
    store.delete("kv", ["d1"])
    report = manager.catch_up("kv")  # replays two entries, no scan
    assert report.built_documents == 1 and report.removed_chunks >= 2
    stored = {int(c) for c in store._lmdb.chunk_ids("kv")}
    assert set(rows_by_chunk(manager)) == stored  # exactly the live chunks' rows


def test_rebuilds_when_the_oplog_is_gone_or_the_folder_is_lost(setup):
    store, manager = setup
    store.ingest("kv", [doc(0)])
    manager.catch_up("kv")
    built = rows_by_chunk(manager)
    for i in range(1, 6):  # the memory is behind while snapshots run; its watermark holds the oplog
        store.ingest("kv", [doc(i)])
    assert store.changes("kv", manager.memory("kv").manifest.applied_seq, store.last_seq("kv")) is not None
    manager.catch_up("kv")
    assert set(rows_by_chunk(manager)) == {int(c) for c in store._lmdb.chunk_ids("kv")}
    assert {c: n for c, n in rows_by_chunk(manager).items() if c in built} == built  # nothing built twice

    shutil.rmtree(store.collection_dir("kv") / "kv")  # lost: rebuilt empty, then from LMDB
    report = manager.catch_up("kv")
    assert report.done and report.built_documents == 6
    assert set(rows_by_chunk(manager)) == {int(c) for c in store._lmdb.chunk_ids("kv")}


def test_a_bounded_catch_up_finishes_in_turns(setup):
    store, manager = setup
    store.ingest("kv", [doc(i) for i in range(4)])  # ~70 tokens each, 64-token segments: 4 segments
    turns = 0
    while not (report := manager.catch_up("kv", max_segments=1)).done:
        turns += 1
        assert report.added_rows > 0 and store.describe("kv").memory_lag == {"knn": 1}
    assert turns >= 3 and store.describe("kv").memory_lag == {"knn": 0}
    assert set(rows_by_chunk(manager)) == {int(c) for c in store._lmdb.chunk_ids("kv")}
