"""MemoryStore.list_documents (a scroll: id order, a cursor, the search's filters) and delete by
filter or of everything (one durable transaction, as a delete by id), with the real tokenizer and
MiniLM, real LMDB and FAISS files, a restart and a kill -9."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from memlm.config import StoreSettings
from memlm.errors import InvalidArgument, NotFound, Unavailable
from memlm.index.lmdb_store import LmdbStore
from memlm.index.memory_store import MemoryStore
from memlm.index.types import Condition, Document, Filter

from test_memory_store import DOCS  # tests/index is on sys.path (pytest rootdir-less imports)
from test_recovery import check_consistent, doc


def _ids(page) -> list[str]:
    return [d.id for d in page.documents]


def _list_all(store, name, limit, **kw) -> tuple[list[str], list[int]]:
    """(every id listed, the size of each page), following the cursor."""
    ids, sizes, after = [], [], None
    while True:
        page = store.list_documents(name, after=after, limit=limit, **kw)
        ids += _ids(page)
        sizes.append(len(page.documents))
        if page.next_after is None:
            return ids, sizes
        assert page.next_after == page.documents[-1].id
        after = page.next_after


@pytest.fixture
def store(store_factory):
    s = store_factory()
    s.create_collection("notes")
    s.ingest("notes", DOCS)
    return s


def test_pages_come_in_id_order_and_the_cursor_continues_strictly_after(store_factory):
    s = store_factory()
    s.create_collection("c")
    # Ingested out of order, with ids whose UTF-8 bytes order them as their code points do.
    ids = [f"doc-{i:02d}" for i in (13, 2, 20, 0, 7, 19, 1, 8, 14, 3, 9, 18, 4, 15, 10, 5, 16, 11, 6, 17, 12)]
    ids += ["Zebra", "apple", "äpfel", "éclair", "z", "日本"]
    s.ingest("c", [Document(i, f"text of {i}", {"n": n}) for n, i in enumerate(ids)])
    assert sorted(ids) == sorted(ids, key=lambda i: i.encode())  # what the test relies on

    listed, sizes = _list_all(s, "c", limit=9)
    assert listed == sorted(ids)
    assert sizes == [9, 9, 9]  # 27 documents: the third page is the last, no empty page after it
    listed, sizes = _list_all(s, "c", limit=5)
    assert listed == sorted(ids) and sizes == [5, 5, 5, 5, 5, 2]

    page = s.list_documents("c", after="doc-07x", limit=3)  # a cursor need not be a stored id
    assert _ids(page) == ["doc-08", "doc-09", "doc-10"] and page.next_after == "doc-10"
    assert _ids(s.list_documents("c", after="doc-08", limit=1)) == ["doc-09"]  # strictly after
    assert s.list_documents("c", after="日本").documents == []
    assert s.list_documents("c", after="日本").next_after is None


def test_listing_with_and_without_text(store):
    (cats,) = store.list_documents("notes", filter={"lang": "en", "tag": "pets"}).documents
    stored = store.get("notes", ["cats"])[0]
    assert (cats.id, cats.text, cats.metadata, cats.chunk_ids, cats.updated_at) == (
        "cats", DOCS[0].text, DOCS[0].metadata, stored.chunk_ids, stored.updated_at)
    bare = store.list_documents("notes", with_text=False)
    assert [d.text for d in bare.documents] == [""] * len(DOCS)
    assert [d.metadata for d in bare.documents] == [d.metadata for d in sorted(DOCS, key=lambda d: d.id)]
    assert all(d.chunk_ids for d in bare.documents)


FILTERS = [
    {"lang": "de"},
    {"tag": "pets"},  # a list-valued field holds it
    {"tag": ["code", "travel"]},  # any of
    {"year": 2020},  # 2020 == 2020.0
    {"year": True},  # True is not 1
    {"draft": True},
    {"lang": "en", "tag": "pets"},  # AND
    {"should": [{"key": "year", "equals": 1}, {"key": "lang", "equals": "de"}]},  # OR
    {"must_not": [{"key": "lang", "equals": "en"}]},  # NOT
    {"must": [{"key": "lang", "equals": "en"}], "should": [{"key": "year", "any_of": [2015, 1]}],
     "must_not": [{"key": "tag", "equals": "code"}]},
    Filter(must=(Condition("lang", any_of=("en", "de")),), must_not=(Condition("tag", equals="pets"),)),
    {"lang": "fr"},
]


@pytest.mark.parametrize("f", FILTERS, ids=[str(i) for i in range(len(FILTERS))])
def test_a_filter_lists_what_the_same_filter_searches(store, f):
    """Listing tests each document with memlm.index.filters.matches, a search selects chunks with the
    metadata index: the two agree on every filter form."""
    searched = sorted({h.doc_id for h in store.search("notes", "anything at all", k=50, filter=f, mode="dense")})
    listed, _ = _list_all(store, "notes", limit=2, filter=f)
    assert listed == searched


def test_bad_listing_arguments_are_invalid_and_name_the_field(store_factory):
    s = store_factory(StoreSettings(max_ids_per_call=10))
    s.create_collection("c")
    s.ingest("c", [doc(i) for i in range(12)])
    assert len(s.list_documents("c").documents) == 10  # the default page: 100, capped by max_ids_per_call
    for limit in (0, -1, 11, True, 2.5, "3"):
        with pytest.raises(InvalidArgument, match=r"limit must be an integer in \[1, 10\].*max_ids_per_call"):
            s.list_documents("c", limit=limit)
    for after in ("", 5, "x" * 300):
        with pytest.raises(InvalidArgument, match="after"):
            s.list_documents("c", after=after)
    with pytest.raises(InvalidArgument, match="unknown operator"):
        s.list_documents("c", filter={"n": {"gt": 3}})
    with pytest.raises(NotFound, match="'nope' does not exist"):
        s.list_documents("nope")


# ---------------------------------------------------------------- delete by filter


def test_delete_by_filter_removes_exactly_the_matches_everywhere(store_factory):
    s = store_factory()
    s.create_collection("c", memory={"knn": {}})  # a collection whose derived memory follows the change log
    heard = []
    s.add_write_listener(lambda name, memory, dropped=False: heard.append(name))
    s.ingest("c", [Document(f"d{i}", f"Record {i}: the {i}th entry mentions keyword{i}.", {"n": i, "odd": i % 2 == 1})
                   for i in range(8)])
    doomed = {d.id: d for d in s.list_documents("c", filter={"odd": True}).documents}
    before = s.last_seq("c")

    assert sorted(s.delete("c", filter={"odd": True})) == sorted(doomed) == ["d1", "d3", "d5", "d7"]
    assert heard == ["c", "c"]  # the ingest, then the delete: derived memory hears of it as of an id delete
    ((seq, added, removed),) = s.changes("c", before, s.last_seq("c"))  # ONE oplog entry
    assert seq == before + 1 and added == [] and sorted(removed) == sorted(c for d in doomed.values() for c in d.chunk_ids)
    check_consistent(s, "c", {"d0", "d2", "d4", "d6"}, set(doomed))  # no search mode finds them; index = LMDB
    assert _ids(s.list_documents("c")) == ["d0", "d2", "d4", "d6"]
    assert s.delete("c", filter={"odd": True}) == []  # nothing matches now: nothing written
    assert s.last_seq("c") == seq


def test_ids_with_a_filter_delete_the_ids_that_match(store):
    assert store.delete("notes", ["cats", "katzen", "rust", "unknown"], filter={"tag": "pets"}) == ["cats", "katzen"]
    assert _ids(store.list_documents("notes")) == ["paris", "rust", "volcano"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(filter={}), "filter is empty, which matches every document; pass all=True"),
    (dict(filter=Filter()), "filter is empty"),
    (dict(), "needs ids, a filter, or all=True"),
    (dict(all=True, filter={"lang": "en"}), "takes no ids or filter"),
    (dict(all=True, ids=["cats"]), "takes no ids or filter"),
    (dict(all=1), "all must be true or false"),
    (dict(filter={"lang": {"gt": 1}}), "unknown operator"),
])
def test_a_delete_that_says_too_little_or_contradicts_itself_deletes_nothing(store, kwargs, message):
    seq = store.last_seq("notes")
    with pytest.raises(InvalidArgument, match=message):
        store.delete("notes", **kwargs)
    assert len(store.list_documents("notes").documents) == len(DOCS) and store.last_seq("notes") == seq
    assert store.delete("notes", []) == []  # an explicit empty list of ids: nothing, as ever


def test_delete_all_empties_the_collection_and_keeps_it(store_factory):
    s = store_factory(StoreSettings(min_chunk_tokens=8))
    s.create_collection("c", chunk_tokens=8, index_factory="HNSW16")
    s.ingest("c", [doc(i) for i in range(5)])
    assert sorted(s.delete("c", all=True)) == [f"d{i}" for i in range(5)]
    st = s.describe("c")
    assert (st.documents, st.chunks, st.index_vectors) == (0, 0, 0)
    assert (st.config.chunk_tokens, st.config.index_factory) == (8, "HNSW16")
    assert s.search("c", "keyword1", k=5) == [] and s.list_documents("c").documents == []
    s.ingest("c", [doc(7)])
    check_consistent(s, "c", {"d7"}, {"d1"})
    assert s.delete("c", all=True) == ["d7"] and s.delete("c", all=True) == []


def test_a_delete_by_filter_that_fails_midway_deletes_nothing(store_factory, monkeypatch):
    s = store_factory()
    s.create_collection("c")
    s.ingest("c", [doc(i) for i in range(600)])
    real, calls = LmdbStore._delete_chunks, []

    def delete_chunks(txn, dbs, chunk_ids):
        calls.append(1)
        if len(calls) == 100:
            raise RuntimeError("injected failure inside the delete's transaction")
        if len(calls) == 400:
            s.stop_writes()  # SIGTERM's grace period ends inside the transaction
        real(txn, dbs, chunk_ids)

    monkeypatch.setattr(LmdbStore, "_delete_chunks", staticmethod(delete_chunks))
    with pytest.raises(RuntimeError, match="injected"):
        s.delete("c", filter={"n": list(range(300))})
    assert s.describe("c").documents == 600
    check_consistent(s, "c", {"d0", "d99", "d150", "d299"}, set())

    with pytest.raises(Unavailable, match="nothing from this call was stored"):
        s.delete("c", all=True)  # stopped after 300 of its 600 documents went inside the transaction
    assert len(calls) < 100 + 600, "the delete ran to its end"
    assert s.describe("c").documents == 600
    assert [d.id for d in s.get("c", ["d0", "d299", "d599"])] == ["d0", "d299", "d599"]


def test_a_delete_by_filter_survives_a_restart(store_factory):
    s = store_factory(StoreSettings(snapshot_every_ops=1000))  # the delete is in the oplog only
    s.create_collection("c")
    s.ingest("c", [doc(i) for i in range(10)])
    s.delete("c", filter={"n": [1, 2, 3]})
    s.close()
    s2 = store_factory()
    check_consistent(s2, "c", {f"d{i}" for i in range(10)} - {"d1", "d2", "d3"}, {"d1", "d2", "d3"})
    assert _ids(s2.list_documents("c", filter={"n": [1, 2, 3, 4]})) == ["d4"]


CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from memlm.config import StoreSettings
    from memlm.index.memory_store import MemoryStore
    from memlm.index.types import Document

    store = MemoryStore.open(Path(sys.argv[1]), StoreSettings(snapshot_every_ops=1000))
    store.create_collection("c")
    store.ingest("c", [Document(f"d{i}", f"Record {i}: the {i}th entry mentions keyword{i}.", {"n": i, "odd": i % 2})
                       for i in range(12)])
    print("DELETED", *sorted(store.delete("c", filter={"odd": 1})), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # right after the acknowledgement: no close, no snapshot
    """
)


def test_an_acknowledged_delete_by_filter_survives_kill_9(tmp_path, tokenizer, embedder):
    data = tmp_path / "data"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(data)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("DELETED")]
    deleted = set(line.split()[1:])
    assert deleted == {f"d{i}" for i in range(1, 12, 2)}
    store = MemoryStore.open(data, StoreSettings(), embedder=embedder, tokenizer=tokenizer)
    try:
        check_consistent(store, "c", {f"d{i}" for i in range(0, 12, 2)}, deleted)
        assert store.list_documents("c", filter={"odd": 1}).documents == []
    finally:
        store.close()
