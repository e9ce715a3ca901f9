"""Durability: reopen after close, a kill -9 mid-ingest, and lost or corrupted index files."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from memlm.config import StoreSettings
from memlm.index.memory_store import MemoryStore
from memlm.index.types import Document


def doc(i: int) -> Document:
    return Document(f"d{i}", f"Record {i}: the {i}th entry mentions keyword{i} and unrelated filler text.", {"n": i})


def check_consistent(store: MemoryStore, name: str, present: set[str], absent: set[str]) -> None:
    st = store.describe(name)
    assert st.index_vectors == st.chunks, "index and LMDB disagree"
    if present:
        got = {d.id for d in store.get(name, sorted(present))}
        assert got == present
    for mode in ("dense", "lexical", "hybrid"):
        for doc_id in present:
            i = int(doc_id[1:])
            hits = store.search(name, f"keyword{i}", k=5, filter={"n": i}, mode=mode)
            assert hits and hits[0].doc_id == doc_id, f"acknowledged {doc_id} not found by {mode} search"
        for doc_id in absent:
            hits = store.search(name, "entry", k=5, filter={"n": int(doc_id[1:])}, mode=mode)
            assert not hits, f"deleted {doc_id} still found by {mode} search"
    if present:  # unfiltered, the lexical index ranks the one chunk holding the word first
        i = int(min(present)[1:])
        assert store.search(name, f"keyword{i}", k=1, mode="lexical")[0].doc_id == f"d{i}"


@pytest.mark.parametrize("factory", ["Flat", "IVF16,Flat"])
def test_reopen_after_close(store_factory, tmp_path, factory):
    s = store_factory(StoreSettings(snapshot_every_ops=2))
    s.create_collection("c", index_factory=factory)
    for i in range(0, 10, 2):
        s.ingest("c", [doc(i), doc(i + 1)])
    s.delete("c", ["d3", "d4"])
    s.ingest("c", [doc(5)])  # an upsert
    s.close()
    files = list((tmp_path / "data" / "collections" / "c").glob("index-*.faiss"))
    assert len(files) == 1
    s2 = store_factory()
    assert s2.describe("c").pending_ops == 0
    check_consistent(s2, "c", {f"d{i}" for i in range(10)} - {"d3", "d4"}, {"d3", "d4"})
    assert s2.list_collections()[0].index_factory == factory


@pytest.mark.parametrize("damage", ["corrupt", "missing", "truncated"])
def test_bad_index_file_triggers_rebuild(store_factory, tmp_path, caplog, damage):
    s = store_factory()
    s.create_collection("c", index_factory="HNSW32")
    s.ingest("c", [doc(i) for i in range(6)])
    s.delete("c", ["d2"])
    s.close()
    (path,) = (tmp_path / "data" / "collections" / "c").glob("index-*.faiss")
    raw = bytearray(path.read_bytes())
    if damage == "corrupt":
        raw[len(raw) // 3 : len(raw) // 3 + 64] = bytes(64)
        path.write_bytes(bytes(raw))
    elif damage == "truncated":
        path.write_bytes(bytes(raw[: len(raw) // 2]))
    else:
        path.unlink()
    with caplog.at_level(logging.INFO, logger="memlm.index.memory_store"):
        s2 = store_factory()
    assert "rebuilt from stored vectors" in caplog.text
    check_consistent(s2, "c", {"d0", "d1", "d3", "d4", "d5"}, {"d2"})
    s2.close()
    assert len(list((tmp_path / "data" / "collections" / "c").glob("index-*.faiss"))) == 1  # rewritten


CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from memlm.config import StoreSettings
    from memlm.index.memory_store import MemoryStore
    from memlm.index.types import Document

    def doc(i):
        return Document(f"d{i}", f"Record {i}: the {i}th entry mentions keyword{i} and unrelated filler text.", {"n": i})

    store = MemoryStore.open(Path(sys.argv[1]), StoreSettings(snapshot_every_ops=3))
    store.create_collection("c", index_factory="HNSW32")
    print("READY", flush=True)
    for call in range(1000):
        ids = [2 * call, 2 * call + 1]
        store.ingest("c", [doc(i) for i in ids])
        print("ACK", *[f"d{i}" for i in ids], flush=True)  # acknowledged: ingest returned
        if call % 3 == 2:
            victim = f"d{2 * (call - 1)}"
            print("DELETING", victim, flush=True)
            store.delete("c", [victim])
            print("DEL", victim, flush=True)
    """
)


def test_kill_9_mid_ingest_loses_nothing_acknowledged(tmp_path, tokenizer, embedder):
    data = tmp_path / "data"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env
    )
    acked: set[str] = set()
    deleting: set[str] = set()
    deleted: set[str] = set()

    def read(line: str) -> None:
        word, *ids = line.split() or [""]
        {"ACK": acked, "DELETING": deleting, "DEL": deleted}.get(word, set()).update(ids)

    try:
        deadline = time.monotonic() + 240
        assert proc.stdout is not None
        for line in proc.stdout:
            read(line)
            if len(acked) >= 24 or time.monotonic() > deadline:
                break
        os.kill(proc.pid, signal.SIGKILL)  # mid-way: the child is ingesting or deleting right now
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    # What the child printed between the last line read and the kill is still in the pipe: read it,
    # so that every acknowledgement and delete it made is known.
    for line in proc.stdout.read().splitlines():
        read(line)
    assert proc.returncode == -signal.SIGKILL
    assert len(acked) >= 24 and deleted

    store = MemoryStore.open(data, StoreSettings(), embedder=embedder, tokenizer=tokenizer)
    try:
        present = acked - deleting  # a delete in flight when killed may or may not have happened
        check_consistent(store, "c", present, deleted)
        st = store.describe("c")
        assert st.documents >= len(present)
        assert st.documents <= len(acked) - len(deleted) + 2  # at most one unacknowledged call on top
    finally:
        store.close()
