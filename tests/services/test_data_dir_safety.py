"""No request can hurt a data directory: index factory strings FAISS accepts but the store cannot
serve are refused at CreateCollection (they used to abort the server, answer INTERNAL after
storing, or fail every search), and a data dir that already holds such a collection still starts,
reports it, serves the others, and can repair or drop it. Against the real server and CLI."""
import json
import subprocess
import sys

import pytest

import memlm
from memlm.errors import FailedPrecondition, InvalidArgument
from memlm.index.lmdb_store import LmdbStore
from memlm.services.process import ServerProcess

pytestmark = pytest.mark.server

DOCS = [
    {"id": "lamp", "text": "The lighthouse keeper trimmed the lamp wick every evening at dusk.", "metadata": {"n": 1}},
    {"id": "bees", "text": "Honeybees dance to tell the hive where the clover field lies.", "metadata": {"n": 2}},
    {"id": "salt", "text": "Sea salt is harvested from shallow ponds that the sun evaporates.", "metadata": {"n": 3}},
]


@pytest.mark.parametrize("factory,reason", [
    ("HNSW0", "FAISS crashed the process (SIGABRT)"),  # used to abort the server on the first ingest
    ("NSG32", "cannot build a graph smaller than 100"),  # used to answer INTERNAL yet store the documents
    ("IVF0,Flat", "at least one inverted list"),  # used to fail every search
    ("IVF4000000,Flat", "store.max_ivf_lists"),  # ~610 MB at each create and restart
    ("HNSW4096", "store.max_graph_degree"),
    ("PQ16x16", "store.max_pq_bits"),
    ("Nonsense12", "invalid FAISS index factory"),
])
def test_create_refuses_a_factory_the_store_cannot_serve(client, factory, reason):
    name = "f-" + "".join(ch if ch.isalnum() else "-" for ch in factory)
    with pytest.raises(InvalidArgument, match="index factory") as err:
        client.create_collection(name, index_factory=factory)
    assert reason in str(err.value)
    assert name not in [c.name for c in client.list_collections()]  # nothing was created


@pytest.mark.parametrize("factory", ["HNSW32", "IVF4,Flat", "PQ8", "SQ8"])
def test_the_factories_it_accepts_serve_ingest_search_and_delete(client, factory):
    name = "ok-" + "".join(ch if ch.isalnum() else "-" for ch in factory)
    client.create_collection(name, index_factory=factory)
    try:
        assert client.ingest(DOCS, collection=name).created == 3
        assert client.search("where does the clover grow for the hive", collection=name, k=1, mode="dense")[0].doc_id == "bees"
        assert client.delete(["bees"], collection=name) == ["bees"]
        assert {h.doc_id for h in client.search("honeybees", collection=name, k=3)} == {"lamp", "salt"}
    finally:
        client.drop_collection(name)


def memlm_cli(*args):
    return subprocess.run([sys.executable, "-m", "memlm.cli", *args], capture_output=True, text=True, timeout=300)


def test_a_data_dir_holding_an_unservable_collection_starts_serves_the_others_and_repairs(tmp_path, bundled_model_dir):
    data = tmp_path / "data"
    server = ServerProcess(data)
    with memlm.Client(server.address, timeout=120) as c:
        for name in ("victim", "doomed", "good"):
            c.create_collection(name)
            c.ingest(DOCS, collection=name)
    assert server.terminate() == 0, server.output
    # What a server before the factory check accepted: HNSW0 aborted every later start in recovery.
    lmdb = LmdbStore(data, 2**30)
    lmdb.set_index_factory("victim", "HNSW0")
    lmdb.set_index_factory("doomed", "NSG32")
    lmdb.close()
    for name in ("victim", "doomed"):
        for p in (data / "collections" / name).glob("index-*"):
            p.unlink()

    server = ServerProcess(data)
    try:
        assert "collection 'victim' is unavailable" in server.output  # the log says so at start
        with memlm.Client(server.address, timeout=120) as c:
            assert c.search("honeybees", collection="good", k=1)[0].doc_id == "bees"  # the others serve
            info = c.describe_collection("victim")
            assert "index factory 'HNSW0' cannot be served" in info.problem and info.documents == 3
            assert c.describe_collection("good").problem is None
            for call in (lambda: c.search("honeybees", collection="victim"),
                         lambda: c.ingest(DOCS[:1], collection="victim"),
                         lambda: c.delete(["bees"], collection="victim")):
                with pytest.raises(FailedPrecondition, match="collection 'victim' is unavailable"):
                    call()
            assert [d.id for d in c.get(["lamp"], collection="victim")] == ["lamp"]  # the data is all there
            addr = ("--address", server.address)
            stats = memlm_cli("stats", *addr)
            assert stats.returncode == 0 and "'victim' is unavailable" in stats.stdout, stats.stdout + stats.stderr
            with pytest.raises(InvalidArgument, match="HNSW0"):
                c.reindex_collection("victim", "HNSW0")
            repaired = memlm_cli("reindex", "victim", "--index-factory", "HNSW32", "--json", *addr)
            assert repaired.returncode == 0, repaired.stdout + repaired.stderr
            assert json.loads(repaired.stdout)["index_factory"] == "HNSW32"
            assert c.search("honeybees", collection="victim", k=1)[0].doc_id == "bees"
            c.drop_collection("doomed")  # the other way out
            assert sorted(x.name for x in c.list_collections()) == ["good", "victim"]
    finally:
        assert server.terminate() == 0, server.output

    server = ServerProcess(data)  # and it stays repaired
    try:
        with memlm.Client(server.address, timeout=120) as c:
            assert c.describe_collection("victim").config.index_factory == "HNSW32"
            assert c.search("honeybees", collection="victim", k=1)[0].doc_id == "bees"
            assert "unavailable" not in server.output
    finally:
        assert server.terminate() == 0, server.output
