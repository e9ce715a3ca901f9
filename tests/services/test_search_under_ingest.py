"""A search is answered while an ingest is embedding, against the real server.

The server embeds each ingest call in one forward pass here (store.embed_batch_size 4096), so the
ingest below spends seconds inside a single batch. Before query embeddings had their own path a
search waited for that whole batch (one lock around the embedder) and was answered after the
ingest; now it must come back while the ingest is still running. Asserted on the order of
events, not on durations."""
from __future__ import annotations

import random
import threading

import pytest

from memlm.services.process import ServerProcess

WORDS = ("harbour lantern copper violin orchard bridge compass ledger quarry tide beacon anchor meadow "
         "furnace granary spindle lattice thimble cistern parapet").split()


@pytest.fixture(scope="module")
def big_batch_server(tmp_path_factory, bundled_model_dir):
    proc = ServerProcess(tmp_path_factory.mktemp("under-ingest"), env={"MEMLM_STORE__EMBED_BATCH_SIZE": "4096"})
    yield proc
    assert proc.terminate() == 0, proc.output


def test_search_is_answered_while_an_ingest_is_embedding(big_batch_server):
    import memlm

    rng = random.Random(0)
    docs = [{"id": f"d{i}", "text": " ".join(rng.choice(WORDS) for _ in range(50)) + f" record {i}."}
            for i in range(300)]  # ~300 chunks: seconds of embedding on 2 cores
    events: list[str] = []
    failure: list[BaseException] = []
    with memlm.Client(big_batch_server.address, timeout=300) as client:
        client.create_collection("busy")
        client.ingest([{"id": "seed", "text": "The lighthouse keeper polished the copper lantern."}], collection="busy")
        client.search("lighthouse lantern", collection="busy", k=1)  # warm the query path up

        def ingest() -> None:
            try:
                with memlm.Client(big_batch_server.address, timeout=300) as c:
                    c.ingest(docs, collection="busy", batch_size=len(docs))  # one Ingest call, one batch
                events.append("ingest done")
            except BaseException as e:  # noqa: BLE001 - re-raised below
                failure.append(e)
                events.append("ingest failed")

        t = threading.Thread(target=ingest)
        t.start()
        # Let the call reach the embedder (sending and chunking take a fraction of a second).
        t.join(1.0)
        assert not events, "the ingest finished before the search was sent; make it bigger"
        events.append("search sent")
        hits = client.search("copper lantern", collection="busy", k=1)
        events.append("search answered")
        t.join(300)
    assert not failure, failure
    assert events == ["search sent", "search answered", "ingest done"]
    assert hits and hits[0].doc_id == "seed"  # it saw the collection as it was before the ingest
