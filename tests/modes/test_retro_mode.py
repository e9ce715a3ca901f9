"""The `retro` mode's generation path on a real store: a tiny random Llama (the bundled tokenizer's
vocabulary) with a RETRO adapter saved as `memlm train` saves one, a real MemoryStore (LMDB, FAISS,
MiniLM), and the token loop the host runs. What is checked is the plumbing the trained weights
rely on: the prompt's chunks get neighbours before the prefill, each completed chunk gets its own
from the live store (a deleted document is gone at once, the request's filter applies), the
citations are the neighbours read, and the model is left as it was."""
from __future__ import annotations

import threading

import pytest
import torch

from memlm.engine import GenerationRequest, SamplingParams
from memlm.errors import FailedPrecondition
from memlm.generation import generate_tokens
from memlm.modes.base import ModeRuntime
from memlm.modes.retro.adapter import RetroAdapter
from memlm.modes.retro.mode import Mode
from memlm.modes.retro.settings import Settings


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bundled_model_dir, run_now, tiny_retro, tiny_retro_llama):
    from memlm.index.memory_store import MemoryStore
    from memlm.models.loading import load_tokenizer

    tokenizer = load_tokenizer(bundled_model_dir)
    model, folder, weights = tiny_retro_llama(tmp_path_factory.mktemp("tiny"), tokenizer, tiny_retro.config)
    store = MemoryStore.open(tmp_path_factory.mktemp("data"), tiny_retro.store_settings(), tokenizer=tokenizer)
    store.create_collection("c")
    store.ingest("c", tiny_retro.documents())
    store.create_collection("wide", chunk_tokens=32)

    runtime = ModeRuntime(model=model, tokenizer=tokenizer, model_name=folder.name, store=store,
                          run_on_model=run_now, model_dir=folder)
    mode = Mode(runtime, Settings(weights=str(weights)))
    yield mode, model, tokenizer, store
    mode.close()
    store.close()


def generate(mode, model, tokenizer, prompt, n, **request):
    r = GenerationRequest(prompt=prompt, collection="c", memory="retro", sampling=SamplingParams(max_new_tokens=n), **request)
    mode.validate(r, mode.runtime.store.collection_config(r.collection))
    ids = tokenizer(prompt).input_ids
    with mode.generation(r, None) as hooks:
        *_, outcome = generate_tokens(model, tokenizer, ids, r.sampling, threading.Event(), eos_ids=(), hooks=hooks)
        state = hooks.state
    return ids, outcome, hooks, state


def test_every_completed_chunk_reads_its_neighbours_from_the_store(setup, tiny_retro):
    mode, model, tokenizer, store = setup
    topics, m = tiny_retro.topics, tiny_retro.chunk_tokens
    prompt = "Tell me about " + topics[0] + " and then about " + topics[2]
    ids, outcome, hooks, state = generate(mode, model, tokenizer, prompt, 2 * m + 3)
    total = len(ids) + len(outcome.token_ids) - 1  # the last sampled token is never fed
    assert state.phase == (-len(ids)) % m  # the grid ends at the prompt's last token
    assert hooks.chunks_read == (total + state.phase) // m  # every chunk completed and fed
    assert sorted(state.encoded) == list(range(hooks.chunks_read))  # each encoded once, in the forward pass
    live = {d.id: d.text for d in store.get("c", ["doc0", "doc1", "doc2"])}
    assert hooks.citations and all(h.text in live[h.doc_id] for h in hooks.citations)
    assert {h.doc_id for h in hooks.citations} >= {"doc0", "doc2"}  # the topics the prompt names
    assert all(len(b.after_attention) == 0 for b in model.layers)  # the adapter left with the request
    assert mode.adapter().slot.state is None


def test_a_deleted_document_is_gone_from_the_next_generation_and_filters_apply(setup, tiny_retro):
    mode, model, tokenizer, store = setup
    prompt = "Tell me about " + tiny_retro.topics[1] + " " + tiny_retro.topics[1]
    *_, hooks, _ = generate(mode, model, tokenizer, prompt, 4)
    assert "doc1" in {h.doc_id for h in hooks.citations}
    *_, hooks, _ = generate(mode, model, tokenizer, prompt, 4, filter={"n": 0})
    assert {h.doc_id for h in hooks.citations} == {"doc0"}
    store.delete("c", ["doc1"])
    try:
        *_, hooks, _ = generate(mode, model, tokenizer, prompt, 4)
        assert hooks.citations and "doc1" not in {h.doc_id for h in hooks.citations}
    finally:
        store.ingest("c", [tiny_retro.documents()[1]])


def test_neighbours_change_what_the_model_writes_and_the_plain_model_is_untouched(setup, tiny_retro):
    mode, model, tokenizer, store = setup
    from memlm.engine import SamplingParams as SP

    topics, m = tiny_retro.topics, tiny_retro.chunk_tokens
    prompt = "Tell me about " + topics[2] + " " + topics[0]
    ids = tokenizer(prompt).input_ids
    *_, plain = generate_tokens(model, tokenizer, ids, SP(max_new_tokens=2 * m), threading.Event(), eos_ids=())
    _, outcome, _, _ = generate(mode, model, tokenizer, prompt, 2 * m)
    assert outcome.token_ids != plain.token_ids  # gates 0.5: the neighbours are read
    *_, again = generate_tokens(model, tokenizer, ids, SP(max_new_tokens=2 * m), threading.Event(), eos_ids=())
    assert again.token_ids == plain.token_ids


def test_requests_it_cannot_serve_are_refused_by_name(setup, tiny_retro, tmp_path):
    mode, model, tokenizer, store = setup
    with pytest.raises(FailedPrecondition, match="chunks of 32 tokens"):
        mode.validate(GenerationRequest(prompt="x", collection="wide", memory="retro"), store.collection_config("wide"))
    missing = Mode(mode.runtime, Settings(weights=str(tmp_path / "nothing")))
    assert "no trained weights" in missing.unavailable()
    other = tmp_path / "other-base"
    from memlm.train.weights import save_adapter

    save_adapter(RetroAdapter(model.config, tiny_retro.config), other, "someone-else", "sha256:" + "0" * 64, {})
    assert "trained on base model" in Mode(mode.runtime, Settings(weights=str(other))).unavailable()
