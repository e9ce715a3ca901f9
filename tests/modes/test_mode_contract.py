"""The contract every registered memory mode keeps, run for each name in memlm.modes.MODES (a new
mode gets it by registering): through a real server process on the bundled model, a collection
made with the mode's memory on goes through ingest, re-ingest of an id, delete, `kill -9` in the
middle of an ingest and a restart, the loss of its derived folder, and drop; after each step a
generation in the mode works, answers from the live text (modes that read a collection), and
cites only chunks of documents that are stored now, with their stored text."""
from __future__ import annotations

import shutil
import threading

import pytest

import memlm
from memlm import modes as registry
from memlm.errors import MemlmError, NotFound
from memlm.services.process import ServerProcess

pytestmark = pytest.mark.server

QUESTION = "What is the pass key of the north door? The pass key of the north door is"
FILLER = "The corridor is long and quiet. Lamps hang from the ceiling. The floor is made of stone. "


def door(name: str, key: str) -> str:
    return FILLER * 3 + f"The pass key of the {name} door is {key}. " + FILLER * 3


def ask(client, mode: str, collection: str):
    reads = registry.mode_class(mode).reads_collection
    stream = client.generate(QUESTION, collection=collection if reads else "", memory=mode, max_new_tokens=16)
    text = "".join(stream)
    result = stream.result
    assert result.completion_tokens >= 1 and result.text == text
    return result


def check(client, mode: str, collection: str, live: dict[str, str], key: str, gone: tuple[str, ...] = ()):
    """A generation works; a collection-reading mode answers with the live key, never a gone one,
    and every citation is a chunk of a live document, with that document's stored text."""
    result = ask(client, mode, collection)
    if registry.mode_class(mode).reads_collection:
        assert key in result.text, (mode, result.text)
        assert not any(old in result.text for old in gone), (mode, result.text)
    else:
        assert result.citations == ()
    for hit in result.citations:
        assert hit.doc_id in live, (mode, hit.doc_id, sorted(live))
        assert hit.text in live[hit.doc_id], (mode, hit.doc_id)
    return result


@pytest.mark.parametrize("mode", registry.MODES)
def test_mode_contract(mode, tmp_path, bundled_model_dir):
    data = tmp_path / "data"
    memory = [mode] if registry.collection_options_class(mode) is not None else None
    # One document holds the pass key; the other is text around it that the delete removes.
    live = {"north": door("north", "48213"), "garden": FILLER * 3 + "The garden has twelve apple trees. " + FILLER * 3}

    server = ServerProcess(data)
    try:
        with memlm.Client(server.address, timeout=300) as client:
            config = client.create_collection("c", memory=memory)
            assert (mode in config.memory) == (memory is not None)
            client.ingest([{"id": i, "text": t} for i, t in live.items()], collection="c")
            check(client, mode, "c", live, "48213")

            live["north"] = door("north", "70561")  # re-ingest of an id replaces it
            assert client.ingest([{"id": "north", "text": live["north"]}], collection="c").results[0].status == "replaced"
            check(client, mode, "c", live, "70561", gone=("48213",))

            assert client.delete(["garden"], collection="c") == ["garden"]
            del live["garden"]
            check(client, mode, "c", live, "70561", gone=("48213",))

            # kill -9 while an ingest is under way: after its second batch was acknowledged.
            extra = [{"id": f"gate-{i}", "text": FILLER * 4 + f"Gate {i} was painted green in spring. " + FILLER * 2}
                     for i in range(24)]
            acknowledged = threading.Event()

            def before_batch(first: int, size: int) -> None:
                if first >= 4:
                    acknowledged.set()

            def ingest() -> None:
                try:
                    client.ingest(extra, collection="c", batch_size=2, before_batch=before_batch)
                except MemlmError:
                    pass  # the server died under it

            writer = threading.Thread(target=ingest, daemon=True)
            writer.start()
            assert acknowledged.wait(240), "the ingest never reached its third batch"
    finally:
        server.kill()
    writer.join(60)

    server = ServerProcess(data)
    try:
        with memlm.Client(server.address, timeout=300) as client:
            stored = {d.id: d.text for d in _existing(client, "c", ["north", *(e["id"] for e in extra)])}
            assert {"gate-0", "gate-1", "gate-2", "gate-3"} <= set(stored)  # acknowledged before the kill
            assert all(stored[e["id"]] == e["text"] for e in extra if e["id"] in stored)  # whole documents
            live = stored
            check(client, mode, "c", live, "70561", gone=("48213",))
    finally:
        assert server.terminate() == 0

    # Derived data is derived: with the collection's folder gone, the server rebuilds it from LMDB.
    shutil.rmtree(data / "collections" / "c")
    server = ServerProcess(data)
    try:
        with memlm.Client(server.address, timeout=300) as client:
            check(client, mode, "c", live, "70561", gone=("48213",))

            client.drop_collection("c")
            if registry.mode_class(mode).reads_collection:
                with pytest.raises(NotFound, match="'c'"):
                    ask(client, mode, "c")
            client.create_collection("c", memory=memory)  # the same name again starts empty
            client.ingest([{"id": "north", "text": door("north", "52740")}], collection="c")
            check(client, mode, "c", {"north": door("north", "52740")}, "52740", gone=("70561", "48213"))
    finally:
        assert server.terminate() == 0


def _existing(client, collection: str, ids: list[str]):
    """The documents among `ids` that are stored (Get answers NOT_FOUND for a missing one)."""
    out = []
    for i in ids:
        try:
            out.extend(client.get([i], collection=collection))
        except NotFound:
            pass
    return out
