"""A model host in this process serving knn against the store of a server in another process
(memlm.remote_store.RemoteStore over gRPC): its KV memory lives in its own folder and follows the
store's change log, so answers follow ingests, replacements and deletes made through the server."""
from __future__ import annotations

import asyncio

import pytest

from memlm.engine import GenerationRequest, SamplingParams
from memlm.remote_store import RemoteStore

pytestmark = pytest.mark.server

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the pass key? The pass key is"


def haystack(key: str) -> str:
    return FILLER * 8 + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * 8


def ask(host, collection: str) -> str:
    async def run():
        request = GenerationRequest(prompt=QUESTION, collection=collection, memory="knn",
                                    sampling=SamplingParams(max_new_tokens=8))
        async for event in host.generate(request):
            result = event
        return result

    return asyncio.run(run())


def test_knn_generation_with_the_store_in_another_process(tmp_path, client):
    """The store is the session server's; the model host is this process's."""
    from memlm.host import ModelHost

    client.create_collection("remote-mem", memory=["knn"])
    try:
        client.ingest([{"id": "vault", "text": haystack("48213")}, {"id": "other", "text": FILLER * 6}],
                      collection="remote-mem")
        store = RemoteStore(client, memory_dir=tmp_path / "engine")
        host = ModelHost.load(memory=store)
        try:
            assert "knn" in host.info().supported_memory_modes
            first = ask(host, "remote-mem")
            assert "48213" in first.text, first.text
            assert {c.doc_id for c in first.citations} <= {"vault", "other"}
            assert (tmp_path / "engine" / "collections" / "remote-mem" / "kv" / "manifest.json").exists()

            client.ingest([{"id": "vault", "text": haystack("70561")}], collection="remote-mem")  # replaced
            client.delete(["other"], collection="remote-mem")
            second = ask(host, "remote-mem")  # catches up through ReadChanges before it reads
            assert "70561" in second.text and "48213" not in second.text, second.text
            assert {c.doc_id for c in second.citations} == {"vault"}
        finally:
            asyncio.run(host.close())
    finally:
        client.drop_collection("remote-mem")
