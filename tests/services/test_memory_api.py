"""The Memory service end to end: the real server on a loopback port, the real client."""
import math
import time

import grpc
import numpy as np
import pytest

from memlm.errors import AlreadyExists, InvalidArgument, NotFound, ResourceExhausted
from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc

pytestmark = pytest.mark.server

DOCS = [
    {"id": "volcano", "text": "Mount Zendor is a volcano that erupted in 1854 and buried the town of Kell in ash.",
     "metadata": {"topic": "geology", "lang": "en", "year": 1854, "tags": ["volcano", "history"]}},
    {"id": "bread", "text": "Sourdough bread rises because wild yeast and lactobacilli ferment the flour.",
     "metadata": {"topic": "cooking", "lang": "en", "year": 2020, "tags": ["food"]}},
    {"id": "orbit", "text": "The comet Ilvara returns to the inner solar system every 212 years.",
     "metadata": {"topic": "astronomy", "lang": "en", "year": 1990, "tags": ["space", "history"]}},
    {"id": "brot", "text": "Sauerteigbrot geht auf, weil wilde Hefen das Mehl fermentieren.",
     "metadata": {"topic": "cooking", "lang": "de", "year": 2020, "verified": True}},
]


def raw_stub(server):
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.MemoryStub(channel)


def test_collections_lifecycle(client):
    config = client.create_collection("lifecycle", index_factory="HNSW32", chunk_tokens=32)
    assert (config.name, config.index_factory, config.chunk_tokens, config.dim) == ("lifecycle", "HNSW32", 32, 384)
    assert "lifecycle" in [c.name for c in client.list_collections()]
    with pytest.raises(AlreadyExists, match="lifecycle"):
        client.create_collection("lifecycle")
    again = client.create_collection("lifecycle", if_not_exists=True)
    assert again.index_factory == "HNSW32"
    stats = client.describe_collection("lifecycle")
    assert (stats.documents, stats.chunks) == (0, 0)
    client.drop_collection("lifecycle")
    assert "lifecycle" not in [c.name for c in client.list_collections()]
    with pytest.raises(NotFound, match="lifecycle"):
        client.describe_collection("lifecycle")


def test_bad_collection_settings_are_rejected(client):
    with pytest.raises(InvalidArgument, match="NotAFactory"):
        client.create_collection("bad-factory", index_factory="NotAFactory")
    with pytest.raises(InvalidArgument):
        client.create_collection("has space")
    with pytest.raises(InvalidArgument, match="no-such-model"):
        client.create_collection("bad-embedder", embedding_model="no-such-model")
    assert not {"bad-factory", "has space", "bad-embedder"} & {c.name for c in client.list_collections()}


def test_ingest_search_get_delete(client, collection):
    report = client.ingest(DOCS, collection=collection)
    assert [r.status for r in report.results] == ["created"] * 4
    assert all(r.chunks >= 1 for r in report.results)

    hits = client.search("Which volcano buried a town?", collection=collection, k=3)
    assert hits[0].doc_id == "volcano"
    assert hits[0].metadata["year"] == 1854 and hits[0].metadata["tags"] == ["volcano", "history"]
    assert "Zendor" in hits[0].text
    assert all(hits[i].score >= hits[i + 1].score for i in range(len(hits) - 1))

    docs = client.get(["orbit", "bread"], collection=collection)
    assert [d.id for d in docs] == ["orbit", "bread"]
    assert docs[0].text == DOCS[2]["text"] and docs[0].metadata["topic"] == "astronomy"

    assert client.delete(["volcano", "never-existed"], collection=collection) == ["volcano"]
    hits = client.search("Which volcano buried a town?", collection=collection, k=4)
    assert "volcano" not in {h.doc_id for h in hits}
    with pytest.raises(NotFound, match="volcano"):
        client.get(["volcano"], collection=collection)
    # missing_ok: the server leaves the missing ids out, in one call; an unknown collection still fails
    assert [d.id for d in client.get(["volcano", "bread", "orbit"], collection=collection, missing_ok=True)] == ["bread", "orbit"]
    with pytest.raises(NotFound, match="no-such-collection"):
        client.get(["bread"], collection="no-such-collection", missing_ok=True)
    stats = client.describe_collection(collection)
    assert stats.documents == 3 and stats.index_vectors == stats.chunks


def test_upsert_replaces_all_chunks(client, collection):
    long_text = " ".join(f"Sentence {i} about the old lighthouse keeper." for i in range(60))
    first = client.ingest([{"id": "doc", "text": long_text}], collection=collection).results[0]
    assert first.status == "created" and first.chunks > 3
    second = client.ingest([{"id": "doc", "text": "A short replacement about glaciers."}], collection=collection)
    assert second.results[0].status == "replaced" and second.results[0].chunks == 1
    stats = client.describe_collection(collection)
    assert (stats.documents, stats.chunks, stats.index_vectors) == (1, 1, 1)
    hits = client.search("lighthouse keeper", collection=collection, k=5)
    assert [h.text for h in hits] == ["A short replacement about glaciers."]
    assert not set(first.chunk_ids) & {h.chunk_id for h in hits}


def test_filters_are_exact(client, collection):
    client.ingest(DOCS, collection=collection)
    q = "bread fermentation"
    assert {h.doc_id for h in client.search(q, collection=collection, k=10, filter={"lang": "de"})} == {"brot"}
    assert {h.doc_id for h in client.search(q, collection=collection, k=10, filter={"tags": "history"})} == {"volcano", "orbit"}
    got = client.search(q, collection=collection, k=10, filter={"topic": ["geology", "astronomy"]})
    assert {h.doc_id for h in got} == {"volcano", "orbit"}
    got = client.search(q, collection=collection, k=10, filter={"year": 2020})
    assert {h.doc_id for h in got} == {"bread", "brot"}
    got = client.search(q, collection=collection, k=10, filter={"must_not": [{"key": "lang", "equals": "en"}]})
    assert {h.doc_id for h in got} == {"brot"}
    # A boolean is not the number 1, and a missing key matches nothing.
    assert {h.doc_id for h in client.search(q, collection=collection, k=10, filter={"verified": True})} == {"brot"}
    assert client.search(q, collection=collection, k=10, filter={"verified": 1}) == []
    assert client.search(q, collection=collection, k=10, filter={"nope": "x"}) == []


def test_list_documents_pages_through_everything_or_a_filter(client, collection):
    client.ingest(DOCS + [{"id": f"note-{i:03d}", "text": f"Note {i} about tides.", "metadata": {"n": i, "lang": "en"}}
                          for i in range(25)], collection=collection)
    every = list(client.list_documents(collection=collection, page_size=7))  # 29 documents: 5 calls
    assert [d.id for d in every] == sorted([d["id"] for d in DOCS] + [f"note-{i:03d}" for i in range(25)])
    assert [d.id for d in every][:4] == ["bread", "brot", "note-000", "note-001"]
    volcano = next(d for d in every if d.id == "volcano")
    assert volcano.text == DOCS[0]["text"] and volcano.metadata == DOCS[0]["metadata"] and volcano.chunk_ids

    page = client.list_documents_page(collection=collection, limit=2, filter={"lang": "en"}, with_text=False)
    assert [d.id for d in page.documents] == ["bread", "note-000"] and page.next_after == "note-000"
    assert page.documents[0].text == "" and page.documents[0].metadata["topic"] == "cooking"
    after = client.list_documents_page(collection=collection, after=page.next_after, limit=2, filter={"lang": "en"})
    assert [d.id for d in after.documents] == ["note-001", "note-002"]
    last = client.list_documents_page(collection=collection, after="note-023", filter={"lang": "en"})
    assert [d.id for d in last.documents] == ["note-024", "orbit", "volcano"] and last.next_after is None

    # The search's filter forms: a list-valued field, any of, OR, NOT, booleans not numbers.
    def ids(f):
        return [d.id for d in client.list_documents(collection=collection, filter=f, with_text=False)]

    assert ids({"tags": "history"}) == ["orbit", "volcano"]
    assert ids({"n": [3, 24, 99]}) == ["note-003", "note-024"]
    assert ids({"should": [{"key": "topic", "equals": "cooking"}, {"key": "year", "equals": 1854}]}) == ["bread", "brot", "volcano"]
    assert ids({"must": [{"key": "topic", "equals": "cooking"}], "must_not": [{"key": "lang", "equals": "en"}]}) == ["brot"]
    assert ids({"verified": True}) == ["brot"] and ids({"verified": 1}) == []
    with pytest.raises(NotFound, match="no-such-collection"):
        list(client.list_documents(collection="no-such-collection"))
    with pytest.raises(InvalidArgument, match="limit"):
        client.list_documents_page(collection=collection, limit=0)


def test_delete_by_filter_and_delete_all(client):
    client.create_collection("kept-settings", chunk_tokens=32)
    try:
        client.ingest(DOCS, collection="kept-settings")
        assert client.delete(filter={"topic": "cooking"}, collection="kept-settings") == ["bread", "brot"]
        assert [d.id for d in client.list_documents(collection="kept-settings")] == ["orbit", "volcano"]
        hits = client.search("Sourdough bread wild yeast", collection="kept-settings", k=5)
        assert {h.doc_id for h in hits} == {"orbit", "volcano"}  # a deleted document is no longer searchable
        assert client.delete(["volcano", "orbit"], filter={"tags": "space"}, collection="kept-settings") == ["orbit"]
        for empty in ({}, {"must": []}):
            with pytest.raises(InvalidArgument, match="filter is empty.*all=True"):
                client.delete(filter=empty, collection="kept-settings")
        with pytest.raises(InvalidArgument, match="no ids or filter"):
            client.delete(["volcano"], all=True, collection="kept-settings")
        with pytest.raises(InvalidArgument, match="needs ids, a filter, or all=True"):
            client.delete(collection="kept-settings")
        assert client.delete([], collection="kept-settings") == []  # no ids: nothing
        assert client.describe_collection("kept-settings").documents == 1  # the refusals deleted nothing
        client.ingest(DOCS[1:], collection="kept-settings")
        assert sorted(client.delete(all=True, collection="kept-settings")) == sorted(d["id"] for d in DOCS)
        stats = client.describe_collection("kept-settings")
        assert (stats.documents, stats.chunks, stats.index_vectors) == (0, 0, 0)
        assert stats.config.chunk_tokens == 32  # the collection stays, with its settings
        assert client.search("volcano", collection="kept-settings", k=5) == []
    finally:
        client.drop_collection("kept-settings")


def test_vector_search(client, collection):
    client.ingest(DOCS, collection=collection)
    from memlm.index.embedding import load_embedder

    vec = load_embedder("all-MiniLM-L6-v2").embed(["comet returning every two centuries"])[0]
    hits = client.search(vec, collection=collection, k=1)
    assert hits[0].doc_id == "orbit"


def test_search_modes_over_the_wire(client, collection):
    client.ingest(DOCS, collection=collection)
    lexical = client.search("Ilvara 212", collection=collection, k=4, mode="lexical")
    assert [h.doc_id for h in lexical] == ["orbit"] and lexical[0].score > 0  # only it has those words
    dense = client.search("Which volcano buried a town?", collection=collection, k=2, mode="dense")
    assert dense[0].doc_id == "volcano" and -1 <= dense[-1].score <= 1
    hybrid = client.search("Which volcano buried a town?", collection=collection, k=2)  # server default
    assert hybrid == client.search("Which volcano buried a town?", collection=collection, k=2, mode="hybrid")
    # first in both rankings; "absolute" fusion scores are in [0, 1] (0.4 * cosine + 0.6 * lexical)
    assert hybrid[0].doc_id == "volcano" and 1 >= hybrid[0].score > hybrid[1].score >= 0
    with pytest.raises(InvalidArgument, match="unknown search mode 'fuzzy'"):
        client.search("x", collection=collection, mode="fuzzy")
    with pytest.raises(InvalidArgument, match="needs a text query"):
        client.search(np.ones(384), collection=collection, mode="lexical")


# --- bad input: a clear status that names the problem, and nothing stored is lost ---------------

def assert_intact(client, collection):
    """The documents ingested before a bad call are all still there and searchable."""
    assert {d.id for d in client.get([d["id"] for d in DOCS], collection=collection)} == {d["id"] for d in DOCS}
    assert client.search("comet Ilvara", collection=collection, k=1)[0].doc_id == "orbit"
    stats = client.describe_collection(collection)
    assert stats.documents == len(DOCS) and stats.index_vectors == stats.chunks


@pytest.mark.parametrize(
    "bad, error, pattern",
    [
        ({"id": "e", "text": ""}, InvalidArgument, "empty"),
        ({"id": "w", "text": "   \n\t "}, InvalidArgument, "empty"),
        ({"id": "", "text": "no id here"}, InvalidArgument, "id"),
        ({"id": "big", "text": "x" * 20001}, ResourceExhausted, "20000"),
    ],
    ids=["empty-text", "blank-text", "missing-id", "too-large"],
)
def test_bad_documents_fail_the_call_and_store_nothing(client, collection, bad, error, pattern):
    client.ingest(DOCS, collection=collection)
    good = {"id": "fresh", "text": "A good document sent in the same call as a bad one."}
    with pytest.raises(error, match=pattern):
        client.ingest([good, bad], collection=collection)
    with pytest.raises(NotFound):
        client.get(["fresh"], collection=collection)
    assert_intact(client, collection)


def test_duplicate_id_in_one_call(client, collection):
    client.ingest(DOCS, collection=collection)
    with pytest.raises(InvalidArgument, match="dup"):
        client.ingest([{"id": "dup", "text": "one"}, {"id": "dup", "text": "two"}], collection=collection)
    assert_intact(client, collection)


def test_skip_invalid_reports_per_document(client, collection):
    report = client.ingest(
        [{"id": "ok", "text": "fine text"}, {"id": "empty", "text": ""}, {"id": "big", "text": "y" * 20001}],
        collection=collection, skip_invalid=True,
    )
    by_id = {r.id: r for r in report.results}
    assert by_id["ok"].status == "created"
    assert (by_id["empty"].status, by_id["empty"].error_code) == ("rejected", "INVALID_ARGUMENT")
    assert (by_id["big"].status, by_id["big"].error_code) == ("rejected", "RESOURCE_EXHAUSTED")
    assert "20000" in by_id["big"].message
    assert [d.id for d in client.get(["ok"], collection=collection)] == ["ok"]


@pytest.mark.parametrize("k", [0, -1, 51])
def test_bad_k(client, collection, k):
    client.ingest(DOCS, collection=collection)
    with pytest.raises(InvalidArgument, match=r"\bk\b"):
        client.search("volcano", collection=collection, k=k)
    assert_intact(client, collection)


def test_unknown_collection_is_not_found(client):
    with pytest.raises(NotFound, match="no-such-collection"):
        client.search("x", collection="no-such-collection")
    with pytest.raises(NotFound, match="no-such-collection"):
        client.ingest([{"id": "a", "text": "b"}], collection="no-such-collection")
    with pytest.raises(NotFound, match="no-such-collection"):
        client.delete(["a"], collection="no-such-collection")
    with pytest.raises(NotFound, match="no-such-collection"):
        client.get(["a"], collection="no-such-collection")


@pytest.mark.parametrize(
    "condition, pattern",
    [
        (pb.Condition(key="lang"), "neither"),
        (pb.Condition(key="", equals={"string_value": "en"}), "key"),
        (pb.Condition(key="lang", equals={"struct_value": {}}), "string, number or boolean"),
        (pb.Condition(key="lang", any_of={}), "empty"),
    ],
    ids=["no-match", "empty-key", "struct-value", "empty-any-of"],
)
def test_malformed_filter(server, client, collection, condition, pattern):
    client.ingest(DOCS, collection=collection)
    channel, stub = raw_stub(server)
    with channel:
        request = pb.SearchRequest(collection=collection, text="x", k=3, filter=pb.Filter(must=[condition]))
        with pytest.raises(grpc.RpcError) as info:
            stub.Search(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert pattern in info.value.details()
    with pytest.raises(InvalidArgument):
        client.search("x", collection=collection, filter={"lang": {"nested": 1}})
    assert_intact(client, collection)


@pytest.mark.parametrize("vector, pattern", [(np.ones(5), "384"), (np.full(384, math.nan), "NaN")], ids=["dim", "nan"])
def test_bad_query_vector(client, collection, vector, pattern):
    client.ingest(DOCS, collection=collection)
    with pytest.raises(InvalidArgument, match=pattern):
        client.search(vector, collection=collection, k=3)
    assert_intact(client, collection)


def test_search_without_query(server, collection):
    channel, stub = raw_stub(server)
    with channel, pytest.raises(grpc.RpcError) as info:
        stub.Search(pb.SearchRequest(collection=collection, k=3), timeout=30)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "query" in info.value.details()


def test_ingest_call_must_name_one_collection(server, client, collection):
    channel, stub = raw_stub(server)
    with channel:
        with pytest.raises(grpc.RpcError) as info:
            stub.Ingest(iter([pb.IngestRequest(documents=[pb.Document(id="a", text="b")])]), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "collection" in info.value.details()
        msgs = [pb.IngestRequest(collection=collection, documents=[pb.Document(id="a", text="b")]),
                pb.IngestRequest(collection="other", documents=[pb.Document(id="c", text="d")])]
        with pytest.raises(grpc.RpcError) as info:
            stub.Ingest(iter(msgs), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "other" in info.value.details()
    assert client.describe_collection(collection).documents == 0


def test_streamed_ingest_over_several_messages(server, client, collection):
    channel, stub = raw_stub(server)
    with channel:
        msgs = [pb.IngestRequest(collection=collection, documents=[pb.Document(id=f"d{i}", text=f"Document number {i}.")])
                for i in range(5)]
        reply = stub.Ingest(iter(msgs), timeout=60)
    assert reply.created == 5 and [r.id for r in reply.results] == [f"d{i}" for i in range(5)]
    assert client.describe_collection(collection).documents == 5


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "memlm.v1.Memory", "memlm.v1.Generation"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"memlm.v1.Memory", "memlm.v1.Generation", "grpc.health.v1.Health"} <= names


def test_stats(client, collection):
    client.ingest(DOCS, collection=collection)
    reply = client.stats(collection)
    assert [c.config.name for c in reply.collections] == [collection]
    assert reply.collections[0].documents == 4 and reply.model.name
    assert collection in {c.config.name for c in client.stats().collections}


def test_prometheus_metrics(server, client, collection):
    import urllib.request

    client.ingest(DOCS, collection=collection)
    client.search("anything", collection=collection, k=1)
    with pytest.raises(NotFound):
        client.search("anything", collection="no-such-collection-metrics", k=1)
    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()

    # A call leaves the in-flight gauge once its handler has returned, a moment after the client has
    # its reply (on a loaded machine the scrape can come first): wait for it, a few seconds at most.
    deadline = time.monotonic() + 5
    body = scrape()
    while "memlm_calls_in_flight 0.0" not in body and time.monotonic() < deadline:
        time.sleep(0.05)
        body = scrape()
    assert "memlm_calls_in_flight 0.0" in body
    assert f'memlm_collection_documents{{collection="{collection}"}} 4.0' in body
    assert f'memlm_collection_available{{collection="{collection}"}} 1.0' in body
    assert 'memlm_rpc_calls_total{code="OK",method="Search"}' in body
    assert 'memlm_rpc_calls_total{code="NOT_FOUND",method="Search"}' in body
    assert "memlm_rpc_duration_seconds_bucket" in body


def test_engine_metrics_count_a_generation(server, client):
    import re
    import urllib.request

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()

    def value(body: str, sample: str) -> float:
        m = re.search(re.escape(sample) + r" ([0-9.e+]+)", body)
        return float(m.group(1)) if m else 0.0

    before = scrape()
    result = client.generate("Count: 1, 2, 3,", memory="none", max_new_tokens=5).result
    body = scrape()
    assert value(body, 'memlm:generation_tokens_total{mode="none"}') - value(
        before, 'memlm:generation_tokens_total{mode="none"}') == result.completion_tokens
    assert value(body, 'memlm:prompt_tokens_total{mode="none"}') - value(
        before, 'memlm:prompt_tokens_total{mode="none"}') == result.prompt_tokens
    assert value(body, 'memlm:time_to_first_token_seconds_count{mode="none"}') >= 1
    assert value(body, f'memlm:request_success_total{{finished_reason="{result.finish_reason}",mode="none"}}') >= 1
    assert "memlm:num_requests_running 0.0" in body and "memlm:num_requests_waiting 0.0" in body
    assert value(body, "memlm:iteration_tokens_total_count") > value(before, "memlm:iteration_tokens_total_count")
