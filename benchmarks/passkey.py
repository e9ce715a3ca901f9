"""Pass-key retrieval: does the model find a 5-digit key hidden in N tokens of ingested documents?

The haystack is a corpus of documents of ~1,000 tokens each (benchmarks/corpus.py), the leading
documents of one corpus kind that add up to about N tokens. A needle ("The pass key is 48213.
Remember it. 48213 is the pass key.") goes between two sentences/paragraphs of the document at a
random depth in [0.05, 0.95] of the haystack. The model is asked "What is the pass key? The pass
key is" and greedily generates 10 tokens; a trial counts when the key appears in them. Methods:
- none: the last tokens of the concatenated haystack (documents joined by "\\n\\n") that fit the
  context window (8,192 minus the question and a margin), then the question. At N below the
  window this is full-context reading, the upper bound; beyond it the needle is read only when it
  lies in the kept tail (`in_window` on the trial line says whether it did).
- rag: every document in 64-token chunks (the store's Chunker); the top-4 chunks for "What is the
  pass key?" by the store's search (`--retrieval`, default the service's: hybrid MiniLM + BM25,
  `ranking.ChunkRanker`), in document order, then the question.
- knn: the documents in a KVMemory, each its own token stream (as ingest stores them, window
  1,024, overlap 128, all 30 layers); the local context is ONLY the question. Each `--knn` config
  (memlm.modes.knn.reading presets / overrides) is evaluated on the same memory; by default "gated" (the
  service's default: the rows of the 8 chunks the store's search ranks first for the question,
  each with the 2 chunks after it, laid out by rank) and "ungated" (every row searched).
- landmark: the same memory read as blocks (its chunks): at every layer but the first, each query
  head reads the rows of the top-k blocks by its own scores of their representations
  (memlm.modes.landmark.blocks; `--landmark` configs: Quest min/max or mean keys, positions
  in_block or fixed, k); the local context is only the question. The trial line says whether the
  block read most (heads x layers x steps) is one of the needled document's.
Haystack kinds (corpus.HAYSTACK_KINDS): "filler" (five sentences repeated), "prose" (generated
varied sentences), "stdlib" (docstring paragraphs of Python's standard library: real text).

Cost. The K/V and chunk vectors of each kind's un-needled documents are built ONCE into a cache
(~/.cache/memlm/bench, or $MEMLM_BENCH_CACHE, `--cache-dir`) and reused by every trial and
length; this build is the ingest cost and is printed on its own. A trial clones the cached memory
with hard links, tombstones the documents beyond its N and the one that gets the needle
(`KVMemory.delete`), and builds the needled document as its own segment: the live rows are then
exactly what ingesting that corpus would store (checked: live rows == the haystack's tokens). RAG
likewise swaps the needled document's chunk vectors in. Seconds per trial per method exclude the
cache build; knn's include the clone, the needled document's build and loading the memory.

Full-size run (3 kinds x 4 lengths x 20 trials). Measured on the loaded 2-core machine with
--threads 1 (load ~4): KV build ~180 tokens/s; per trial none 29 s at 4k, rag 2.6 s, knn 7.8 s at
4k and 9.0 s at 16k (clone + needled document 5.3, load 0.8, answer 2.5). Extrapolated for a quiet
machine with --threads 2: cache build 20-40 min once (3 x ~131k tokens; ~3 GB of disk per kind at
23 KB/token), none ~30 s per trial at N >= 16k (always a full 8k window), knn ~20-35 s at 128k
(~3 GB of fp16 memory in RAM at 128k): in all ~3-5 h, about half of it none.

    .venv/bin/python benchmarks/passkey.py --lengths 4096 16384 65536 131072 --trials 20 \\
        --haystacks filler prose stdlib --methods none rag knn --threads 2

Validation (small): .venv/bin/python benchmarks/passkey.py --lengths 4096 --trials 1 --threads 1
Other uses:
    .venv/bin/python benchmarks/passkey.py --lengths 4096 --trials 4 --methods knn --sweep
    .venv/bin/python benchmarks/passkey.py --time-retrieval

Trials are seeded (seed = N*1000 + 10*trial + index of the kind in filler, prose, stdlib).
Output: a line per trial, the ingest (cache) table, then accuracy with a 95% Wilson interval and
mean seconds per trial per method.

Earlier figures (the previous version of this script, one haystack re-ingested per trial as a
single stream; 2 CPU cores under load; tiny samples, directions only): filler 4k, knn all
layers/per-query/k8: 2/2 for every position choice; subsets of layers 0/2; per-KV-head 1/2; k4
0/2; k16 2/2 (details in benchmarks/results/knn_presets.md).
"""
from __future__ import annotations

import argparse
import math
import random
import re
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from memlm.config import ModelSettings, StoreSettings
from memlm.model.quantize import WEIGHT_FORMATS
from memlm.modes.knn.reading import PRESETS, ReadConfig, gated_rows, knn_mode, prepare_layer_memories
from memlm.modes.landmark.blocks import blocks_read, load_block_memories

sys.path.insert(0, str(Path(__file__).parent))
from ranking import SEARCH_MODES, ChunkRanker, following  # noqa: E402
from corpus import (  # noqa: E402
    CHUNK_ID_STRIDE,
    HAYSTACK_KINDS,
    CorpusMemory,
    default_cache_root,
    needle_sentence,
    place_needle,
)

QUESTION = "What is the pass key? The pass key is"
RAG_QUERY = "What is the pass key?"
RAG_K = 4
DOC_SEPARATOR = "\n\n"
DEFAULT_RETRIEVAL = StoreSettings().search_mode  # the service's: what rag and the knn gate search with
NEEDLE_CHUNK_BASE = 1 << 40  # chunk ids of a trial's needled document: never a cached document's


@torch.inference_mode()  # without it autograd keeps every activation: an 8k prompt took > 24 GB
def greedy(model, ids: list[int], new_tokens: int = 10) -> list[int]:
    from memlm.generation import PREFILL_CHUNK_TOKENS, open_sequence

    seq = open_sequence(model, len(ids) + new_tokens)  # the host's token loop, either model class
    logits = seq.prefill(torch.tensor([ids]), PREFILL_CHUNK_TOKENS)
    out = []
    for _ in range(new_tokens):
        tok = logits.argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(tok))
        logits = seq.decode(tok)
    return out


def found(tokenizer, out_ids: list[int], key: str) -> bool:
    return key in re.sub(r"\s", "", tokenizer.decode(out_ids, skip_special_tokens=True))


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def _overrides(config: ReadConfig) -> dict:
    """A preset as overrides of ReadConfig()."""
    base = ReadConfig()
    return {f.name: getattr(config, f.name) for f in fields(config) if getattr(config, f.name) != getattr(base, f.name)}


KNN_CONFIGS = {
    # name: overrides of ReadConfig(); run by default
    "gated": _overrides(PRESETS["default"]),  # the service's default preset
    "ungated": _overrides(PRESETS["ungated"]),  # every row of the memory searched
}
SWEEP = {
    # overrides of ReadConfig() (= "ungated", session 2's choice: original positions, prompt after
    # one window, layers 1-29, k 8, per query head, window positions < 4 (sinks) dropped)
    "fixed0-all": dict(layers="all", positions="fixed", local_offset=0, min_memory_position=0),  # session 1's
    "fixed4096": dict(positions="fixed", local_offset=4096),
    "layers-all": dict(layers="all"),
    "layers-upper2of3": dict(layers="upper_two_thirds"),
    "layers-last-half": dict(layers="last_half"),
    "per-kv-head": dict(shared_per_kv_head=True),
    "k4": dict(top_k=4),
    "k16": dict(top_k=16),
    "k32": dict(top_k=32),
    "keep-sinks": dict(min_memory_position=0),
    "chunks4": dict(candidate_chunks=4),
    "chunks8": dict(candidate_chunks=8),
    "chunks16": dict(candidate_chunks=16),
    "chunks32": dict(candidate_chunks=32),
    "chunks64": dict(candidate_chunks=64),
    "chunks4-ranked": dict(candidate_chunks=4, positions="ranked"),
    "chunks8-ranked": dict(candidate_chunks=8, positions="ranked"),
    "chunks32-ranked": dict(candidate_chunks=32, positions="ranked"),
    # session 3's choices within a 16-chunk gate (dense retrieval then)
    "gated-k4": dict(candidate_chunks=16, positions="ranked", top_k=4),
    "gated-k8": dict(candidate_chunks=16, positions="ranked", top_k=8),
    "gated-k16": dict(candidate_chunks=16, positions="ranked", top_k=16),
    "gated-k32": dict(candidate_chunks=16, positions="ranked", top_k=32),
    "gated-k128": dict(candidate_chunks=16, positions="ranked", top_k=128),
    "gated-all": dict(candidate_chunks=16, positions="ranked", top_k=1024),  # every candidate row (16 x 64)
    "gated-original": dict(candidate_chunks=16),
    "gated-layers-all": dict(candidate_chunks=16, positions="ranked", top_k=64, layers="all"),
    "gated-keep-sinks": dict(candidate_chunks=16, positions="ranked", top_k=64, min_memory_position=0),
    "gated16": dict(candidate_chunks=16, positions="ranked", top_k=64),  # session 3's default
    "gated4": dict(candidate_chunks=4, positions="ranked", top_k=64),
    "gated8": dict(candidate_chunks=8, positions="ranked", top_k=64),  # no following chunks
    "gated-follow1": dict(candidate_chunks=8, positions="ranked", top_k=64, follow_chunks=1),
    "gated-follow2": dict(candidate_chunks=8, positions="ranked", top_k=64, follow_chunks=2),  # = "gated"
    "gated4-all": dict(candidate_chunks=4, positions="ranked", top_k=256),  # every row of 4 chunks
    "gated8-all": dict(candidate_chunks=8, positions="ranked", top_k=512),
}


LANDMARK_CONFIGS = {
    # name: memlm.modes.landmark.blocks.load_block_memories options (blocks = the trial memory's chunks)
    "landmark": dict(representation="max", positions="in_block", top_k=4),  # the service's default
    "landmark:trained": dict(representation="trained", positions="in_block", top_k=4),  # --landmark-weights
    "landmark:trained-k8": dict(representation="trained", positions="in_block", top_k=8),
    # the trained landmarks only choose the blocks; the chosen rows enter the one softmax
    "landmark:trained-rows": dict(representation="trained", positions="in_block", top_k=4, grouped=False),
    "landmark:trained-rows-k8": dict(representation="trained", positions="in_block", top_k=8, grouped=False),
    "landmark:max-original": dict(representation="max", positions="original", top_k=4),
    "landmark:max-fixed": dict(representation="max", positions="fixed", top_k=4),
    "landmark:max-k1": dict(representation="max", positions="in_block", top_k=1),
    "landmark:max-k8": dict(representation="max", positions="in_block", top_k=8),
    "landmark:minmax": dict(representation="minmax", positions="in_block", top_k=4),  # Quest's bound
    "landmark:minmax-fixed": dict(representation="minmax", positions="fixed", top_k=4),
    "landmark:minmax-original": dict(representation="minmax", positions="original", top_k=4),
    "landmark:minmax16": dict(representation="minmax", positions="in_block", top_k=4, group=16),
    "landmark:minmax8": dict(representation="minmax", positions="in_block", top_k=4, group=8),
    "landmark:minmax-c32": dict(representation="minmax", positions="in_block", top_k=4, candidates=32),
    "landmark:minmax16-c16": dict(representation="minmax", positions="in_block", top_k=4, group=16, candidates=16),
    "landmark:mean": dict(representation="mean", positions="in_block", top_k=4),  # InfLLM-like mean key
    "landmark:mean8": dict(representation="mean", positions="in_block", top_k=4, group=8),
    "landmark:mean-fixed": dict(representation="mean", positions="fixed", top_k=4),
    "landmark:mean-original": dict(representation="mean", positions="original", top_k=4),
}


class TrialRanker:
    """A trial's haystack chunks ranked for a query as the store's search ranks them
    (`ranking.ChunkRanker`: dense, lexical or hybrid). The needled document `at`'s chunks are
    freshly embedded, the others' vectors come from the cache."""

    def __init__(self, embedder, corpus, m: int, at: int, needled_chunks) -> None:
        vecs, where = corpus.vectors(m)  # (C, 384), (doc, chunk) per row
        rows = [r for r, (i, _) in enumerate(where) if i != at]
        self.cand = [where[r] for r in rows] + [(at, j) for j in range(len(needled_chunks))]
        self.corpus, self.at, self.needled = corpus, at, needled_chunks
        fresh = embedder.embed([self.text(at, j) for j in range(len(needled_chunks))])
        self.ranker = ChunkRanker(embedder, np.concatenate([vecs[rows], fresh]), lambda r: self.text(*self.cand[r]))

    def text(self, i: int, j: int) -> str:
        return self.corpus.tokenizer.decode((self.needled if i == self.at else self.corpus.chunks(i))[j])

    def following(self, chunk: tuple[int, int], n: int) -> list[tuple[int, int]]:
        """The (up to) n chunks after `chunk` in its document."""
        return following(chunk, n, len(self.needled if chunk[0] == self.at else self.corpus.chunks(chunk[0])))

    def rank(self, retrieval: str, query: str, k: int) -> list[tuple[int, int]]:
        """The k best chunks (doc, chunk), best first."""
        return [self.cand[r] for r in self.ranker.rank(retrieval, query, k)]

    def needle_rank(self, retrieval: str, query: str, key: str, k: int = 64) -> str:
        """Rank (0 = best) of the first chunk holding the whole key among the top k, or ">k"."""
        for r, (i, j) in enumerate(self.rank(retrieval, query, k)):
            if i == self.at and key in self.text(i, j).replace(" ", ""):
                return str(r)
        return f">{k}"


def trained_landmarks(model, model_dir, configs, folder=None):
    """The trained landmark adapter when one of `configs` (LANDMARK_CONFIGS names) needs it: from
    `folder`, else the shipped weights; None otherwise."""
    if not any(LANDMARK_CONFIGS[n]["representation"] == "trained" for n in configs):
        return None
    from memlm.modes.landmark.mode import SHIPPED_WEIGHTS
    from memlm.train.weights import folder_fingerprint, load_adapter

    return load_adapter(folder or SHIPPED_WEIGHTS, model, folder_fingerprint(model_dir),
                        attach=False).eval().requires_grad_(False)


def run(args) -> None:
    def label(retrieval) -> str:  # methods on the service's retrieval keep their plain names
        return "" if retrieval in (None, DEFAULT_RETRIEVAL) else f"@{retrieval}"

    from memlm.models.loading import load_model, load_tokenizer, model_facts, resolve_model_dir

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(None)
    model, tok = load_model(model_dir, model_impl=args.model_impl, weights=args.weights), load_tokenizer(model_dir)  # as the host loads it
    landmarks = None
    if "landmark" in args.methods:
        landmarks = trained_landmarks(model, model_dir, args.landmark, args.landmark_weights)
    print(f"model: {'memlm.model' if model_facts(model).owned else 'transformers'}, weights {args.weights}")
    window = min(int(model_facts(model).context_length), args.context)
    q_ids = tok(QUESTION, add_special_tokens=False).input_ids
    sep_ids = tok(DOC_SEPARATOR, add_special_tokens=False).input_ids
    embedder = None
    knn_configs = dict(SWEEP) if args.sweep else dict(KNN_CONFIGS)
    if args.knn:
        unknown = [n for n in args.knn if n not in SWEEP and n not in KNN_CONFIGS]
        if unknown:
            raise SystemExit(f"unknown --knn config(s) {unknown}; known: {sorted(KNN_CONFIGS) + sorted(SWEEP)}")
        knn_configs = {name: dict(SWEEP.get(name, KNN_CONFIGS[name] if name in KNN_CONFIGS else {})) for name in args.knn}
    gated = "knn" in args.methods and any(c.get("candidate_chunks") for c in knn_configs.values())
    if "rag" in args.methods or gated:
        from memlm.index.embedding import load_embedder

        embedder = load_embedder("all-MiniLM-L6-v2")
    results: dict[tuple, list[bool]] = defaultdict(list)
    times: dict[tuple, list[float]] = defaultdict(list)  # (method, N) -> seconds per trial
    knn_parts: dict[str, list[float]] = defaultdict(list)
    ingest: dict[str, dict] = {}
    cache_root = Path(args.cache_dir)
    scratch = cache_root / "trials"  # same file system as the cache: clones are hard links

    for kind in args.haystacks:
        corpus = CorpusMemory(cache_root, kind, model, tok, model_dir, window=args.knn_window,
                              overlap=args.knn_overlap, doc_tokens=args.doc_tokens)
        n_docs = {n: corpus.documents_for_tokens(n) for n in args.lengths}
        most = max(n_docs.values())
        facts = {"docs": most, "tokens": sum(corpus.token_counts(most))}
        if "knn" in args.methods or "landmark" in args.methods:  # landmark reads the same KV memory
            facts["kv"] = corpus.ensure_kv(most)
        if "rag" in args.methods or gated:
            facts["vec"] = corpus.ensure_vectors(most, embedder)
        ingest[kind] = facts

        for n in args.lengths:
            m = n_docs[n]
            docs, counts = corpus.documents(m), corpus.token_counts(m)
            for trial in range(args.trials):
                rng = random.Random(n * 1000 + trial * 10 + HAYSTACK_KINDS.index(kind))
                key = str(rng.randint(10000, 99999))
                needle = needle_sentence(key)
                at, needled, depth = place_needle(docs, counts, rng.uniform(0.05, 0.95), needle, corpus.count_tokens)
                needled_chunks = corpus.chunk(needled)
                doc_ids = [list(t for c in (needled_chunks if i == at else corpus.chunks(i)) for t in c) for i in range(m)]
                hay_tokens = sum(len(d) for d in doc_ids)
                line = [f"N={n} {kind} trial={trial} docs={m} needle_doc={at} depth={depth:.2f} "
                        f"tokens={hay_tokens} key={key}"]
                ranker = TrialRanker(embedder, corpus, m, at, needled_chunks) if embedder is not None else None
                if ranker is not None:
                    line += [f"needle_rank@{r}={ranker.needle_rank(r, QUESTION, key)}" for r in args.retrieval]

                if "none" in args.methods:
                    t0 = time.perf_counter()
                    hay: list[int] = []
                    for i, d in enumerate(doc_ids):
                        hay += (sep_ids if i else []) + d
                    keep = window - len(q_ids) - len(sep_ids) - 16
                    kept = hay[-keep:]
                    in_window = key in tok.decode(kept)
                    ok = found(tok, greedy(model, kept + sep_ids + q_ids), key)
                    results[("none", n, kind)].append(ok)
                    times[("none", n)].append(time.perf_counter() - t0)
                    line.append(f"none={int(ok)}(in_window={int(in_window)})")

                for retrieval in args.retrieval if "rag" in args.methods else ():
                    t0 = time.perf_counter()
                    top = sorted(ranker.rank(retrieval, RAG_QUERY, RAG_K))
                    ctx = [t for i, j in top for t in (needled_chunks if i == at else corpus.chunks(i))[j]]
                    ok = found(tok, greedy(model, ctx + sep_ids + q_ids), key)
                    method = "rag" + label(retrieval)
                    results[(method, n, kind)].append(ok)
                    times[(method, n)].append(time.perf_counter() - t0)
                    line.append(f"{method}={int(ok)}")

                if "knn" in args.methods or "landmark" in args.methods:
                    scratch.mkdir(parents=True, exist_ok=True)
                    td = Path(tempfile.mkdtemp(dir=scratch))
                    try:
                        t0 = time.perf_counter()
                        mem = corpus.trial_memory(td / "kv", m, drop=[at], extra=[(NEEDLE_CHUNK_BASE, needled_chunks)])
                        if len(mem) != hay_tokens:
                            raise AssertionError(f"memory holds {len(mem)} rows, the haystack {hay_tokens} tokens")
                        t_mem = time.perf_counter() - t0
                        knn_parts["clone + needled document"].append(t_mem)
                        mems = None
                        runs = [(name, r) for name, over in knn_configs.items()
                                for r in (args.retrieval if over.get("candidate_chunks") else [None])
                                if "knn" in args.methods]
                        for name, retrieval in runs:
                            cfg = replace(ReadConfig(), **knn_configs[name])
                            t1 = time.perf_counter()
                            if cfg.candidate_chunks:  # the service's chunk gate: the prompt's top chunks by its search
                                read = gated_rows(model, mem, cfg, ranker.rank(retrieval, QUESTION, cfg.candidate_chunks),
                                                  ranker.following, lambda c: NEEDLE_CHUNK_BASE + c[1] if c[0] == at
                                                  else c[0] * CHUNK_ID_STRIDE + c[1])
                            else:  # the whole memory, loaded once per trial for every ungated config
                                if mems is None or replace(mems.config, top_k=cfg.top_k) != cfg:
                                    mems = prepare_layer_memories(model, mem, cfg)
                                for lm in mems.values():
                                    lm.top_k = cfg.top_k
                                read = mems
                            t2 = time.perf_counter()
                            with knn_mode(model, mem, cfg, layer_memories=read):
                                out = greedy(model, q_ids)
                            t3 = time.perf_counter()
                            del read
                            knn_parts["load memory"].append(t2 - t1)
                            knn_parts["answer"].append(t3 - t2)
                            ok = found(tok, out, key)
                            method = f"knn:{name}" + label(retrieval)
                            results[(method, n, kind)].append(ok)
                            times[(method, n)].append(t_mem + (t3 - t1))
                            line.append(f"{method}={int(ok)}" + ("" if ok else f"({tok.decode(out)!r})"))
                        for name in args.landmark if "landmark" in args.methods else ():
                            t1 = time.perf_counter()
                            read, block_ids, _ = load_block_memories(model, mem, layers="all_but_first",
                                                                     landmarks=landmarks, **LANDMARK_CONFIGS[name])
                            t2 = time.perf_counter()
                            with knn_mode(model, mem, read.config, layer_memories=read):
                                out = greedy(model, q_ids)
                            t3 = time.perf_counter()
                            cited = blocks_read(read, block_ids, 1)
                            del read
                            key_blocks = {NEEDLE_CHUNK_BASE + j for j, c in enumerate(needled_chunks)
                                          if any(key[:i] in tok.decode(c).replace(" ", "") for i in (3,))}
                            ok = found(tok, out, key)
                            results[(name, n, kind)].append(ok)
                            times[(name, n)].append(t_mem + (t3 - t1))
                            knn_parts["landmark load"].append(t2 - t1)
                            knn_parts["landmark answer"].append(t3 - t2)
                            top = "needle" if cited and cited[0][0] in key_blocks else "other"
                            line.append(f"{name}={int(ok)}(most-read block: {top})" + ("" if ok else f"({tok.decode(out)!r})"))
                    finally:
                        shutil.rmtree(td, ignore_errors=True)
                print(" ".join(line), flush=True)

    print("\nIngest (the cache, built once per kind; reused by later runs):")
    print("| haystack | documents | tokens | KV memory build | tokens/s | bytes/token | chunk vectors |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for kind, f in ingest.items():
        kv, vec = f.get("kv"), f.get("vec")
        kv_s = f"{kv['seconds']:.0f} s" + ("" if kv["built_now"] else " (cached)") if kv else "-"
        tps = f"{kv['tokens'] / kv['seconds']:.0f}" if kv and kv["seconds"] else "-"
        bpt = f"{kv['bytes_per_token']:,}" if kv else "-"
        print(f"| {kind} | {f['docs']} | {f['tokens']:,} | {kv_s} | {tps} | {bpt} | "
              + (f"{vec['seconds']:.0f} s" if vec else "-") + " |")

    print("\n| method | N | haystack | accuracy | 95% Wilson |")
    print("| --- | --- | --- | --- | --- |")
    by_method_n: dict[tuple, list[bool]] = defaultdict(list)
    for (method, n, kind), oks in results.items():
        lo, hi = wilson(sum(oks), len(oks))
        print(f"| {method} | {n} | {kind} | {sum(oks)}/{len(oks)} | {lo:.2f}-{hi:.2f} |")
        by_method_n[(method, n)] += oks
    if len(args.haystacks) > 1:
        for (method, n), oks in by_method_n.items():
            lo, hi = wilson(sum(oks), len(oks))
            print(f"| {method} | {n} | all | {sum(oks)}/{len(oks)} | {lo:.2f}-{hi:.2f} |")
    print("\nmean seconds per trial (cache build excluded):")
    print("| method | N | s/trial |")
    print("| --- | --- | --- |")
    for (method, n), ts in times.items():
        print(f"| {method} | {n} | {sum(ts) / len(ts):.1f} |")
    if knn_parts:
        print("knn parts, mean s: " + ", ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in knn_parts.items()))


def time_retrieval(n: int = 65536, k: int = 8) -> None:
    """Exact torch matmul+topk vs faiss IndexFlatIP per KV head, ms per call (best of 3 rounds of 10)."""
    import faiss
    import numpy as np

    from memlm.modes.knn.attention import memory_topk

    torch.manual_seed(0)
    hkv, g, d = 3, 3, 64
    mem_k = torch.randn(hkv, n, d)
    indexes = []
    for h in range(hkv):
        ix = faiss.IndexFlatIP(d)
        ix.add(mem_k[h].numpy())
        indexes.append(ix)

    def best(f):
        f()
        out = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(10):
                f()
            out.append((time.perf_counter() - t0) / 10 * 1e3)
        return min(out)

    for tq in (1, 32):
        q = torch.randn(1, hkv * g, tq, d)
        qn = [np.ascontiguousarray(q[0].view(hkv, g * tq, d)[h].numpy()) for h in range(hkv)]
        t_torch = best(lambda: memory_topk(q, mem_k, k))
        t_faiss = best(lambda: [indexes[h].search(qn[h], k) for h in range(hkv)])
        print(f"N={n} Tq={tq}: torch {t_torch:.2f} ms, faiss IndexFlatIP {t_faiss:.2f} ms per layer call")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384, 65536, 131072])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--haystacks", nargs="+", default=list(HAYSTACK_KINDS), choices=list(HAYSTACK_KINDS))
    p.add_argument("--methods", nargs="+", default=["none", "rag", "knn"], choices=["none", "rag", "knn", "landmark"])
    p.add_argument("--landmark", nargs="+", default=["landmark"], choices=sorted(LANDMARK_CONFIGS),
                   help="landmark configs to run (block representation, positions, blocks per head)")
    p.add_argument("--landmark-weights", default=None,
                   help="trained landmarks for landmark:trained* (an adapter folder; default: the shipped ones)")
    p.add_argument("--knn", nargs="+", help=f"knn config names to run (from {sorted(KNN_CONFIGS) + sorted(SWEEP)})")
    p.add_argument("--retrieval", nargs="+", default=[DEFAULT_RETRIEVAL], choices=SEARCH_MODES,
                   help="how rag and the knn chunk gate rank chunks (the store's search modes); methods on "
                        "another than the service's default get an @mode suffix")
    p.add_argument("--sweep", action="store_true", help="run every config of the sweep (choices a-d)")
    p.add_argument("--knn-window", type=int, default=1024)
    p.add_argument("--knn-overlap", type=int, default=128)
    p.add_argument("--doc-tokens", type=int, default=1000, help="tokens per haystack document (about)")
    p.add_argument("--context", type=int, default=8192, help="context window for the none method")
    p.add_argument("--cache-dir", default=str(default_cache_root()), help="where the ingested corpora are kept")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--model-impl", default="auto", choices=["auto", "memlm", "transformers"],
                   help="ModelSettings.model_impl: the owned Llama (auto, for the bundled model) or transformers")
    p.add_argument("--weights", default=ModelSettings().weights, choices=WEIGHT_FORMATS,
                   help="the owned model's weight format (memlm.model.quantize); default: the served default")
    p.add_argument("--time-retrieval", action="store_true")
    args = p.parse_args(argv)
    if args.time_retrieval:
        time_retrieval()
        return
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
