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
from memlm.index.types import Document
from memlm.modes.base import ModeRuntime
from memlm.modes.retro.adapter import RetroAdapter
from memlm.modes.retro.model import RetroConfig
from memlm.modes.retro.mode import Mode
from memlm.modes.retro.settings import Settings

M = 16
RETRO = RetroConfig(chunk_tokens=M, neighbours=2, neighbour_tokens=M, continuation_tokens=M, layers=(1, 3),
                    encoder_layers=1, encoder_dim=32, heads=2, encoder_ffn=64)
TOPICS = ["lighthouse keepers trim the lamp wick every evening before the fog rolls in over the bay",
          "the bakery opens at five and sells rye bread, seed rolls and a dark honey cake on Sundays",
          "glaciers carve valleys slowly, dragging boulders that are left behind when the ice retreats"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bundled_model_dir, run_now, tiny_retro_llama):
    from memlm.config import StoreSettings
    from memlm.index.memory_store import MemoryStore
    from memlm.models.loading import load_tokenizer

    tokenizer = load_tokenizer(bundled_model_dir)
    model, folder, weights = tiny_retro_llama(tmp_path_factory.mktemp("tiny"), tokenizer, RETRO)
    store = MemoryStore.open(tmp_path_factory.mktemp("data"), StoreSettings(min_chunk_tokens=8, default_chunk_tokens=M),
                             tokenizer=tokenizer)
    store.create_collection("c")
    store.ingest("c", [Document(f"doc{i}", (t + ". ") * 3, {"n": i}) for i, t in enumerate(TOPICS)])
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


def test_every_completed_chunk_reads_its_neighbours_from_the_store(setup):
    mode, model, tokenizer, store = setup
    prompt = "Tell me about " + TOPICS[0] + " and then about " + TOPICS[2]
    ids, outcome, hooks, state = generate(mode, model, tokenizer, prompt, 2 * M + 3)
    total = len(ids) + len(outcome.token_ids) - 1  # the last sampled token is never fed
    assert state.phase == (-len(ids)) % M  # the grid ends at the prompt's last token
    assert hooks.chunks_read == (total + state.phase) // M  # every chunk completed and fed
    assert sorted(state.encoded) == list(range(hooks.chunks_read))  # each encoded once, in the forward pass
    live = {d.id: d.text for d in store.get("c", ["doc0", "doc1", "doc2"])}
    assert hooks.citations and all(h.text in live[h.doc_id] for h in hooks.citations)
    assert {h.doc_id for h in hooks.citations} >= {"doc0", "doc2"}  # the topics the prompt names
    assert all(len(b.after_attention) == 0 for b in model.layers)  # the adapter left with the request
    assert mode.adapter().slot.state is None


def test_a_deleted_document_is_gone_from_the_next_generation_and_filters_apply(setup):
    mode, model, tokenizer, store = setup
    prompt = "Tell me about " + TOPICS[1] + " " + TOPICS[1]
    *_, hooks, _ = generate(mode, model, tokenizer, prompt, 4)
    assert "doc1" in {h.doc_id for h in hooks.citations}
    *_, hooks, _ = generate(mode, model, tokenizer, prompt, 4, filter={"n": 0})
    assert {h.doc_id for h in hooks.citations} == {"doc0"}
    store.delete("c", ["doc1"])
    try:
        *_, hooks, _ = generate(mode, model, tokenizer, prompt, 4)
        assert hooks.citations and "doc1" not in {h.doc_id for h in hooks.citations}
    finally:
        store.ingest("c", [Document("doc1", (TOPICS[1] + ". ") * 3, {"n": 1})])


def test_neighbours_change_what_the_model_writes_and_the_plain_model_is_untouched(setup):
    mode, model, tokenizer, store = setup
    from memlm.engine import SamplingParams as SP

    prompt = "Tell me about " + TOPICS[2] + " " + TOPICS[0]
    ids = tokenizer(prompt).input_ids
    *_, plain = generate_tokens(model, tokenizer, ids, SP(max_new_tokens=2 * M), threading.Event(), eos_ids=())
    _, outcome, _, _ = generate(mode, model, tokenizer, prompt, 2 * M)
    assert outcome.token_ids != plain.token_ids  # gates 0.5: the neighbours are read
    *_, again = generate_tokens(model, tokenizer, ids, SP(max_new_tokens=2 * M), threading.Event(), eos_ids=())
    assert again.token_ids == plain.token_ids


def test_requests_it_cannot_serve_are_refused_by_name(setup, tmp_path):
    mode, model, tokenizer, store = setup
    with pytest.raises(FailedPrecondition, match="chunks of 32 tokens"):
        mode.validate(GenerationRequest(prompt="x", collection="wide", memory="retro"), store.collection_config("wide"))
    missing = Mode(mode.runtime, Settings(weights=str(tmp_path / "nothing")))
    assert "no trained weights" in missing.unavailable()
    other = tmp_path / "other-base"
    from memlm.train.weights import save_adapter

    save_adapter(RetroAdapter(model.config, RETRO), other, "someone-else", "sha256:" + "0" * 64, {})
    assert "trained on base model" in Mode(mode.runtime, Settings(weights=str(other))).unavailable()
