"""The `knn` memory mode through the service: the model attends to the keys and values of text
ingested into a `kv_memory` collection, with only the question in its prompt. Real server, real
bundled model, real KV-memory files."""
import shutil
import subprocess
import sys

import pytest

import memlm
from memlm.errors import FailedPrecondition, InvalidArgument, NotFound
from memlm.modes.knn.reading import PRESETS
from memlm.services.process import ServerProcess
from memlm.v1 import memlm_pb2 as pb

pytestmark = pytest.mark.server

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def haystack(key: str, before: int = 12, after: int = 12) -> str:
    """~1,000 tokens of filler with one pass-key sentence inside: far more than the prompt holds."""
    return FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * after


def ask_knn(client, collection, **kw):
    stream = client.generate(QUESTION, collection=collection, memory="knn", max_new_tokens=8, **kw)
    for _ in stream:
        pass
    return stream.result


@pytest.fixture()
def kv_collection(client, request):
    name = ("kv-" + request.node.name)[:60]
    client.create_collection(name, kv_memory=True)
    yield name
    client.drop_collection(name)


def memory_bytes(server, collection: str) -> float:
    """The collection's knn KV memory on disk, as /metrics reports it."""
    import re
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    m = re.search(r'memlm_collection_memory_bytes\{collection="%s",folder="kv"\} ([0-9.e+]+)' % re.escape(collection), body)
    return float(m.group(1)) if m else 0.0


def test_knn_answers_from_memory_and_follows_upserts_and_deletes(server, client, kv_collection):
    assert pb.MEMORY_MODE_KNN in client.model_info().memory_modes
    report = client.ingest([{"id": "vault", "text": haystack("48213")}], collection=kv_collection)
    assert report.results[0].status == "created"

    # The very next request reads it (it catches the memory up first).
    first = ask_knn(client, kv_collection)
    assert "48213" in first.text, first.text
    # ~550 tokens of keys and values: 400 x 29 layers x 3 heads x 64 x 2 (k, v) x 2 bytes (fp16) at least
    assert memory_bytes(server, kv_collection) > 400 * 29 * 3 * 64 * 2 * 2
    assert first.prompt_tokens < 16  # the haystack is not in the prompt: it is attended to as memory

    # Without memory the model cannot know the key.
    plain = client.generate(QUESTION, memory="none", max_new_tokens=8)
    assert "48213" not in "".join(plain)

    # An upsert replaces the document's rows; the old key is gone from memory.
    client.ingest([{"id": "vault", "text": haystack("70561", before=5, after=19)}], collection=kv_collection)
    replaced = ask_knn(client, kv_collection)
    assert "70561" in replaced.text and "48213" not in replaced.text, replaced.text

    # A delete removes it; an empty memory behaves like no memory.
    assert client.delete(["vault"], collection=kv_collection) == ["vault"]
    gone = ask_knn(client, kv_collection)
    assert "70561" not in gone.text and "48213" not in gone.text, gone.text


def test_knn_request_errors_name_the_problem(client, collection, kv_collection):
    with pytest.raises(FailedPrecondition, match="no knn memory.*--memory knn"):
        ask_knn(client, collection)  # a plain collection
    with pytest.raises(NotFound, match="no-such-collection"):
        ask_knn(client, "no-such-collection")
    with pytest.raises(InvalidArgument, match="collection"):
        ask_knn(client, "")
    with pytest.raises(InvalidArgument, match="k=1000"):
        ask_knn(client, kv_collection, k=1000)


def test_chunk_gated_knn_reads_the_chunks_its_search_and_filter_allow_and_cites_them(client, kv_collection):
    """Preset "default" (chunk-gated, 8 chunks): the prompt's top chunks by the store's search, within
    `filter`, are the only memory a generation attends to, and the result cites them."""
    client.ingest([{"id": "ann", "text": haystack("52917", before=4, after=20), "metadata": {"owner": "ann"}},
                   {"id": "bob", "text": haystack("86034", before=18, after=6), "metadata": {"owner": "bob"}}],
                  collection=kv_collection)
    for owner, key, other in (("ann", "52917", "86034"), ("bob", "86034", "52917")):
        result = ask_knn(client, kv_collection, filter={"owner": owner})
        assert key in result.text and other not in result.text, (owner, result.text)
        assert 0 < len(result.citations) <= PRESETS["default"].candidate_chunks
        assert {c.doc_id for c in result.citations} == {owner}
        assert any(key in c.text for c in result.citations)  # the needle's chunk was among those read
        assert result.prompt_tokens < 16


def test_cli_ingest_kv_memory_and_ask_knn(server, tmp_path):
    doc = tmp_path / "vault.txt"
    doc.write_text(haystack("90317", before=8, after=14))
    run = lambda *a: subprocess.run([sys.executable, "-m", "memlm.cli", *a, "--address", server.address],
                                    capture_output=True, text=True, timeout=300)
    ingest = run("ingest", str(doc), "--collection", "cli-kv", "--kv-memory")
    assert ingest.returncode == 0, ingest.stderr
    listed = run("collections")
    assert "cli-kv" in listed.stdout and "knn" in listed.stdout
    ask = run("ask", QUESTION, "--collection", "cli-kv", "--memory", "knn", "--max-new-tokens", "8")
    assert ask.returncode == 0, ask.stderr
    assert "90317" in ask.stdout, ask.stdout
    run("drop", "cli-kv")


def test_ungated_kv_memory_survives_kill_9_and_is_rebuilt_from_lmdb_when_lost(tmp_path, bundled_model_dir):
    """With knn preset "ungated" generation reads the whole memory (loaded into FAISS)."""
    data = tmp_path / "data"
    env = {"MEMLM_KNN__PRESET": "ungated"}
    server = ServerProcess(data, env=env)
    try:
        with memlm.Client(server.address, timeout=120) as client:
            client.create_collection("mem", kv_memory=True)
            client.ingest([{"id": "a", "text": haystack("31846")}, {"id": "b", "text": FILLER * 10}], collection="mem")
            client.delete(["b"], collection="mem")
    finally:
        server.kill()  # kill -9 right after the acknowledgements

    server = ServerProcess(data, env=env)
    try:
        with memlm.Client(server.address, timeout=120) as client:
            result = ask_knn(client, "mem")
            assert "31846" in result.text and result.citations == ()
            with pytest.raises(InvalidArgument, match="filter.*candidate_chunks"):
                ask_knn(client, "mem", filter={"owner": "ann"})
    finally:
        server.kill()

    # The KV memory is derived data: with its folder gone, the server rebuilds it from LMDB.
    kv = data / "collections" / "mem" / "kv"
    assert (kv / "manifest.json").exists()
    shutil.rmtree(kv)
    server = ServerProcess(data, env=env)
    try:
        with memlm.Client(server.address, timeout=120) as client:
            assert "31846" in ask_knn(client, "mem").text
            assert client.get(["a"], collection="mem")[0].id == "a"
    finally:
        assert server.terminate() == 0
    assert (kv / "manifest.json").exists()
