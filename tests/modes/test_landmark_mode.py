"""The `landmark` mode on a real store with the bundled model: the block memory is built as
derived data (its own folder, its own watermark), the model's heads pick the block that states the
fact and copy it, the citations are the blocks read most, and a deleted document is gone from what
the next generation can read."""
from __future__ import annotations

import threading

import pytest

from memlm.engine import GenerationRequest, SamplingParams
from memlm.errors import FailedPrecondition, InvalidArgument
from memlm.generation import generate_tokens
from memlm.index.types import Document
from memlm.modes.base import ModeRuntime
from memlm.modes.landmark.mode import Mode
from memlm.modes.landmark.settings import Settings

FILLER = "The corridor is long and quiet. Lamps hang from the ceiling. The floor is made of stone. "
QUESTION = "What is the pass key of the north door? The pass key of the north door is"


GARDEN = ("The garden behind the house has roses, tulips and a small pond with goldfish. A gardener comes on "
          "Tuesdays to trim the hedges and rake the gravel paths. ") * 4


def door(name: str, key: str) -> str:
    return FILLER * 3 + f"The pass key of the {name} door is {key}. " + FILLER * 3


@pytest.fixture(scope="module")
def setup(tmp_path_factory, bundled_model_dir, run_now):
    from memlm.config import StoreSettings
    from memlm.index.memory_store import MemoryStore
    from memlm.models.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(bundled_model_dir)
    model = load_model(bundled_model_dir)
    store = MemoryStore.open(tmp_path_factory.mktemp("data"), StoreSettings(), tokenizer=tokenizer)
    store.create_collection("doors", memory={"landmark": {}})
    store.create_collection("plain")
    store.create_collection("both", memory={"knn": {}, "landmark": {}})
    store.ingest("both", [Document("north", door("north", "48213")), Document("garden", GARDEN)])
    store.ingest("doors", [Document("north", door("north", "48213")), Document("garden", GARDEN)])

    runtime = ModeRuntime(model=model, tokenizer=tokenizer, model_name=bundled_model_dir.name, store=store,
                          run_on_model=run_now, model_dir=bundled_model_dir)
    mode = Mode(runtime, Settings())
    yield mode, model, tokenizer, store
    store.close()


def generate(mode, model, tokenizer, **request):
    r = GenerationRequest(prompt=QUESTION, collection="doors", memory="landmark", sampling=SamplingParams(max_new_tokens=8),
                          **request)
    mode.validate(r, mode.runtime.store.collection_config(r.collection))
    ids = tokenizer(QUESTION).input_ids
    with mode.generation(r, None) as hooks:
        *_, out = generate_tokens(model, tokenizer, ids, r.sampling, threading.Event(), eos_ids=(), hooks=hooks)
        citations = hooks.citations
    return tokenizer.decode(out.token_ids), citations


def test_the_heads_read_the_block_that_states_the_fact(setup):
    mode, model, tokenizer, store = setup
    text, citations = generate(mode, model, tokenizer)
    assert "48213" in text, text
    assert citations and "48213" in citations[0].text and citations[0].doc_id == "north"
    assert all(c.doc_id in {"north", "garden"} for c in citations)
    assert store.describe("doors").memory_lag == {"landmark": 0}
    assert (store.memory_folder("doors") / "kv-landmark" / "manifest.json").is_file()
    assert model.layers[1].attention.backend.__class__.__name__ == "SDPABackend"  # left as it was


def test_a_deleted_document_is_gone_from_the_next_generation(setup):
    mode, model, tokenizer, store = setup
    store.ingest("doors", [Document("north", door("north", "62947"))])  # re-ingest: a new key
    text, citations = generate(mode, model, tokenizer)
    assert "62947" in text and "48213" not in text, text
    assert "62947" in citations[0].text
    store.delete("doors", ["north"])
    text, citations = generate(mode, model, tokenizer)
    assert "62947" not in text and "48213" not in text, text
    assert citations and all(c.doc_id == "garden" for c in citations)


def test_requests_it_cannot_serve_are_refused(setup):
    mode, model, tokenizer, store = setup
    from memlm.index.types import Condition, Filter

    with pytest.raises(InvalidArgument, match="filter"):
        mode.validate(GenerationRequest(prompt="x", collection="doors", memory="landmark",
                                        filter=Filter(must=(Condition("a", equals=1),))), None)
    with pytest.raises(FailedPrecondition, match="no landmark memory"):
        mode.validate(GenerationRequest(prompt="x", collection="plain", memory="landmark"), None)


def test_a_collection_with_knn_and_landmark_keeps_one_memory_both_read(setup):
    from memlm.modes.knn.mode import Mode as KnnMode
    from memlm.modes.knn.settings import Settings as KnnSettings

    mode, model, tokenizer, store = setup
    knn = KnnMode(mode.runtime, KnnSettings(preset="ungated"))
    r = GenerationRequest(prompt=QUESTION, collection="both", memory="landmark", sampling=SamplingParams(max_new_tokens=8))
    with mode.generation(r, None) as hooks:
        *_, out = generate_tokens(model, tokenizer, tokenizer(QUESTION).input_ids, r.sampling, threading.Event(),
                                  eos_ids=(), hooks=hooks)
    assert "48213" in tokenizer.decode(out.token_ids)
    assert knn.memories.memory("both") is mode.memories.memory("both")  # one object, one folder
    assert knn.memories.catch_up("both").added_rows == 0  # landmark's catch-up built it
    folder = store.memory_folder("both")
    assert (folder / "kv" / "manifest.json").is_file() and not (folder / "kv-landmark").exists()
    assert store.describe("both").memory_lag == {"knn": 0, "landmark": 0}


def test_trained_landmarks_load_from_their_weights_and_refuse_without(setup, tmp_path, bundled_model_dir):
    """representation 'trained' reads the blocks through landmark keys computed by the adapter in
    landmark.weights (here an untrained one: the wiring, not the quality); no weights there is a
    FailedPrecondition naming the folder."""
    from memlm.modes.landmark.adapter import LandmarkAdapter
    from memlm.train.weights import folder_fingerprint, save_adapter

    mode, model, tokenizer, store = setup
    save_adapter(LandmarkAdapter(model.config), tmp_path / "lm", bundled_model_dir.name,
                 folder_fingerprint(bundled_model_dir), {})
    trained = Mode(mode.runtime, Settings(representation="trained", weights=str(tmp_path / "lm")))
    text, citations = generate(trained, model, tokenizer)
    assert citations and all(c.doc_id in {"north", "garden"} for c in citations)
    _, memories, _, offset = trained.block_memories("doors")
    assert offset == 64 and memories[1].store.representation == "trained"
    assert memories[29].store.reps["rep_k"].shape[1] == len(memories[29].store.rows)  # one landmark key per block
    missing = Mode(mode.runtime, Settings(representation="trained", weights=str(tmp_path / "none")))
    with pytest.raises(FailedPrecondition, match="no trained weights"):
        generate(missing, model, tokenizer)
