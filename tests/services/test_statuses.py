"""Bad input over the wire gets the status that names it (never INTERNAL), messages stay bounded,
one request's cost is bounded by stated limits, CreateCollection says what it did, and re-ingesting
an unchanged document is reported as such and not rewritten.

One server of its own, started with small limits so each limit is cheap to reach.
"""
import math

import grpc
import numpy as np
import pytest
from google.protobuf import struct_pb2

from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc

pytestmark = pytest.mark.server


LIMITS_ENV = {
    "MEMLM_STORE__MAX_COLLECTIONS": "4",
    "MEMLM_STORE__MAX_QUERY_BYTES": "2000",
    "MEMLM_STORE__MAX_IDS_PER_CALL": "100",
    "MEMLM_STORE__MAX_FILTER_CONDITIONS": "8",
    "MEMLM_STORE__MAX_FILTER_VALUES": "20",
    "MEMLM_MODEL__MAX_CONTEXT_TOKENS": "1024",
    "MEMLM_MODEL__DEFAULT_MAX_NEW_TOKENS": "2",
}
DOCS = [
    pb.Document(id="volcano", text="Mount Zendor is a volcano that erupted in 1854 and buried the town of Kell."),
    pb.Document(id="bread", text="Sourdough bread rises because wild yeast ferments the flour."),
    pb.Document(id="orbit", text="The comet Ilvara returns to the inner solar system every 212 years."),
]
MESSAGE_CAP = 2000  # what the server quotes stays well under gRPC's 8 KiB metadata limit


@pytest.fixture(scope="module")
def limited(tmp_path_factory, bundled_model_dir):
    from memlm.services.process import ServerProcess, free_port

    proc = ServerProcess(tmp_path_factory.mktemp("limits-data"), env={**LIMITS_ENV, "MEMLM_SERVER__METRICS_PORT": str(free_port())})
    yield proc
    assert proc.terminate() == 0, proc.output


@pytest.fixture(scope="module")
def stubs(limited):
    with grpc.insecure_channel(limited.address) as channel:
        yield pb_grpc.MemoryStub(channel), pb_grpc.GenerationStub(channel)


@pytest.fixture()
def memory(stubs):
    return stubs[0]


@pytest.fixture()
def docs(memory, request):
    """A fresh collection named after the test, holding DOCS."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60]
    memory.CreateCollection(pb.CreateCollectionRequest(name=name), timeout=60)
    memory.Ingest(iter([pb.IngestRequest(collection=name, documents=DOCS)]), timeout=120)
    yield name
    memory.DropCollection(pb.DropCollectionRequest(collection=name), timeout=60)


def rpc_error(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=120)
    return info.value


def assert_status(err: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    assert err.code() == code, f"{err.code()}: {err.details()}"
    assert len(err.details()) <= MESSAGE_CAP, f"{len(err.details())}-character message"
    for w in words:
        assert w in err.details(), f"{w!r} not in {err.details()!r}"


def stored_ids(memory, collection) -> set[str]:
    info = memory.DescribeCollection(pb.DescribeCollectionRequest(collection=collection), timeout=30)
    assert info.index_vectors == info.chunks
    return {d.id for d in memory.Get(pb.GetRequest(collection=collection, ids=[d.id for d in DOCS]), timeout=30).documents} \
        if info.documents == len(DOCS) else set()


# --- item 6: the right status for bad input ----------------------------------------------------

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_metadata_is_invalid_and_stores_nothing(memory, docs, value):
    meta = struct_pb2.Struct()
    meta.fields["score"].number_value = value
    bad = pb.Document(id="bad", text="A document whose metadata holds a non-finite number.", metadata=meta)
    good = pb.Document(id="good", text="A good document in the same call.")
    err = rpc_error(memory.Ingest, iter([pb.IngestRequest(collection=docs, documents=[good, bad])]))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "'bad'", "'score'", "finite")
    assert memory.DescribeCollection(pb.DescribeCollectionRequest(collection=docs), timeout=30).documents == len(DOCS)
    # skip_invalid: the bad one is rejected on its own, the good one stored
    reply = memory.Ingest(iter([pb.IngestRequest(collection=docs, documents=[good, bad], skip_invalid=True)]), timeout=120)
    assert [(r.id, r.status, r.error_code) for r in reply.results] == [
        ("good", pb.DocumentResult.CREATED, ""), ("bad", pb.DocumentResult.REJECTED, "INVALID_ARGUMENT")]


@pytest.mark.parametrize("ids, words", [
    ([""], ["empty"]),
    (["volcano", ""], ["empty"]),
    (["x" * 300], ["256", "300"]),
    (["é" * 200], ["256", "400"]),  # 200 characters, 400 UTF-8 bytes
], ids=["empty", "empty-among-good", "too-long", "too-long-utf8"])
def test_bad_ids_on_get_and_delete_are_invalid(memory, docs, ids, words):
    for call, request in ((memory.Get, pb.GetRequest), (memory.Delete, pb.DeleteRequest)):
        assert_status(rpc_error(call, request(collection=docs, ids=ids)), grpc.StatusCode.INVALID_ARGUMENT, *words)
    assert stored_ids(memory, docs) == {d.id for d in DOCS}  # the failed Delete removed nothing


def test_collection_limit_is_resource_exhausted(memory):
    have = {c.name for c in memory.ListCollections(pb.ListCollectionsRequest(), timeout=30).collections}
    made = []
    try:
        for i in range(4 - len(have)):
            made.append(f"limit-{i}")
            memory.CreateCollection(pb.CreateCollectionRequest(name=made[-1]), timeout=60)
        err = rpc_error(memory.CreateCollection, pb.CreateCollectionRequest(name="one-too-many"))
        assert_status(err, grpc.StatusCode.RESOURCE_EXHAUSTED, "4", "store.max_collections")
        names = {c.name for c in memory.ListCollections(pb.ListCollectionsRequest(), timeout=30).collections}
        assert "one-too-many" not in names
    finally:
        for name in made:
            memory.DropCollection(pb.DropCollectionRequest(collection=name), timeout=60)


def _vector_search(memory, collection, values) -> pb.SearchResponse:
    return memory.Search(pb.SearchRequest(collection=collection, vector=pb.Vector(values=values), k=3), timeout=60)


@pytest.mark.parametrize("scale", [3e38, 1e-40], ids=["huge", "subnormal"])
def test_query_vector_is_normalised_without_overflow(memory, docs, scale):
    direction = np.random.default_rng(0).standard_normal(384).astype(np.float32)
    direction /= np.abs(direction).max()
    want = _vector_search(memory, docs, direction.tolist())
    got = _vector_search(memory, docs, (direction * np.float32(scale)).tolist())
    assert [h.document_id for h in got.hits] == [h.document_id for h in want.hits]
    assert [h.score for h in got.hits] == pytest.approx([h.score for h in want.hits], abs=1e-5)
    assert any(abs(h.score) > 1e-3 for h in got.hits)  # a real direction, not a zero vector
    err = rpc_error(memory.Search, pb.SearchRequest(collection=docs, vector=pb.Vector(values=[0.0] * 384), k=3))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "all zeros")


def _cond(key, value=None, any_of=None) -> pb.Condition:
    c = pb.Condition(key=key)
    if any_of is not None:
        for v in any_of:
            c.any_of.values.add().number_value = v
    else:
        c.equals.number_value = value
    return c


@pytest.mark.parametrize("condition", [
    _cond("year", math.inf), _cond("year", -math.inf), _cond("year", 1e300), _cond("year", 2.0**63),
    _cond("year", any_of=[1854, 1e308]),
], ids=["inf", "-inf", "1e300", "2-pow-63", "any-of-huge"])
def test_odd_filter_values_never_answer_internal(memory, docs, condition):
    request = pb.SearchRequest(collection=docs, text="volcano", k=3, filter=pb.Filter(must=[condition]))
    try:
        reply = memory.Search(request, timeout=60)
    except grpc.RpcError as err:
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT)
    else:
        assert list(reply.hits) == []  # no document has such a year


# --- item 7: bounded messages --------------------------------------------------------------------

def test_get_of_many_missing_ids_names_a_few(memory, docs):
    missing = [f"missing-document-{i:03d}-" + "x" * 180 for i in range(99)]  # ~20 kB of ids
    err = rpc_error(memory.Get, pb.GetRequest(collection=docs, ids=["volcano", *missing]))
    assert_status(err, grpc.StatusCode.NOT_FOUND, "99 of the ids", "'missing-document-000-xx", "and 94 more")


def test_long_collection_name_is_quoted_cut(memory):
    name = "n" * 15_000
    err = rpc_error(memory.CreateCollection, pb.CreateCollectionRequest(name=name))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "15000 characters", "1-64")
    err = rpc_error(memory.Search, pb.SearchRequest(collection=name, text="x", k=1))
    assert_status(err, grpc.StatusCode.NOT_FOUND, "15000 characters")


# --- item 8: bounded cost ------------------------------------------------------------------------

@pytest.mark.parametrize("chunk_tokens, words", [
    (1, ["16", "store.min_chunk_tokens"]),
    (15, ["16", "store.min_chunk_tokens"]),
    (4294967295, ["2048", "store.max_chunk_tokens"]),
], ids=["1", "15", "uint32-max"])
def test_chunk_size_range(memory, chunk_tokens, words):
    err = rpc_error(memory.CreateCollection, pb.CreateCollectionRequest(name="chunky", chunk_tokens=chunk_tokens))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "chunk_tokens", *words)
    assert "chunky" not in {c.name for c in memory.ListCollections(pb.ListCollectionsRequest(), timeout=30).collections}


def test_query_size_limit_applies_to_search_and_generate(stubs, docs):
    memory, generation = stubs
    long_query = "volcano " * 300  # 2400 bytes
    err = rpc_error(memory.Search, pb.SearchRequest(collection=docs, text=long_query, k=3))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "2400", "2000", "store.max_query_bytes")
    request = pb.GenerateRequest(prompt=long_query, collection=docs, memory=pb.MEMORY_MODE_RAG, max_new_tokens=1)
    err = rpc_error(lambda r, timeout: list(generation.Generate(r, timeout=timeout)), request)
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "2400", "store.max_query_bytes")
    assert len(memory.Search(pb.SearchRequest(collection=docs, text="volcano " * 250, k=3), timeout=60).hits) > 0


def test_filter_size_limits(memory, docs):
    many = pb.Filter(must=[_cond(f"k{i}", 1) for i in range(9)])
    err = rpc_error(memory.Search, pb.SearchRequest(collection=docs, text="volcano", k=3, filter=many))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "9", "8", "store.max_filter_conditions")
    wide = pb.Filter(must=[_cond("year", any_of=range(21))])
    err = rpc_error(memory.Search, pb.SearchRequest(collection=docs, text="volcano", k=3, filter=wide))
    assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "21", "20", "store.max_filter_values")


def test_ids_per_call_limit(memory, docs):
    ids = [f"id-{i}" for i in range(101)]
    for call, request in ((memory.Get, pb.GetRequest), (memory.Delete, pb.DeleteRequest)):
        err = rpc_error(call, request(collection=docs, ids=ids))
        assert_status(err, grpc.StatusCode.INVALID_ARGUMENT, "101", "100", "store.max_ids_per_call")


def test_list_documents_statuses(memory, docs):
    listed = memory.ListDocuments(pb.ListDocumentsRequest(collection=docs), timeout=30)  # limit 0: the default page
    assert [d.id for d in listed.documents] == sorted(d.id for d in DOCS) and listed.next_after == ""
    assert all(d.text == "" and d.chunk_ids for d in listed.documents)  # with_text unset: ids and metadata
    page = memory.ListDocuments(pb.ListDocumentsRequest(collection=docs, limit=1, with_text=True), timeout=30)
    assert [d.id for d in page.documents] == ["bread"] and page.next_after == "bread" and page.documents[0].text
    assert_status(rpc_error(memory.ListDocuments, pb.ListDocumentsRequest(collection="no-such")),
                  grpc.StatusCode.NOT_FOUND, "no-such")
    assert_status(rpc_error(memory.ListDocuments, pb.ListDocumentsRequest(collection=docs, limit=101)),
                  grpc.StatusCode.INVALID_ARGUMENT, "limit", "101", "[1, 100]", "store.max_ids_per_call")
    assert_status(rpc_error(memory.ListDocuments, pb.ListDocumentsRequest(collection=docs, after="x" * 300)),
                  grpc.StatusCode.INVALID_ARGUMENT, "after", "300")
    no_key = pb.Filter(must=[pb.Condition(equals=struct_pb2.Value(string_value="en"))])
    assert_status(rpc_error(memory.ListDocuments, pb.ListDocumentsRequest(collection=docs, filter=no_key)),
                  grpc.StatusCode.INVALID_ARGUMENT, "filter.must[0].key")
    many = pb.Filter(must=[_cond(f"k{i}", 1) for i in range(9)])
    assert_status(rpc_error(memory.ListDocuments, pb.ListDocumentsRequest(collection=docs, filter=many)),
                  grpc.StatusCode.INVALID_ARGUMENT, "9", "8", "store.max_filter_conditions")


def test_delete_by_filter_statuses_and_what_is_refused(memory, docs):
    everything = {d.id for d in DOCS}
    empty = pb.DeleteRequest(collection=docs, filter=pb.Filter())  # set, but matching every document
    assert_status(rpc_error(memory.Delete, empty), grpc.StatusCode.INVALID_ARGUMENT, "filter is empty", "all")
    for request in (pb.DeleteRequest(collection=docs, all=True, ids=["bread"]),
                    pb.DeleteRequest(collection=docs, all=True, filter=pb.Filter(must=[_cond("year", 1854)]))):
        assert_status(rpc_error(memory.Delete, request), grpc.StatusCode.INVALID_ARGUMENT, "all", "no ids or filter")
    no_key = pb.Filter(must=[pb.Condition(equals=struct_pb2.Value(string_value="en"))])
    assert_status(rpc_error(memory.Delete, pb.DeleteRequest(collection=docs, filter=no_key)),
                  grpc.StatusCode.INVALID_ARGUMENT, "filter.must[0].key")
    assert_status(rpc_error(memory.Delete, pb.DeleteRequest(collection="no-such", all=True)),
                  grpc.StatusCode.NOT_FOUND, "no-such")
    assert stored_ids(memory, docs) == everything  # none of the refused calls deleted anything
    nothing = memory.Delete(pb.DeleteRequest(collection=docs), timeout=30)  # neither ids, filter nor all
    assert list(nothing.deleted) == [] and stored_ids(memory, docs) == everything

    ingest = [pb.Document(id=f"tagged-{i}", text=f"note {i}", metadata=struct_pb2.Struct(
        fields={"n": struct_pb2.Value(number_value=i)})) for i in range(3)]
    memory.Ingest(iter([pb.IngestRequest(collection=docs, documents=ingest)]), timeout=120)
    both = memory.Delete(pb.DeleteRequest(collection=docs, ids=["tagged-0", "tagged-1", "volcano"],
                                          filter=pb.Filter(should=[_cond("n", 0), _cond("n", 2)])), timeout=30)
    assert list(both.deleted) == ["tagged-0"] and list(both.not_found) == ["tagged-1", "volcano"]
    by_filter = memory.Delete(pb.DeleteRequest(collection=docs, filter=pb.Filter(must=[_cond("n", any_of=[1, 2])])),
                              timeout=30)
    assert sorted(by_filter.deleted) == ["tagged-1", "tagged-2"] and not by_filter.not_found
    assert stored_ids(memory, docs) == everything
    gone = memory.Delete(pb.DeleteRequest(collection=docs, all=True), timeout=30)
    assert sorted(gone.deleted) == sorted(everything)
    info = memory.DescribeCollection(pb.DescribeCollectionRequest(collection=docs), timeout=30)
    assert (info.documents, info.chunks, info.index_vectors) == (0, 0, 0)


# --- item 9: CreateCollection says what it did -----------------------------------------------

def test_create_collection_semantics(memory):
    create = lambda **kw: memory.CreateCollection(pb.CreateCollectionRequest(name="made", **kw), timeout=60)  # noqa: E731
    first = create(index_factory="HNSW32", chunk_tokens=32)
    assert first.created and first.config.index_factory == "HNSW32"
    try:
        # the same request again, without if_not_exists: it exists
        assert_status(rpc_error(memory.CreateCollection, pb.CreateCollectionRequest(name="made", index_factory="HNSW32", chunk_tokens=32)),
                      grpc.StatusCode.ALREADY_EXISTS, "'made'", "if_not_exists")
        # if_not_exists with nothing given, or with the same settings: the existing one, created=False
        for kw in ({}, {"index_factory": "HNSW32"}, {"chunk_tokens": 32, "kv_memory": False}):
            again = create(if_not_exists=True, **kw)
            assert not again.created and again.config == first.config
        # if_not_exists with a setting that differs: say so, naming it
        assert_status(rpc_error(memory.CreateCollection, pb.CreateCollectionRequest(name="made", kv_memory=True, if_not_exists=True)),
                      grpc.StatusCode.ALREADY_EXISTS, "memory 'knn' is off")
        asked_knn = pb.CreateCollectionRequest(name="made", if_not_exists=True, memory=[pb.MemoryOptions(mode="knn")])
        assert_status(rpc_error(memory.CreateCollection, asked_knn), grpc.StatusCode.ALREADY_EXISTS, "memory 'knn' is off")
        err = rpc_error(memory.CreateCollection, pb.CreateCollectionRequest(
            name="made", index_factory="Flat", chunk_overlap=4, if_not_exists=True))
        assert_status(err, grpc.StatusCode.ALREADY_EXISTS, "index_factory", "'HNSW32'", "'Flat'", "chunk_overlap")
    finally:
        memory.DropCollection(pb.DropCollectionRequest(collection="made"), timeout=60)


def test_client_create_collection_sends_only_what_is_given(limited):
    import memlm
    from memlm.errors import AlreadyExists

    with memlm.Client(limited.address, timeout=60) as client:
        client.create_collection("given", kv_memory=True)
        try:
            assert client.create_collection("given", if_not_exists=True).kv_memory  # kv_memory=None: not given
            assert client.create_collection("given", memory=["knn"], if_not_exists=True).memory["knn"]["window"] == 1024
            with pytest.raises(AlreadyExists, match="memory 'knn' is on"):
                client.create_collection("given", kv_memory=False, if_not_exists=True)
            with pytest.raises(AlreadyExists, match=r"memory.knn.window=1024 \(asked 512\)"):
                client.create_collection("given", memory={"knn": {"window": 512}}, if_not_exists=True)
        finally:
            client.drop_collection("given")


# --- item 16 (part): unchanged re-ingest ----------------------------------------------------

def test_unchanged_documents_are_not_rewritten(limited, memory, docs):
    import memlm

    before = {d.id: d for d in memory.Get(pb.GetRequest(collection=docs, ids=[d.id for d in DOCS]), timeout=30).documents}
    changed = pb.Document(id="orbit", text=DOCS[2].text, metadata=struct_pb2.Struct(fields={"v": struct_pb2.Value(number_value=2)}))
    reply = memory.Ingest(iter([pb.IngestRequest(collection=docs, documents=[DOCS[0], DOCS[1], changed])]), timeout=120)
    assert [r.status for r in reply.results] == [pb.DocumentResult.UNCHANGED] * 2 + [pb.DocumentResult.REPLACED]
    assert (reply.unchanged, reply.replaced, reply.created) == (2, 1, 0)
    after = {d.id: d for d in memory.Get(pb.GetRequest(collection=docs, ids=[d.id for d in DOCS]), timeout=30).documents}
    for doc_id in ("volcano", "bread"):  # same chunks, same timestamp: not re-embedded, not rewritten
        assert list(after[doc_id].chunk_ids) == list(before[doc_id].chunk_ids) == list(reply.results[
            ["volcano", "bread"].index(doc_id)].chunk_ids)
        assert after[doc_id].updated_at == before[doc_id].updated_at
    assert not set(after["orbit"].chunk_ids) & set(before["orbit"].chunk_ids)
    with memlm.Client(limited.address, timeout=60) as client:
        report = client.ingest([{"id": "orbit", "text": DOCS[2].text, "metadata": {"v": 2}}], collection=docs)
        assert (report.unchanged, report.replaced, report.results[0].status) == (1, 0, "unchanged")
        # a boolean is not the number 1: a metadata type change is a change
        client.ingest([{"id": "t", "text": "typed", "metadata": {"flag": 1}}], collection=docs)
        assert client.ingest([{"id": "t", "text": "typed", "metadata": {"flag": True}}], collection=docs).replaced == 1


# --- the store read by a model host in another process ---------------------------------------

def test_derived_memory_rpcs_read_chunks_changes_and_watermarks(memory, docs):
    ids = sorted(memory.ListChunkIds(pb.ListChunkIdsRequest(collection=docs), timeout=30).chunk_ids)
    assert len(ids) >= len(DOCS)
    chunks = memory.ReadChunks(pb.ReadChunksRequest(collection=docs, chunk_ids=ids), timeout=30).chunks
    assert [c.chunk_id for c in chunks] == ids and all(c.found and c.token_ids and c.text for c in chunks)
    assert {c.doc_id for c in chunks} == {d.id for d in DOCS}
    page = memory.ListChunkIds(pb.ListChunkIdsRequest(collection=docs, after_chunk_id=ids[0], after_set=True, limit=1), timeout=30)
    assert list(page.chunk_ids) == ids[1:2]

    missing = max(ids) + 1000
    assert_status(rpc_error(memory.ReadChunks, pb.ReadChunksRequest(collection=docs, chunk_ids=[missing])),
                  grpc.StatusCode.NOT_FOUND, str(missing))
    soft = memory.ReadChunks(pb.ReadChunksRequest(collection=docs, chunk_ids=[missing], missing_ok=True), timeout=30)
    assert [c.found for c in soft.chunks] == [False]
    assert_status(rpc_error(memory.ReadChunks, pb.ReadChunksRequest(collection=docs, chunk_ids=list(range(10_001)))),
                  grpc.StatusCode.INVALID_ARGUMENT, "10001", "10000")
    assert_status(rpc_error(memory.ReadChanges, pb.ReadChangesRequest(collection="no-such", limit=1)),
                  grpc.StatusCode.NOT_FOUND, "no-such")

    head = memory.ReadChanges(pb.ReadChangesRequest(collection=docs), timeout=30)
    assert head.last_seq == 1 and not head.changes  # limit 0: the head only
    log = memory.ReadChanges(pb.ReadChangesRequest(collection=docs, after_seq=0, limit=10), timeout=30)
    assert [c.seq for c in log.changes] == [1] and sorted(log.changes[0].added) == ids and not log.truncated
    assert_status(rpc_error(memory.SetWatermark, pb.SetWatermarkRequest(collection=docs, seq=1)),
                  grpc.StatusCode.INVALID_ARGUMENT, "memory mode")
    memory.SetWatermark(pb.SetWatermarkRequest(collection=docs, mode="knn", seq=1), timeout=30)
