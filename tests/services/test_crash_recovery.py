"""kill -9 of the server in the middle of a large ingest, then a restart: every acknowledged
document is present and searchable, and the index agrees with LMDB."""
import random
import threading
import time

import pytest

import memlm
from memlm.services.process import ServerProcess

pytestmark = pytest.mark.server

WORDS = ("amber basalt cedar delta ember fjord garnet harbor iris jasper kelp lumen marble nectar onyx "
         "pewter quartz raven sable tundra umber violet willow xenon yarrow zephyr").split()


def make_docs(n, seed=0):
    rng = random.Random(seed)
    return [{"id": f"doc-{i:05d}", "text": " ".join(rng.choice(WORDS) for _ in range(40)) + f" (record {i})",
             "metadata": {"n": i}} for i in range(n)]


def test_kill_9_mid_ingest_then_restart(tmp_path, bundled_model_dir):
    data = tmp_path / "data"
    docs = make_docs(600)
    server = ServerProcess(data, env={"MEMLM_STORE__SNAPSHOT_EVERY_OPS": "7"})
    acknowledged: list[str] = []
    failure: list[BaseException] = []

    def ingest():
        try:
            with memlm.Client(server.address, timeout=60) as client:
                client.create_collection("crash")
                for start in range(0, len(docs), 20):
                    report = client.ingest(docs[start:start + 20], collection="crash")
                    acknowledged.extend(r.id for r in report.results if r.status == "created")
                    if start == 100:  # a delete in the log too: it must stay deleted after recovery
                        assert client.delete(["doc-00003"], collection="crash") == ["doc-00003"]
                        acknowledged.remove("doc-00003")
        except BaseException as exc:  # the kill ends the ingest with UNAVAILABLE
            failure.append(exc)

    worker = threading.Thread(target=ingest)
    worker.start()
    deadline = time.monotonic() + 300
    while len(acknowledged) < 200 and worker.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    server.kill()
    worker.join(60)
    assert failure, "the ingest should have been cut off by the kill"
    assert 180 <= len(acknowledged) < len(docs)  # 10+ batches and a delete: snapshots (every 7 ops) and a log tail

    server = ServerProcess(data)
    try:
        with memlm.Client(server.address, timeout=120) as client:
            stats = client.describe_collection("crash")
            assert stats.index_vectors == stats.chunks, "index and LMDB disagree after recovery"
            assert stats.documents >= len(acknowledged)
            got = client.get(acknowledged, collection="crash")
            assert [d.id for d in got] == acknowledged
            with pytest.raises(memlm.errors.NotFound):
                client.get(["doc-00003"], collection="crash")
            by_id = {d["id"]: d for d in docs}
            for doc_id in random.Random(1).sample(acknowledged, 25):
                # dense: what this checks is the recovered vector index. (Hybrid would let the rare
                # word "1" of "(record 1)" pull up another document's chunk that the chunker cut
                # inside "(record 1|56)": these texts are 26 words repeated.)
                hits = client.search(by_id[doc_id]["text"], collection="crash", k=1, mode="dense")
                assert hits and hits[0].doc_id == doc_id
            deleted_text = by_id["doc-00003"]["text"]
            assert all(h.doc_id != "doc-00003" for h in client.search(deleted_text, collection="crash", k=5))
    finally:
        assert server.terminate() == 0
