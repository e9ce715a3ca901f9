"""MemoryStore end to end with the real tokenizer, real MiniLM, real LMDB and FAISS files."""
from __future__ import annotations

import concurrent.futures as cf

import numpy as np
import pytest

from memlm.config import StoreSettings
from memlm.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from memlm.index.memory_store import MemoryStore
from memlm.index.types import Condition, Document, Filter

DOCS = [
    Document("cats", "Cats are small domesticated felines that purr and chase mice.", {"lang": "en", "tag": ["pets", "animals"], "year": 2020}),
    Document("rust", "Rust is a systems programming language focused on memory safety without garbage collection.", {"lang": "en", "tag": ["code"], "year": 2015}),
    Document("paris", "Paris is the capital of France, famous for the Eiffel Tower.", {"lang": "en", "tag": ["travel"], "year": 2020.0}),
    Document("katzen", "Katzen sind kleine Haustiere, die schnurren und Mäuse jagen.", {"lang": "de", "tag": ["pets"], "draft": True}),
    Document("volcano", "Volcanoes erupt molten lava and ash from the Earth's mantle.", {"lang": "en", "year": 1}),
]


@pytest.fixture
def store(store_factory):
    s = store_factory()
    s.create_collection("notes")
    s.ingest("notes", DOCS)
    return s


def test_create_list_describe_drop(store_factory, tmp_path):
    s = store_factory()
    cfg = s.create_collection("a", index_factory="HNSW32", chunk_tokens=16, chunk_overlap=4)
    assert (cfg.name, cfg.dim, cfg.index_factory, cfg.chunk_tokens, cfg.chunk_overlap) == ("a", 384, "HNSW32", 16, 4)
    with pytest.raises(AlreadyExists, match="'a' already exists; pass if_not_exists"):
        s.create_collection("a", index_factory="HNSW32", chunk_tokens=16, chunk_overlap=4)
    assert s.ensure_collection("a", index_factory="HNSW32", chunk_tokens=16, chunk_overlap=4) == (cfg, False)
    assert s.ensure_collection("a") == (cfg, False)  # nothing given: nothing to differ
    with pytest.raises(AlreadyExists, match="index_factory='HNSW32' \\(asked 'Flat'\\)"):
        s.ensure_collection("a", index_factory="Flat", chunk_tokens=16, chunk_overlap=4)
    s.create_collection("b")
    assert [c.name for c in s.list_collections()] == ["a", "b"]
    st = s.describe("a")
    assert (st.documents, st.chunks, st.index_vectors, st.index_trained) == (0, 0, 0, True)
    s.ingest("a", DOCS[:2])
    st = s.stats("a")
    assert st.documents == 2 and st.chunks == st.index_vectors >= 2 and st.pending_ops == 1 and st.disk_bytes > 0
    s.drop("a")
    assert [c.name for c in s.list_collections()] == ["b"]
    assert not (tmp_path / "data" / "collections" / "a").exists()
    for call in (lambda: s.describe("a"), lambda: s.drop("a"), lambda: s.search("a", "x"), lambda: s.ingest("a", DOCS)):
        with pytest.raises(NotFound, match="'a'"):
            call()
    s.create_collection("a")  # the name is free again, and empty
    assert s.describe("a").documents == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(name="bad/name"), "invalid collection name 'bad/name'"),
        (dict(name=".."), "invalid collection name"),
        (dict(name="x" * 65), "1-64 characters"),
        (dict(name="ok", index_factory="IVFx,Flat"), "'IVFx,Flat'"),
        (dict(name="ok", embedding_model="bert-huge"), "all-MiniLM-L6-v2"),
        (dict(name="ok", chunk_tokens=0), "chunk_tokens"),
        (dict(name="ok", chunk_tokens=16, chunk_overlap=16), "chunk_overlap"),
    ],
)
def test_create_collection_validation(store_factory, kwargs, message):
    s = store_factory()
    name = kwargs.pop("name")
    with pytest.raises(InvalidArgument, match=message):
        s.create_collection(name, **kwargs)


def test_ingest_then_search_finds_the_right_doc(store):
    hits = store.search("notes", "which animal purrs?", k=3, mode="dense")
    assert hits[0].doc_id == "cats"
    assert hits[0].score > hits[-1].score and -1.0 <= hits[-1].score <= 1.0 + 1e-5
    assert hits[0].metadata["tag"] == ["pets", "animals"] and hits[0].chunk_index == 0
    assert hits[0].text == DOCS[0].text[hits[0].start : hits[0].end]
    assert store.search("notes", "memory-safe programming language", k=1)[0].doc_id == "rust"
    # a raw vector is searched the same way (normalised first)
    from memlm.index.embedding import load_embedder

    v = load_embedder("all-MiniLM-L6-v2").embed(["Eiffel Tower"])[0] * 3.0
    assert store.search("notes", vector=v, k=1)[0].doc_id == "paris"


CODES = [
    Document("order-a", "Order XK-4471 shipped from the northern warehouse on Monday.", {"region": "north"}),
    Document("order-b", "Order QZ-9020 shipped from the southern warehouse on Tuesday.", {"region": "south"}),
    Document("policy", "Orders ship from the warehouse nearest the customer, usually within two days.", {"region": "all"}),
    Document("returns", "Returned parcels go back to the warehouse they shipped from.", {"region": "all"}),
]


def test_search_modes(store_factory):
    s = store_factory()
    s.create_collection("orders")
    s.ingest("orders", CODES)
    # lexical: only the chunk holding the rare code word matches it; BM25 scores, best first
    hits = s.search("orders", "where did QZ-9020 ship from?", k=4, mode="lexical")
    assert hits[0].doc_id == "order-b" and hits[0].score > hits[-1].score > 0
    assert [h.doc_id for h in s.search("orders", "XK 4471", k=4, mode="lexical")] == ["order-a"]
    assert s.search("orders", "zebra", k=4, mode="lexical") == []  # no shared word: nothing
    # hybrid: the code's chunk first; every chunk either ranking found, "absolute" scores in [0, 1]
    hybrid = s.search("orders", "where did QZ-9020 ship from?", k=4, mode="hybrid")
    assert hybrid[0].doc_id == "order-b" and len(hybrid) == 4
    assert 1 >= hybrid[0].score > hybrid[1].score and all(h.score >= 0 for h in hybrid)
    assert s.search("orders", "where did QZ-9020 ship from?", k=4) == hybrid  # the default (store.search_mode)
    # filters apply to every mode, through both of the lexical index's filter paths
    for mode in ("dense", "lexical", "hybrid"):
        got = s.search("orders", "QZ-9020 warehouse", k=4, mode=mode, filter={"region": "north"})
        assert [h.doc_id for h in got] == ["order-a"], mode
    # delete and upsert reach the lexical index
    s.delete("orders", ["order-b"])
    assert s.search("orders", "QZ-9020", k=4, mode="lexical") == []
    s.ingest("orders", [Document("order-a", "Order ZZ-1 was cancelled.", {"region": "north"})])
    assert s.search("orders", "XK-4471", k=4, mode="lexical") == []
    assert s.search("orders", "cancelled", k=1, mode="lexical")[0].doc_id == "order-a"


def test_following_chunks(store_factory):
    s = store_factory(StoreSettings(min_chunk_tokens=8))  # small chunks: many per document
    s.create_collection("c", chunk_tokens=8)
    long_text = " ".join(f"Sentence number {i} talks about astronomy and telescopes." for i in range(6))
    (r,) = s.ingest("c", [Document("d", long_text), Document("e", "short one")])[:1]
    ids = list(r.chunk_ids)
    assert s.following_chunks("c", ids[0], 2) == ids[1:3]
    assert s.following_chunks("c", ids[-2], 5) == ids[-1:]  # the document's end
    assert s.following_chunks("c", ids[-1], 1) == [] and s.following_chunks("c", ids[0], 0) == []
    s.delete("c", ["d"])
    assert s.following_chunks("c", ids[0], 2) == []  # gone since it was found
    with pytest.raises(NotFound):
        s.following_chunks("nope", 1, 1)


def test_search_mode_setting_and_errors(store_factory, embedder):
    s = store_factory(StoreSettings(search_mode="dense"))
    s.create_collection("orders")
    s.ingest("orders", CODES)
    dense = s.search("orders", "parcel returns", k=2)
    assert dense == s.search("orders", "parcel returns", k=2, mode="dense") and -1 <= dense[-1].score <= 1
    v = embedder.embed(["parcel returns"])[0]
    assert [h.doc_id for h in s.search("orders", vector=v, k=2)] == [h.doc_id for h in dense]
    with pytest.raises(InvalidArgument, match="unknown search mode 'bm25'; expected one of dense, lexical, hybrid"):
        s.search("orders", "x", mode="bm25")
    with pytest.raises(InvalidArgument, match="'hybrid' needs a text query"):
        s.search("orders", vector=v, mode="hybrid")


def test_results_per_doc_and_get(store):
    docs = store.get("notes", ["paris", "cats"])
    assert [d.id for d in docs] == ["paris", "cats"]
    assert docs[0].text == DOCS[2].text and docs[0].metadata == DOCS[2].metadata and docs[0].updated_at > 0
    with pytest.raises(NotFound, match=r"\['nope', 'nada'\]"):
        store.get("notes", ["cats", "nope", "nada"])


def test_upsert_replaces_chunks(store_factory):
    s = store_factory(StoreSettings(min_chunk_tokens=8))  # small chunks: many per document
    s.create_collection("c", chunk_tokens=8)
    long_text = " ".join(f"Sentence number {i} talks about astronomy and telescopes." for i in range(10))
    (r,) = s.ingest("c", [Document("d", long_text, {"v": 1})])
    assert r.status == "created" and r.chunks == len(r.chunk_ids) > 5
    (r2,) = s.ingest("c", [Document("d", "A short note about baking bread.", {"v": 2})])
    assert r2.status == "replaced" and r2.chunks == len(r2.chunk_ids)
    assert not set(r.chunk_ids) & set(r2.chunk_ids)  # ids never reused
    st = s.describe("c")
    assert st.documents == 1 and st.chunks == st.index_vectors == r2.chunks
    hits = s.search("c", "astronomy telescopes", k=10)
    assert {h.chunk_id for h in hits} == set(r2.chunk_ids)
    assert s.search("c", "bread", k=1, filter=Filter(must=(Condition("v", equals=1),))) == []
    assert s.get("c", ["d"])[0].metadata == {"v": 2}


def test_delete_removes_everywhere(store):
    assert store.delete("notes", ["cats", "unknown", "cats"]) == ["cats"]
    assert store.delete("notes", ["cats"]) == []
    with pytest.raises(NotFound):
        store.get("notes", ["cats"])
    assert all(h.doc_id != "cats" for h in store.search("notes", "which animal purrs?", k=10))
    assert store.search("notes", "purr", k=5, filter={"tag": "animals"}) == []
    st = store.describe("notes")
    assert st.documents == 4 and st.chunks == st.index_vectors


def test_filters_are_exact(store):
    def ids(**kw):
        return sorted({h.doc_id for h in store.search("notes", "anything at all", k=50, **kw)})

    assert ids() == ["cats", "katzen", "paris", "rust", "volcano"]
    assert ids(filter={"lang": "de"}) == ["katzen"]
    assert ids(filter={"tag": "pets"}) == ["cats", "katzen"]
    assert ids(filter={"tag": ["code", "travel"]}) == ["paris", "rust"]
    assert ids(filter={"year": 2020}) == ["cats", "paris"]  # 2020 == 2020.0
    assert ids(filter={"year": True}) == []  # True is not 1
    assert ids(filter={"draft": True}) == ["katzen"]
    assert ids(filter={"must_not": [{"key": "lang", "equals": "en"}]}) == ["katzen"]
    assert ids(filter=Filter(should=(Condition("year", equals=1), Condition("lang", equals="de")))) == ["katzen", "volcano"]
    assert ids(filter={"lang": "fr"}) == []


def test_filters_exact_through_the_approximate_path(store_factory):
    # exact_filter_below=1 sends every filtered search through FAISS with an IDSelector.
    s = store_factory(StoreSettings(exact_filter_below=1))
    s.create_collection("h", index_factory="HNSW32")
    s.ingest("h", DOCS)
    assert {h.doc_id for h in s.search("h", "pets", k=10, filter={"tag": "pets"})} == {"cats", "katzen"}


@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(query="x", vector=np.ones(384)), InvalidArgument, "both"),
        (dict(), InvalidArgument, "neither"),
        (dict(vector=np.ones(5)), InvalidArgument, "384 values"),
        (dict(vector=np.full(384, np.nan)), InvalidArgument, "NaN"),
        (dict(vector=np.zeros(384)), InvalidArgument, "all zeros"),
        (dict(query="x", k=0), InvalidArgument, r"\[1, 1000\]"),
        (dict(query="x", k=1001), InvalidArgument, "1000"),
        (dict(query="x", filter={"lang": {"bad": 1}}), InvalidArgument, "unknown operator"),
        (dict(query="   "), InvalidArgument, "non-empty"),
    ],
)
def test_search_validation(store, kwargs, exc, message):
    with pytest.raises(exc, match=message):
        store.search("notes", **kwargs)


@pytest.mark.parametrize(
    "doc, exc, message",
    [
        (Document("", "text"), InvalidArgument, "non-empty string"),
        (Document("e", "   \n"), InvalidArgument, "'e' has empty text"),
        (Document("big", "x" * 101), ResourceExhausted, r"'big' is 101 bytes .* limit is 100"),
        (Document("m", "t", {"k": {"nested": 1}}), InvalidArgument, "'m': metadata 'k'"),
        (Document("m", "t", {"k": [[1]]}), InvalidArgument, "list elements"),
        (Document("m", "t", {"k": float("nan")}), InvalidArgument, "finite"),
        (Document("m", "t", {1: "x"}), InvalidArgument, "keys must be non-empty strings"),
    ],
)
def test_ingest_validation_is_atomic(store_factory, doc, exc, message):
    s = store_factory(StoreSettings(max_document_bytes=100))
    s.create_collection("v")
    with pytest.raises(exc, match=message):
        s.ingest("v", [Document("fine", "perfectly fine text"), doc])
    st = s.describe("v")
    assert (st.documents, st.chunks, st.index_vectors) == (0, 0, 0)  # nothing from the call stored
    with pytest.raises(NotFound):
        s.get("v", ["fine"])


def test_duplicate_ids_and_skip_invalid(store_factory):
    s = store_factory(StoreSettings(max_document_bytes=100))
    s.create_collection("v")
    with pytest.raises(InvalidArgument, match="'a' appears more than once"):
        s.ingest("v", [Document("a", "one"), Document("a", "two")])
    results = s.ingest(
        "v",
        [Document("a", "one"), Document("a", "two"), Document("b", ""), Document("c", "y" * 200), Document("d", "four")],
        skip_invalid=True,
    )
    assert [(r.id, r.status, r.error_code) for r in results] == [
        ("a", "created", ""),
        ("a", "rejected", "INVALID_ARGUMENT"),
        ("b", "rejected", "INVALID_ARGUMENT"),
        ("c", "rejected", "RESOURCE_EXHAUSTED"),
        ("d", "created", ""),
    ]
    assert "200 bytes" in results[3].message
    assert [d.text for d in s.get("v", ["a", "d"])] == ["one", "four"]
    assert s.describe("v").documents == 2


def test_call_size_limit(store_factory):
    s = store_factory(StoreSettings(max_ingest_call_bytes=10))
    s.create_collection("v")
    with pytest.raises(ResourceExhausted, match="max_ingest_call_bytes"):
        s.ingest("v", [Document("a", "123456"), Document("b", "123456")])


def test_second_open_of_the_same_dir_fails(store_factory, tmp_path):
    store_factory()
    with pytest.raises(FailedPrecondition, match="already open"):
        store_factory()


def test_concurrent_ingest_and_search(store_factory):
    s = store_factory(StoreSettings(snapshot_every_ops=3))
    s.create_collection("c", index_factory="HNSW32")
    s.ingest("c", DOCS)

    def work(i):
        s.ingest("c", [Document(f"n{i}", f"Note {i} about volcanoes and lava flows number {i}.", {"i": i})])
        return s.search("c", "lava", k=3, filter={"i": i})

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(work, range(12)))
    assert all(r[0].doc_id == f"n{i}" for i, r in enumerate(results))
    st = s.describe("c")
    assert st.documents == 17 and st.chunks == st.index_vectors and st.pending_ops < 3
