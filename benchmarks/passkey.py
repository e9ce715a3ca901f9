"""Pass-key retrieval: does the model find a 5-digit key hidden in N tokens of haystack?

A key ("The pass key is 48213. Remember it. 48213 is the pass key.") is put at a random depth in
a haystack of N tokens, then the model is asked "What is the pass key? The pass key is" and
greedily generates 10 tokens; a trial counts when the key appears in them. Methods:
- none: the haystack's last tokens that fit the context window, then the question (at N <= the
  window this is full-context reading: the upper bound);
- rag: the haystack in 64-token chunks, embedded with the bundled MiniLM; the top-4 chunks for the
  question (in document order) then the question;
- knn: the haystack goes into a KVMemory (all layers built once per trial); the local context is
  ONLY the question; each `--knn` config (memlm.knn_memory presets / overrides) is evaluated on the
  same memory.
Haystacks: "filler" (the same five sentences repeated) and "prose" (varied generated sentences).

    .venv/bin/python benchmarks/passkey.py --lengths 4096 16384 --trials 5
    .venv/bin/python benchmarks/passkey.py --lengths 4096 --trials 4 --methods knn --sweep
    .venv/bin/python benchmarks/passkey.py --time-retrieval

Trials are seeded (seed = N*1000 + 10*trial + [prose]); prints one table.

Figures so far (2 CPU cores under load average 4-5; tiny samples, directions only):
  --lengths 4096 --trials 3 --methods knn --sweep   (stopped after 2 filler trials)
    filler, knn all layers/per-query/k8: 2/2 for every position choice; subsets of layers 0/2;
    per-KV-head 1/2; k4 0/2; k16 2/2.  (details in memlm/knn_memory.py above PRESETS)
  --lengths 4096 --trials 1 --haystacks prose --methods none rag knn \
      --knn default original/all/q/k8 fixed/off0/all/kv/k8 fixed/off0/last_half/q/k8 fixed/off0/all/q/k16
    prose, depth 0.20, 3,896 tokens: none 0/1, rag 1/1, knn default 1/1, original 1/1, per-KV-head 1/1,
    last_half 0/1, k16 0/1.  Seconds: none 81, rag 14, knn build 44 + answer 12 per config.
  N = 16384 and the 5-trial table were NOT run (out of time on the loaded machine).
"""
from __future__ import annotations

import argparse
import random
import re
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace

import torch

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
QUESTION = "What is the pass key? The pass key is"
RAG_K = 4
CHUNK = 64

_SUBJ = ["The old miller", "A young sailor", "The village council", "Her grandmother", "The tired doctor",
         "A travelling merchant", "The quiet librarian", "Our neighbour", "The river pilot", "A clever student"]
_VERB = ["carried", "painted", "repaired", "forgot", "discovered", "sold", "borrowed", "described", "measured", "hid"]
_OBJ = ["a wooden chest", "the broken lantern", "three copper bowls", "an unfinished map", "the winter coats",
        "a basket of apples", "the harbour records", "a silver whistle", "the bell tower", "a stack of letters"]
_WHEN = ["before dawn", "after the storm", "during the festival", "on a cold morning", "late in the evening",
         "while the bread was baking", "as the tide came in", "without telling anyone", "for the second time", "at noon"]
_WHY = ["because the roads were flooded", "so that the children could see it", "although nobody asked",
        "since the market was closed", "and then went home", "and everyone laughed", "which surprised the mayor",
        "as the letter had instructed", "to settle an old argument", "and the dogs barked"]


def haystack_sentences(kind: str, rng: random.Random, n: int) -> list[str]:
    if kind == "filler":
        return [FILLER] * n
    return [f"{rng.choice(_SUBJ)} {rng.choice(_VERB)} {rng.choice(_OBJ)} {rng.choice(_WHEN)} {rng.choice(_WHY)}."
            for _ in range(n)]


def make_haystack(tokenizer, kind: str, n_tokens: int, seed: int) -> tuple[str, str, float]:
    """(text of ~n_tokens tokens with the key inside, the key, depth in [0, 1])."""
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    per = len(tokenizer(" " + haystack_sentences(kind, random.Random(0), 1)[0]).input_ids)
    sents = haystack_sentences(kind, rng, max(1, n_tokens // max(per, 1)))
    depth = rng.uniform(0.05, 0.95)
    at = int(depth * len(sents))
    sents.insert(at, needle)
    return " ".join(sents), key, depth


@torch.inference_mode()  # without it autograd keeps every activation: an 8k prompt took > 24 GB
def greedy(model, ids: list[int], new_tokens: int = 10) -> list[int]:
    from memlm.generation import decode_one_token, new_cache, prefill

    cache = new_cache(model)
    logits = prefill(model, torch.tensor([ids]), cache)
    out = []
    for _ in range(new_tokens):
        tok = logits.argmax(-1, keepdim=True)  # (1, 1)
        out.append(int(tok))
        logits = decode_one_token(model, tok, cache)
    return out


def found(tokenizer, out_ids: list[int], key: str) -> bool:
    return key in re.sub(r"\s", "", tokenizer.decode(out_ids, skip_special_tokens=True))


KNN_CONFIGS = {
    # name: overrides of KNNConfig()  (the sweep for choices (a)-(d))
    "default": {},
}
SWEEP = {
    "fixed/off0/all/q/k8": dict(positions="fixed", local_offset=0),
    "fixed/off64/all/q/k8": dict(positions="fixed", local_offset=64),
    "fixed/off1024/all/q/k8": dict(positions="fixed", local_offset=1024),
    "original/all/q/k8": dict(positions="original"),
    "fixed/off0/all/q/k8/nosink4": dict(positions="fixed", local_offset=0, min_memory_position=4),
    "fixed/off0/every4/q/k8": dict(layers="every4"),
    "fixed/off0/middle_third/q/k8": dict(layers="middle_third"),
    "fixed/off0/last_half/q/k8": dict(layers="last_half"),
    "fixed/off0/first_half/q/k8": dict(layers="first_half"),
    "fixed/off0/all/kv/k8": dict(shared_per_kv_head=True),
    "fixed/off0/all/q/k4": dict(top_k=4),
    "fixed/off0/all/q/k16": dict(top_k=16),
}


def run(args) -> None:
    from memlm.index.kv_memory import KVMemory
    from memlm.knn_memory import KNNConfig, knn_mode, prepare_layer_memories
    from memlm.models.loading import load_causal_lm, load_tokenizer, resolve_model_dir

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(None)
    model, tok = load_causal_lm(model_dir), load_tokenizer(model_dir)
    window = min(int(model.config.max_position_embeddings), args.context)
    q_ids = tok(QUESTION).input_ids
    embedder = None
    knn_configs = dict(SWEEP) if args.sweep else dict(KNN_CONFIGS)
    if args.knn:
        knn_configs = {name: dict(SWEEP.get(name, KNN_CONFIGS.get(name, {}))) for name in args.knn}
    results: dict[tuple, list[bool]] = defaultdict(list)
    times: dict[str, list[float]] = defaultdict(list)

    for n in args.lengths:
        for kind in args.haystacks:
            for trial in range(args.trials):
                seed = n * 1000 + trial * 10 + (kind == "prose")
                text, key, depth = make_haystack(tok, kind, n, seed)
                hay = tok(text).input_ids
                line = [f"N={n} {kind} trial={trial} depth={depth:.2f} tokens={len(hay)} key={key}"]
                if "none" in args.methods:
                    t0 = time.perf_counter()
                    keep = window - len(q_ids) - 16
                    ok = found(tok, greedy(model, hay[-keep:] + tok("\n\n").input_ids + q_ids), key)
                    results[("none", n, kind)].append(ok)
                    times["none"].append(time.perf_counter() - t0)
                    line.append(f"none={int(ok)}")
                if "rag" in args.methods:
                    if embedder is None:
                        from memlm.index.embedding import load_embedder

                        embedder = load_embedder("all-MiniLM-L6-v2")
                    t0 = time.perf_counter()
                    chunks = [hay[i : i + CHUNK] for i in range(0, len(hay), CHUNK)]
                    texts = [tok.decode(c) for c in chunks]
                    vecs = torch.from_numpy(embedder.embed(texts))  # (C, 384)
                    qv = torch.from_numpy(embedder.embed(["What is the pass key?"]))  # (1, 384)
                    top = sorted((vecs @ qv[0]).topk(min(RAG_K, len(chunks))).indices.tolist())
                    ctx = [t for i in top for t in chunks[i]]
                    ok = found(tok, greedy(model, ctx + tok("\n\n").input_ids + q_ids), key)
                    results[("rag", n, kind)].append(ok)
                    times["rag"].append(time.perf_counter() - t0)
                    line.append(f"rag={int(ok)}")
                if "knn" in args.methods:
                    with tempfile.TemporaryDirectory() as td:
                        t0 = time.perf_counter()
                        mem = KVMemory.for_model(td, model, window=args.knn_window, overlap=args.knn_overlap)
                        chunks = [hay[i : i + CHUNK] for i in range(0, len(hay), CHUNK)]
                        mem.build(model, chunks, list(range(len(chunks))))
                        times["knn build"].append(time.perf_counter() - t0)
                        for name, over in knn_configs.items():
                            cfg = replace(KNNConfig(), **over)
                            t0 = time.perf_counter()
                            mems = prepare_layer_memories(model, mem, cfg)
                            with knn_mode(model, mem, cfg, layer_memories=mems):
                                out = greedy(model, q_ids)
                            ok = found(tok, out, key)
                            times[f"knn answer"].append(time.perf_counter() - t0)
                            results[(f"knn:{name}", n, kind)].append(ok)
                            line.append(f"{name}={int(ok)}" + ("" if ok else f"({tok.decode(out)!r})"))
                print(" ".join(line), flush=True)

    print("\n| method | N | haystack | accuracy |")
    print("| --- | --- | --- | --- |")
    for (method, n, kind), oks in results.items():
        print(f"| {method} | {n} | {kind} | {sum(oks)}/{len(oks)} |")
    print("\nmean seconds per trial: " + ", ".join(f"{k} {sum(v) / len(v):.1f}" for k, v in times.items()))


def time_retrieval(n: int = 65536, k: int = 8) -> None:
    """Exact torch matmul+topk vs faiss IndexFlatIP per KV head, ms per call (best of 3 rounds of 10)."""
    import faiss
    import numpy as np

    from memlm.memory_attention import memory_topk

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
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--haystacks", nargs="+", default=["filler", "prose"], choices=["filler", "prose"])
    p.add_argument("--methods", nargs="+", default=["none", "rag", "knn"], choices=["none", "rag", "knn"])
    p.add_argument("--knn", nargs="+", help=f"knn config names to run (from {sorted(SWEEP)} or 'default')")
    p.add_argument("--sweep", action="store_true", help="run every config of the sweep (choices a-d)")
    p.add_argument("--knn-window", type=int, default=1024)
    p.add_argument("--knn-overlap", type=int, default=128)
    p.add_argument("--context", type=int, default=8192, help="context window for the none method")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--time-retrieval", action="store_true")
    args = p.parse_args(argv)
    if args.time_retrieval:
        time_retrieval()
        return
    run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
