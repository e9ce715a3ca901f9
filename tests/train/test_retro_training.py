"""RETRO's training data and a tiny training run on CPU: a generated corpus put into a real store
(`corpus_store`), each chunk's neighbours searched once (`NeighbourTable`) without the chunk's own
documents and without held-out text, and `Trainer` running the RETRO adapter on a tiny random
Llama (the bundled tokenizer's vocabulary) from those tables, checkpointing and resuming exactly."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from memlm.model.llama import Llama, LlamaConfig
from memlm.modes.retro.adapter import RetroAdapter
from memlm.modes.retro.model import RetroConfig
from memlm.modes.retro.neighbours import search_neighbours
from memlm.modes.retro.training import (COLLECTION, NeighbourTable, batch_neighbours, copy_repeats, corpus_store,
                                       neighbour_overlap, plant_spans)
from memlm.train.corpus import SEPARATOR_TOKEN, Corpus, TokenSplit
from memlm.train.trainer import TrainConfig, Trainer

M = 16
RETRO = RetroConfig(chunk_tokens=M, neighbours=2, neighbour_tokens=M, continuation_tokens=M, layers=(1,),
                    encoder_layers=1, encoder_dim=32, heads=2, encoder_ffn=64)
FACTS = ["The river Wend floods every April and the mill at Harrow closes for a week",
         "Copper roofs turn green because the metal reacts with water and carbon dioxide in the air",
         "The observatory on Mount Tell records meteor showers with six cameras pointed at the north sky",
         "Beekeepers smoke the hive before opening it so that the guards do not sound the alarm",
         "A loom weaves the weft across the warp, and the shuttle carries the thread from side to side"]


def split_of(tokenizer, texts: list[str]) -> TokenSplit:
    tokens, starts = [], [0]
    for t in texts:
        tokens += tokenizer(t).input_ids + [SEPARATOR_TOKEN]
        starts.append(len(tokens))
    return TokenSplit(np.asarray(tokens, np.uint16), np.asarray(starts, np.int64))


@pytest.fixture(scope="module")
def corpus_and_store(tmp_path_factory, bundled_model_dir):
    from memlm.models.loading import load_tokenizer

    tokenizer = load_tokenizer(bundled_model_dir)
    # Each fact appears in two train documents, so a chunk's neighbour can come from another document.
    train = [" ".join(FACTS[i:] + FACTS[:i]) + "." for i in range(len(FACTS))] * 2
    heldout = [" ".join(reversed(FACTS)) + ". The end of the held-out text."]
    corpus = Corpus(tmp_path_factory.mktemp("corpus"), split_of(tokenizer, train), split_of(tokenizer, heldout))
    store = corpus_store(corpus, tmp_path_factory.mktemp("store"), tokenizer, log=lambda m: None)
    yield corpus, store, tokenizer
    store.close()


def test_the_store_holds_every_document_and_neighbours_skip_own_and_heldout(corpus_and_store):
    corpus, store, tokenizer = corpus_and_store
    assert store.describe(COLLECTION).documents == corpus.train.n_docs + corpus.heldout.n_docs
    texts = [FACTS[0], FACTS[3]]
    (ids, valid, hits), _ = search_neighbours(store, COLLECTION, texts, RETRO, filter={"split": "train"}, extra=8,
                                              exclude_docs=[{"train/0", "train/5"}, set()])
    assert len(hits) == 2 and not {h.doc_id for h in hits} & {"train/0", "train/5"}
    assert all(h.doc_id.startswith("train/") for h in hits)
    assert ids.shape == (2, RETRO.neighbour_length) and valid[:, :M].all()  # each a whole chunk at least
    first = np.asarray(store.read_chunks(COLLECTION, [hits[0].chunk_id])[0].token_ids)[:M]
    assert (ids[0, : len(first)] == first).all()  # the hit's tokens, then its continuation


def test_the_table_names_a_chunks_documents_and_fills_durably(corpus_and_store, tmp_path):
    corpus, store, tokenizer = corpus_and_store
    table = NeighbourTable(tmp_path / "t", corpus.train, "train", RETRO, {"corpus": "x"})
    starts = corpus.train.doc_starts
    straddling = int(starts[1]) // M  # the chunk holding document 1's first token
    assert table._own_docs(straddling) == ({"train/0", "train/1"} if starts[1] % M else {"train/1"})
    table.fill(np.arange(6), store, tokenizer, batch=4, log=lambda m: None)
    again = NeighbourTable(tmp_path / "t", corpus.train, "train", RETRO, {"corpus": "x"})  # reopened from disk
    assert again.filled[:6].all() and not again.filled[6:].any()
    ids, valid = again.get(np.arange(6))
    assert ids.shape == (6, RETRO.neighbours, RETRO.neighbour_length) and valid.any(-1).all()
    with pytest.raises(ValueError, match="not filled"):
        again.get(np.arange(8))
    with pytest.raises(ValueError, match="was built for"):
        NeighbourTable(tmp_path / "t", corpus.train, "train", RETRO, {"corpus": "y"})


def test_overlap_counts_what_the_next_chunk_takes_from_the_neighbours(corpus_and_store, tmp_path):
    corpus, store, tokenizer = corpus_and_store
    table = NeighbourTable(tmp_path / "t", corpus.train, "train", RETRO, {"corpus": "x"})
    n = len(corpus.train.tokens) // M
    table.fill(np.arange(n), store, tokenizer, log=lambda m: None)
    found = neighbour_overlap(table, np.arange(n))
    assert found.shape == (n,) and ((0 <= found) & (found <= 1)).all() and found[-1] == 0
    assert (found >= 0.2).any()  # every fact is in two train documents: some neighbours hold what follows
    tokens = corpus.train.tokens
    table.ids[3] = 0
    table.ids[3, 0, :M] = tokens[4 * M : 5 * M]  # chunk 3's first neighbour: chunk 4 itself
    table.lengths[3] = (M, 0)
    # the n-grams ending in chunk 4 that lie wholly inside it: all but the 3 that start in chunk 3
    assert neighbour_overlap(table, np.array([3]))[0] >= (M - 3) / M
    table.ids[3, 0, :M] = tokens[4 * M : 5 * M][::-1]  # the same tokens backwards share (almost) no 4-gram
    assert neighbour_overlap(table, np.array([3]))[0] < 0.2
    repeats = copy_repeats(table, np.array([0, 1]), 2 * M, repeat=3)
    assert repeats.tolist() == [3 if found[[0, 1]].mean() >= 0.2 else 1, 3 if found[[2, 3]].mean() >= 0.2 else 1]
    assert copy_repeats(table, np.array([0, 1]), 2 * M, repeat=1).tolist() == [1, 1]


def test_planted_passages_are_the_stream_around_the_next_chunks_start_inside_neighbour_0_and_nothing_else_changes():
    m, r, n = 16, 40, 4
    tokens = np.arange(1000, 1000 + 10 * m)  # token value = stream position + 1000
    chunks = np.array([[0, 1, 2, 3], [5, 6, 7, 8]])
    ids = torch.randint(0, 50, (2, n, 2, r))
    valid = torch.zeros(2, n, 2, r, dtype=torch.bool)
    valid[0, :, :, :30] = True  # window 0: neighbours of 30 tokens; window 1: none at all
    out_ids, out_valid = plant_spans(ids, valid, tokens, chunks, m, 1.0, np.random.default_rng(0), lengths=(4, 8),
                                     context=(2, 5))
    from_first = 0
    for b in range(2):
        for u in range(n):
            changed = (out_ids[b, u] != ids[b, u]).nonzero()
            if u == n - 1:  # the window's last chunk: nothing reads its neighbours inside the window
                assert len(changed) == 0 and torch.equal(out_valid[b, u], valid[b, u])
                continue
            assert (changed[:, 0] == 0).all()  # only neighbour 0
            row = out_ids[b, u, 0].tolist()
            where = [j for j in range(r) if row[j] >= 1000]
            passage = [row[j] - 1000 for j in where]  # stream positions
            assert where == list(range(where[0], where[0] + len(where)))  # one contiguous passage
            assert passage == list(range(passage[0], passage[0] + len(passage)))  # the stream, in order
            nxt = (chunks[b, u] + 1) * m  # the next chunk's first position
            assert nxt + 4 - 1 <= passage[-1] < nxt + m  # ends with a span (>= 4 tokens) of the next chunk
            assert 4 + 2 <= len(passage) <= 8 + 5  # after the text just before it
            from_first += passage[0] < nxt  # reaches back across the chunk boundary: the next chunk's first token
            assert out_valid[b, u, 0, : where[-1] + 1].all() and torch.equal(out_valid[b, u, 1], valid[b, u, 1])
            if b == 0:
                assert where[-1] < 30  # inside the neighbour's own length
    assert 0 < from_first  # some passages teach the next chunk's first token
    assert torch.equal(plant_spans(ids, valid, tokens, chunks, m, 0.0, np.random.default_rng(0))[0], ids)


def test_a_tiny_retro_run_trains_checkpoints_and_resumes_exactly(corpus_and_store, tmp_path):
    corpus, store, tokenizer = corpus_and_store
    config = LlamaConfig(vocab_size=len(tokenizer), dim=64, intermediate_size=128, n_layers=2, n_heads=4,
                         n_kv_heads=2, head_dim=16, max_position_embeddings=128)
    seq = 2 * M
    tables = {"train": NeighbourTable(tmp_path / "train", corpus.train, "train", RETRO, {"corpus": "x"}),
              "heldout": NeighbourTable(tmp_path / "heldout", corpus.heldout, "heldout", RETRO, {"corpus": "x"}),
              "heldout_none": NeighbourTable(tmp_path / "none", corpus.heldout, "heldout", RETRO, {"corpus": "x"})}

    def run(out, stop_after=None, resume=False):
        torch.manual_seed(0)
        model = Llama(config).eval()
        adapter = RetroAdapter(config, RETRO, seed=0)
        cfg = TrainConfig(steps=4, batch=2, micro_batch=1, seq=seq, lr=1e-2, warmup_steps=1, eval_every=2,
                          eval_windows=1, checkpoint_every=1)
        trainer = Trainer(model, adapter, corpus.train, corpus.heldout, cfg, out, "tiny", "sha256:tiny", progress=False,
                          log=lambda m: None)
        for name, t in tables.items():
            windows = trainer.order.pool if name == "train" else trainer.eval_idx
            t.fill(t.chunks_of_windows(windows, seq), store, tokenizer, log=lambda m: None)
        trainer.batch_data = batch_neighbours(tables, seq, torch.device("cpu"))
        tables["heldout_none"].lengths[:] = 0  # searched, then emptied: no chunk has a neighbour
        trainer.extra_evals["eval_loss_no_neighbours"] = "heldout_none"
        if resume:
            assert trainer.resume()
        trainer.fit(stop_after=stop_after)
        return trainer

    straight = run(tmp_path / "a")
    evals = [h for h in straight.history if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 2, 4]
    # the held-out document in the store reads its own chunks: other neighbours, another loss
    # the extra evaluation reads its own table: with no neighbours there, the base model's loss at every step
    assert all(h["eval_loss_no_neighbours"] == evals[0]["eval_loss"] for h in evals)
    assert evals[-1]["eval_loss"] != evals[0]["eval_loss"]
    gates = torch.stack([m.gate.detach() for m in straight.adapter.cca.values()])
    assert bool((gates != 0).all())  # the zero gates learned, every head of every layer
    run(tmp_path / "b", stop_after=2)
    resumed = run(tmp_path / "b", resume=True)
    assert [h["loss"] for h in resumed.history if "loss" in h] == [h["loss"] for h in straight.history if "loss" in h]
    for a, b in zip(straight.adapter.state_dict().values(), resumed.adapter.state_dict().values()):
        assert torch.equal(a, b)
