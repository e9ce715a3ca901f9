"""RETRO's stored neighbour states (`memlm.modes.retro.memory`) on a real store: a tiny random Llama
(the bundled tokenizer's vocabulary) with a RETRO adapter saved as `memlm train` saves one, a real
MemoryStore (LMDB, FAISS, MiniLM). Checked: every chunk's states are the base pass of exactly the
neighbour row a search hit makes of it, a generation reads them instead of running the base pass
(and writes what it would have written without them), and they stay in step with deletes,
re-ingests, restarts and a crash mid-write, like every derived memory."""
from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
import torch

from memlm.engine import GenerationRequest, SamplingParams
from memlm.generation import generate_tokens
from memlm.index.types import Document
from memlm.modes.base import ModeRuntime
from memlm.modes.retro.memory import NeighbourStateManager, NeighbourStateMemory, StoredFirst
from memlm.modes.retro.model import neighbour_states
from memlm.modes.retro.mode import Mode
from memlm.modes.retro.neighbours import search_neighbours
from memlm.modes.retro.settings import Settings


@pytest.fixture()
def setup(tmp_path, bundled_model_dir, run_now, tiny_retro, tiny_retro_llama):
    from memlm.index.memory_store import MemoryStore
    from memlm.models.loading import load_tokenizer

    tokenizer = load_tokenizer(bundled_model_dir)
    model, folder, weights = tiny_retro_llama(tmp_path, tokenizer, tiny_retro.config)
    settings = tiny_retro.store_settings()
    data = tmp_path / "data"
    store = MemoryStore.open(data, settings, tokenizer=tokenizer)
    store.create_collection("s", memory={"retro": {}})
    store.create_collection("plain")
    for name in ("s", "plain"):
        store.ingest(name, tiny_retro.documents())

    def mode_on(store):
        runtime = ModeRuntime(model=model, tokenizer=tokenizer, model_name=store.tokenizer_name, store=store,
                              run_on_model=run_now, model_dir=folder)
        return Mode(runtime, Settings(weights=str(weights), build_batch_chunks=4))

    mode = mode_on(store)
    box = {"store": store, "mode": mode}

    def reopen():  # a restart: the store and the mode opened again on the same folder
        box["mode"].close()
        box["store"].close()
        box["store"] = MemoryStore.open(data, settings, tokenizer=tokenizer)
        box["mode"] = mode_on(box["store"])
        return box["mode"], box["store"]

    yield mode, model, tokenizer, store, reopen
    box["mode"].close()
    box["store"].close()


def generate(mode, model, tokenizer, prompt, n, collection="s"):
    r = GenerationRequest(prompt=prompt, collection=collection, memory="retro", sampling=SamplingParams(max_new_tokens=n))
    mode.validate(r, mode.runtime.store.collection_config(collection))
    ids = tokenizer(prompt).input_ids
    with mode.generation(r, None) as hooks:
        *_, outcome = generate_tokens(model, tokenizer, ids, r.sampling, threading.Event(), eos_ids=(), hooks=hooks)
        state = hooks.state
    return outcome, state


def test_each_chunk_keeps_the_base_pass_of_the_neighbour_row_a_search_hit_makes_of_it(setup, tiny_retro):
    mode, model, tokenizer, store, _ = setup
    retro = tiny_retro.config
    report = mode.memories.catch_up("s")
    stored = store.chunk_ids("s")
    assert report.done and report.added_rows == len(stored) and report.built_documents == 3
    assert mode.memories.catch_up("s").added_rows == 0  # in step: nothing built twice
    mem = mode.memories.memory("s")
    assert sorted(mem.chunk_ids().tolist()) == sorted(stored.tolist())
    assert len(mem.manifest.segments) == -(-len(stored) // 4)  # build_batch_chunks=4 per segment
    assert (mode.runtime.store.memory_folder("s") / "retro" / "manifest.json").is_file()
    # the rows a search makes of its hits (chunk + continuation, zero-padded) are found, with their base pass
    found = search_neighbours(store, "s", list(tiny_retro.topics), retro)
    ids = torch.from_numpy(np.concatenate([f[0] for f in found]))
    stored_states = mem.lookup(ids)
    assert sorted(stored_states) == list(range(len(ids)))
    with torch.inference_mode():
        computed = neighbour_states(model, ids, retro.layers)
    for i, layers in stored_states.items():
        for layer, s in layers.items():
            torch.testing.assert_close(s, computed[layer][i].float(), rtol=2e-3, atol=2e-3)  # fp16 on disk
    other = ids.clone()
    other[0, 3] += 1  # any other text: not found
    assert 0 not in mem.lookup(other)


def test_a_generation_reads_the_stored_states_and_writes_what_it_would_without_them(setup, tiny_retro):
    mode, model, tokenizer, store, _ = setup
    mode.memories.catch_up("s")
    topics, m = tiny_retro.topics, tiny_retro.chunk_tokens
    prompt = "Tell me about " + topics[0] + " and then about " + topics[2]
    mode.state_cache.clear()
    with_states, state = generate(mode, model, tokenizer, prompt, 2 * m + 3)
    source = state.cache
    assert isinstance(source, StoredFirst)
    rows = {}  # every distinct neighbour row encoded -> whether it is a real neighbour (not a missing one)
    for u in state.encoded:
        ids, valid = state.neighbours[u]
        for row, ok in zip(ids.reshape(-1, ids.shape[-1]), valid.reshape(-1, ids.shape[-1])):
            rows[row.numpy().tobytes()] = bool(ok.any())
    assert sum(rows.values()) >= 4
    assert source.stored_rows == sum(rows.values())  # every real neighbour's states came from disk
    assert source.computed_rows == len(rows) - sum(rows.values())  # only a missing neighbour's zeros ran
    mode.state_cache.clear()
    plain, plain_state = generate(mode, model, tokenizer, prompt, 2 * m + 3, collection="plain")
    assert plain_state.cache is mode.state_cache  # no retro memory: the cache alone
    assert with_states.token_ids == plain.token_ids  # same documents, same neighbours: the same text


def test_stored_states_follow_deletes_and_reingests_and_survive_a_restart(setup):
    mode, model, tokenizer, store, reopen = setup
    mode.memories.catch_up("s")
    doc1 = [c for c, rec in zip(store.chunk_ids("s"), store.read_chunks("s", store.chunk_ids("s"))) if rec.doc_id == "doc1"]
    store.delete("s", ["doc1"])
    report = mode.memories.catch_up("s")
    assert report.removed_chunks == len(doc1)
    mem = mode.memories.memory("s")
    assert not set(doc1) & set(mem.chunk_ids().tolist())
    store.ingest("s", [Document("doc1", "an entirely new text about tide pools, anemones and small crabs. " * 3, {})])
    assert mode.memories.catch_up("s").added_rows > 0
    assert sorted(mem.chunk_ids().tolist()) == sorted(store.chunk_ids("s").tolist())
    mode, store = reopen()  # the watermark is durable: a restart finds the memory in step
    assert mode.memories.catch_up("s").added_rows == 0
    assert sorted(mode.memories.memory("s").chunk_ids().tolist()) == sorted(store.chunk_ids("s").tolist())


def test_a_crash_mid_write_and_a_lost_or_unreadable_folder_are_repaired_from_the_store(setup, tiny_retro):
    mode, model, tokenizer, store, reopen = setup
    mode.memories.catch_up("s")
    folder = store.memory_folder("s") / "retro"
    (folder / "seg-999999").mkdir()  # a segment written but never committed by the manifest
    (folder / ".tmp-seg-000123").mkdir()
    mode, store = reopen()
    mem = mode.memories.memory("s")
    assert not (folder / "seg-999999").exists() and not (folder / ".tmp-seg-000123").exists()
    assert mode.memories.catch_up("s").added_rows == 0
    (folder / "manifest.json").write_text("{not json")  # unreadable: rebuilt from LMDB
    mode, store = reopen()
    report = mode.memories.catch_up("s")
    assert report.added_rows == len(store.chunk_ids("s"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["applied_seq"] == store.last_seq("s") and manifest["layers"] == list(tiny_retro.config.layers)
    assert isinstance(mem, NeighbourStateMemory)


def test_the_stored_rows_are_checked_and_compaction_keeps_the_live_ones(tmp_path):
    mem = NeighbourStateMemory.create(tmp_path / "m", layers=(2, 1), length=4, dim=3)
    assert mem.manifest.layers == [1, 2]
    tokens = np.arange(12, dtype=np.int64).reshape(3, 4)
    states = {l: torch.randn(3, 4, 3) for l in (1, 2)}
    with pytest.raises(ValueError, match="layers"):
        mem.add([1, 2, 3], tokens, {1: states[1]})
    with pytest.raises(ValueError, match="shape"):
        mem.add([1, 2, 3], tokens, {1: states[1], 2: states[2][:, :2]})
    assert mem.add([1, 2, 3], tokens, states) == 3
    mem.add([4], tokens[:1] + 100, {l: s[:1] for l, s in states.items()})
    assert mem.delete([2]) == 1 and len(mem) == 3
    mem.compact()
    assert mem.manifest.segments == ["seg-000003"] and sorted(mem.chunk_ids().tolist()) == [1, 3, 4]
    again = NeighbourStateMemory.open(tmp_path / "m")
    got = again.lookup(torch.from_numpy(tokens))
    assert sorted(got) == [0, 2]  # chunk 2's row is gone
    torch.testing.assert_close(got[2][1], states[1][2].half().float())
    with pytest.raises(FileExistsError):
        NeighbourStateMemory.create(tmp_path / "m", layers=(1,), length=4, dim=3)


def test_rows_are_found_by_digest_in_segments_with_and_without_a_keys_file_and_a_collision_reads_nothing_else(
        tmp_path, monkeypatch):
    tokens = np.arange(12, dtype=np.int64).reshape(3, 4)
    states = {1: torch.randn(3, 4, 3)}
    mem = NeighbourStateMemory.create(tmp_path / "m", layers=(1,), length=4, dim=3)
    mem.add([1, 2, 3], tokens, states)
    seg = tmp_path / "m" / mem.manifest.segments[0]
    (seg / "token_keys.npy").unlink()  # a segment written before token_keys.npy existed
    old = NeighbourStateMemory.open(tmp_path / "m")
    got = old.lookup(torch.from_numpy(tokens))
    assert sorted(got) == [0, 1, 2]
    torch.testing.assert_close(got[1][1], states[1][1].half().float())
    old.add([4], tokens[:1] + 50, {1: states[1][:1]})
    old.compact()  # the compacted segment has its keys file again
    assert (tmp_path / "m" / old.manifest.segments[0] / "token_keys.npy").is_file()
    both = torch.from_numpy(np.concatenate([tokens, tokens[:1] + 50]))
    assert sorted(NeighbourStateMemory.open(tmp_path / "m").lookup(both)) == [0, 1, 2, 3]

    # Every digest equal: each row asked for finds the first row; only the row with those ids is read.
    monkeypatch.setattr("memlm.modes.retro.memory.token_keys", lambda t: np.zeros(len(t), dtype=np.uint64))
    collided = NeighbourStateMemory.create(tmp_path / "c", layers=(1,), length=4, dim=3)
    collided.add([1, 2, 3], tokens, states)
    got = NeighbourStateMemory.open(tmp_path / "c").lookup(torch.from_numpy(tokens[::-1].copy()))
    assert sorted(got) == [2]  # tokens[0], asked third
    torch.testing.assert_close(got[2][1], states[1][0].half().float())


def test_a_manager_for_other_cca_layers_rebuilds_the_memory(setup, tiny_retro):
    mode, model, tokenizer, store, _ = setup
    mode.memories.catch_up("s")
    other = NeighbourStateManager(store, model, mode.settings, lambda: dataclasses.replace(tiny_retro.config, layers=(2,)))
    report = other.catch_up("s")  # the layers on disk are not the adapter's: rebuilt, not misread
    assert report.added_rows == len(store.chunk_ids("s"))
    assert json.loads((store.memory_folder("s") / "retro" / "manifest.json").read_text())["layers"] == [2]


def test_retro_search_mode_sets_how_neighbours_are_searched_unless_the_request_names_one(setup):
    mode, model, tokenizer, store, _ = setup
    prompt = "zebra quokka xylophone " * 8  # no word of it is stored: BM25 finds nothing, embeddings always k chunks
    _, state = generate(mode, model, tokenizer, prompt, 2)
    assert state.neighbours and all(bool(valid.any()) for _, valid in state.neighbours.values())  # hybrid: every chunk has neighbours
    mode.settings.search_mode = "lexical"
    try:
        _, state = generate(mode, model, tokenizer, prompt, 2)
        assert all(not bool(valid.any()) for _, valid in state.neighbours.values())  # lexical: no neighbour at all
    finally:
        mode.settings.search_mode = None
