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
    stream = client.generate(QUESTION, collection=collection if reads else "", memory=mode, max_new_tokens=24)
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


def memory_of(mode: str):
    return [mode] if registry.collection_options_class(mode) is not None else None


def test_mode_contract(tmp_path, bundled_model_dir):
    """Every mode at once, one collection each (named after the mode) in one data folder: each
    server start (the first, the restart after the kill, the one after the derived folders are
    lost) serves every mode's steps, so a new mode costs generations, not server starts."""
    data = tmp_path / "data"
    # One document holds the pass key; the other is text around it that the delete removes.
    live = {mode: {"north": door("north", "48213"),
                   "garden": FILLER * 3 + "The garden has twelve apple trees. " + FILLER * 3}
            for mode in registry.MODES}
    extra = [{"id": f"gate-{i}", "text": FILLER * 4 + f"Gate {i} was painted green in spring. " + FILLER * 2}
             for i in range(24)]

    server = ServerProcess(data)
    try:
        with memlm.Client(server.address, timeout=300) as client:
            for mode in registry.MODES:
                config = client.create_collection(mode, memory=memory_of(mode))
                assert (mode in config.memory) == (memory_of(mode) is not None)
                client.ingest([{"id": i, "text": t} for i, t in live[mode].items()], collection=mode)
                check(client, mode, mode, live[mode], "48213")

                live[mode]["north"] = door("north", "70561")  # re-ingest of an id replaces it
                report = client.ingest([{"id": "north", "text": live[mode]["north"]}], collection=mode)
                assert report.results[0].status == "replaced", mode
                check(client, mode, mode, live[mode], "70561", gone=("48213",))

                assert client.delete(["garden"], collection=mode) == ["garden"]
                del live[mode]["garden"]
                check(client, mode, mode, live[mode], "70561", gone=("48213",))

            # kill -9 while an ingest into every mode's collection is under way: each writer waits,
            # after its second batch was acknowledged, until all have got that far; then the kill.
            acknowledged = threading.Barrier(len(registry.MODES) + 1)

            def before_batch(first: int, size: int) -> None:
                if first == 4:
                    acknowledged.wait(240)

            def ingest(mode: str) -> None:
                try:
                    client.ingest(extra, collection=mode, batch_size=2, before_batch=before_batch)
                except MemlmError:
                    pass  # the server died under it

            writers = [threading.Thread(target=ingest, args=(mode,), daemon=True) for mode in registry.MODES]
            for writer in writers:
                writer.start()
            acknowledged.wait(240)  # BrokenBarrierError: some ingest never reached its third batch
            server.kill()
            for writer in writers:  # each sees the server die under it (the client still open)
                writer.join(60)
    finally:
        server.kill()

    server = ServerProcess(data)
    try:
        with memlm.Client(server.address, timeout=300) as client:
            for mode in registry.MODES:
                stored = {d.id: d.text for d in _existing(client, mode, ["north", *(e["id"] for e in extra)])}
                assert {"gate-0", "gate-1", "gate-2", "gate-3"} <= set(stored), mode  # acknowledged before the kill
                assert all(stored[e["id"]] == e["text"] for e in extra if e["id"] in stored), mode  # whole documents
                live[mode] = stored
                check(client, mode, mode, live[mode], "70561", gone=("48213",))
    finally:
        assert server.terminate() == 0

    # Derived data is derived: with the collections' folders gone, the server rebuilds them from LMDB.
    for mode in registry.MODES:
        shutil.rmtree(data / "collections" / mode)
    server = ServerProcess(data)
    try:
        with memlm.Client(server.address, timeout=300) as client:
            for mode in registry.MODES:
                check(client, mode, mode, live[mode], "70561", gone=("48213",))

                client.drop_collection(mode)
                if registry.mode_class(mode).reads_collection:
                    with pytest.raises(NotFound, match=f"'{mode}'"):
                        ask(client, mode, mode)
                client.create_collection(mode, memory=memory_of(mode))  # the same name again starts empty
                client.ingest([{"id": "north", "text": door("north", "52740")}], collection=mode)
                check(client, mode, mode, {"north": door("north", "52740")}, "52740", gone=("70561", "48213"))
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
