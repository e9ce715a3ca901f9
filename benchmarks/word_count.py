"""Negative control for block retrieval: count how often a word occurs across the memory.

Pass key needs one block; this needs every block that holds the word. A haystack of ~N tokens of
"prose" documents (benchmarks/corpus.py, ~1,000 tokens each) gets the sentence "A zebra walked past
the gate." planted M times at random sentence boundaries; the model is asked "How many times is a
zebra mentioned in the text above?" and greedily answers ("A zebra is mentioned ..."); the first
number in the answer (digits, one..twelve, once, twice) is its count. Methods:
- full: the whole haystack in context, then the question (N must fit the 8k window): what the
  model can count when it sees everything, the ceiling of any memory;
- none: the question alone: the guess a model makes with nothing;
- knn: the haystack as KV memory (ungated: every row searched, the top 8 per head), local context
  the question only;
- landmark: the same memory as blocks (the service's default: each head reads its 4 best blocks).
For landmark the table also says what block retrieval delivered: of the M planted blocks, the
share any head read at any layer during the answer ("planted read"), and the share of the memory
attention the answer's decode steps put on them ("mass on planted"). With M above the blocks a
head reads (k = 4) no single head can see every occurrence: the structural limit this measures.

    .venv/bin/python benchmarks/word_count.py --tokens 2048 --counts 1 2 3 5 8 --trials 3 --threads 2

Trials are seeded (seed = 1000 * M + trial).
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CHUNK_ID_STRIDE, CHUNK_TOKENS, PackedDocument, pack_documents  # noqa: E402
from passkey import greedy  # noqa: E402

WORD = "zebra"
PLANT = "A zebra walked past the gate."
QUESTION = "\n\nQuestion: How many times is a zebra mentioned in the text above?\nAnswer: A zebra is mentioned"
NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve".split())}
NUMBERS.update(once=1, twice=2, thrice=3)
METHODS = ("full", "none", "knn", "landmark")


def parse_count(text: str) -> int | None:
    """The first number in an answer: digits or a number word; None if there is none."""
    m = re.search(r"\d+|\b(" + "|".join(NUMBERS) + r")\b", text.lower())
    if m is None:
        return None
    return int(m.group()) if m.group().isdigit() else NUMBERS[m.group()]


def plant(docs: list[PackedDocument], m: int, rng: random.Random) -> list[PackedDocument]:
    """`docs` with PLANT inserted at m distinct random unit boundaries (spread over all documents)."""
    slots = [(d, u) for d, doc in enumerate(docs) for u in range(1, len(doc.units))]
    chosen = set(rng.sample(slots, m))
    out = []
    for d, doc in enumerate(docs):
        units = []
        for u, unit in enumerate(doc.units):
            if (d, u) in chosen:
                units.append(PLANT)
            units.append(unit)
        out.append(PackedDocument(tuple(units), doc.separator))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=2048, help="haystack tokens (whole ~1,000-token documents)")
    p.add_argument("--counts", type=int, nargs="+", default=[1, 2, 3, 5, 8], help="occurrences planted")
    p.add_argument("--trials", type=int, default=3, help="trials per count")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--new-tokens", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from memlm.index.chunking import Chunker
    from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import ReadConfig, knn_mode, prepare_layer_memories
    from memlm.modes.landmark.blocks import blocks_read, load_block_memories
    from memlm.modes.landmark.settings import Settings as LandmarkSettings

    model_dir = resolve_model_dir(None)
    model, tok = load_model(model_dir, model_impl="memlm"), load_tokenizer(model_dir)
    chunker = Chunker(tok, CHUNK_TOKENS)
    ls = LandmarkSettings()
    n_docs = max(1, round(args.tokens / 1000))
    q_ids = tok(QUESTION, add_special_tokens=False).input_ids
    right: dict[tuple[str, int], list[bool]] = defaultdict(list)
    errors: dict[tuple[str, int], list[int]] = defaultdict(list)
    planted_read: dict[int, list[float]] = defaultdict(list)
    planted_mass: dict[int, list[float]] = defaultdict(list)
    seconds: dict[str, float] = defaultdict(float)
    print(f"{n_docs} prose documents of ~1,000 tokens, '{PLANT}' planted M times; threads {args.threads}", flush=True)
    for m in args.counts:
        for trial in range(args.trials):
            rng = random.Random(1000 * m + trial)
            docs = plant(pack_documents("prose", n_docs, chunker.count_tokens, seed=1000 * m + trial), m, rng)
            chunks = [[c.token_ids for c in chunker.chunk(d.text)] for d in docs]
            planted = {i * CHUNK_ID_STRIDE + j for i, cs in enumerate(chunks) for j, c in enumerate(cs)
                       if WORD in tok.decode(c)}
            n_tok = sum(len(c) for cs in chunks for c in cs)
            line = [f"M={m} trial {trial} ({n_tok} tokens, {len(planted)} planted blocks):"]
            with tempfile.TemporaryDirectory() as td:
                mem = None
                if {"knn", "landmark"} & set(args.methods):
                    mem = kv_memory_for_model(Path(td) / "kv", model)
                    lists = [c for cs in chunks for c in cs]
                    ids = [i * CHUNK_ID_STRIDE + j for i, cs in enumerate(chunks) for j in range(len(cs))]
                    owners = [i for i, cs in enumerate(chunks) for _ in cs]
                    build_kv_memory(mem, model, lists, ids, documents=owners)
                for method in args.methods:
                    t0 = time.perf_counter()
                    if method == "full":
                        ids = tok("\n\n".join(d.text for d in docs), add_special_tokens=False).input_ids + q_ids
                        out = greedy(model, ids, args.new_tokens)
                    elif method == "none":
                        out = greedy(model, q_ids, args.new_tokens)
                    elif method == "knn":
                        config = ReadConfig.from_name("ungated")
                        with knn_mode(model, mem, config, layer_memories=prepare_layer_memories(model, mem, config)):
                            out = greedy(model, q_ids, args.new_tokens)
                    else:
                        read, block_ids, _ = load_block_memories(
                            model, mem, layers=ls.layers, top_k=ls.top_k, representation=ls.representation,
                            positions=ls.positions, group=ls.group, candidates=ls.candidates,
                            min_memory_position=ls.min_memory_position)
                        with knn_mode(model, mem, read.config, layer_memories=read):
                            out = greedy(model, q_ids, args.new_tokens)
                        shares = dict(blocks_read(read, block_ids))
                        reads = sum(m_.store.reads for m_ in read.values())
                        was_read = {int(block_ids[i]) for i in torch.nonzero(reads).flatten().tolist()}
                        planted_read[m].append(len(planted & was_read) / max(1, len(planted)))
                        planted_mass[m].append(sum(shares.get(c, 0.0) for c in planted))
                    seconds[method] += time.perf_counter() - t0
                    text = tok.decode(out, skip_special_tokens=True)
                    got = parse_count(text)
                    right[(method, m)].append(got == m)
                    errors[(method, m)].append(abs(got - m) if got is not None else m)
                    line.append(f"{method}={got}({text.strip()[:30]!r})")
            print(" ".join(line), flush=True)

    n = len(args.counts) * args.trials
    print(f"\nexact counts, per M planted ({args.trials} trials each); mean |error| in brackets (no number = M)")
    print("| method | " + " | ".join(f"M={m}" for m in args.counts) + " | s/trial |")
    print("| --- | " + " | ".join("---" for _ in args.counts) + " | --- |")
    for method in args.methods:
        cells = [f"{sum(right[(method, m)])}/{len(right[(method, m)])} "
                 f"({sum(errors[(method, m)]) / len(errors[(method, m)]):.1f})" for m in args.counts]
        print(f"| {method} | " + " | ".join(cells) + f" | {seconds[method] / n:.1f} |")
    if "landmark" in args.methods:
        print(f"| landmark: planted read | " + " | ".join(
            f"{100 * sum(planted_read[m]) / len(planted_read[m]):.0f}%" for m in args.counts) + " | |")
        print(f"| landmark: mass on planted | " + " | ".join(
            f"{100 * sum(planted_mass[m]) / len(planted_mass[m]):.0f}%" for m in args.counts) + " | |")


if __name__ == "__main__":
    main(sys.argv[1:])
