"""RETRO measured: held-out perplexity (base, rag with the same neighbours, retro; leak-free and
with leakage), a copy check (facts stated in one stored document), and generation speed (retro
against none, one run; search and encoding per chunk).

    .venv/bin/python benchmarks/retro.py --weights runs/retro-cpu/export [--max-docs 400] [--windows 0]
        [--parts perplexity copy facts speed] [--threads 2] [--model-weights q4_1|dense]

Data: the corpus `memlm train retro` trained on (same --max-docs), its store and neighbour tables
(memlm's cache, retro/; missing held-out rows are searched here). Held-out windows of 512 tokens
(all of them unless --windows); tokens at positions >= 64 are scored (before that RETRO reads
nothing), the same tokens for every method:
- base: the frozen model alone;
- rag: for the tokens of chunk u + 1, the text of chunk u's neighbours (both, continuation
  included) is put before the window's tokens up to there: what RETRO reads, pasted in;
- retro: the adapter reading those neighbours through chunked cross-attention.
"leak-free": neighbours never from the window's own document, only from train documents (how
training searched; the held-out split shares no 13-gram with train); "leakage": the store's own
ranking, the document itself included (RETRO's "with leakage" setting: the held-out documents are
in the store).

Facts: a pass key stated once, in one of the held-out documents put into a fresh store (each
document states another person's key at a random line), asked for with a question shorter than a
chunk (RETRO's grid ends at the prompt, so the question's chunk reads its neighbours): none, rag
(the chunks retro read, pasted before the question) and retro; greedy, correct when the 5 digits
come out. What `memlm ask --memory retro` does over a user's collection.

Speed: a 256-token prompt from the held-out stream (its tokens 256-511), 128 new tokens greedy,
none and retro alternated (3 runs each, median), served as the host serves: the owned model in
--model-weights, the mode's hooks searching the corpus store as chunks complete. retro three
ways: its neighbour-state cache emptied first (cold: every neighbour through the base layers),
after a related prompt (tokens 0-255 just before), and warm (the same prompt just before).
"""
from __future__ import annotations

import argparse
import math
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

CHUNK = 64


def load(args):
    from memlm.models.loading import default_cache_dir, load_model, load_tokenizer, resolve_model_dir
    from memlm.modes.retro.training import prepare
    from memlm.train.corpus import build_corpus
    from memlm.train.data import TokenWindows, corpus_key
    from memlm.train.weights import folder_fingerprint, load_adapter

    folder = resolve_model_dir(None)
    tokenizer = load_tokenizer(folder)
    corpus = build_corpus(folder, ("stdlib", "man", "doc"), args.max_docs, log=lambda m: None)
    model = load_model(folder, weights=args.model_weights)
    adapter = load_adapter(args.weights, model, folder_fingerprint(folder), attach=False).eval().requires_grad_(False)
    windows = TokenWindows(corpus.heldout.tokens, args.seq)
    idx = np.arange(len(windows)) if not args.windows else np.linspace(0, len(windows) - 1, args.windows).round().astype(int)
    root = Path(args.data or default_cache_dir() / "retro")
    tables = None  # the facts part builds its own store: the corpus store and tables only for the others
    if set(args.parts) & {"perplexity", "copy", "speed"}:
        tables = prepare(corpus, adapter.config, tokenizer, root, args.seq, np.zeros(0, np.int64), idx, corpus_key,
                         log=print)
    return folder, tokenizer, corpus, model, adapter, windows, idx, tables, root


@torch.inference_mode()
def window_nll(model, adapter, tokens: torch.Tensor, ids=None, valid=None) -> torch.Tensor:
    """tokens (1, S + 1) -> NLL (S,) of each next token; with ids/valid (1, n, k, r): through RETRO."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if ids is None:
        logits = model(inputs, torch.arange(inputs.shape[1]))
    else:
        with adapter.attached_reading(model, ids, valid):
            logits = model(inputs, torch.arange(inputs.shape[1]))
    return torch.nn.functional.cross_entropy(logits[0].float(), targets[0], reduction="none")


@torch.inference_mode()
def rag_nll(model, tokens: torch.Tensor, ids, valid, sep: list[int]) -> torch.Tensor:
    """The same predictions with the neighbours pasted before the text: for the tokens of chunk
    u + 1 (targets at positions (u+1)*m - 1 ..), chunk u's neighbours' tokens, then the window up
    to there. -> NLL (S,), NaN for the first chunk's targets (not scored)."""
    S = tokens.shape[1] - 1
    out = torch.full((S,), float("nan"))
    for u in range(S // CHUNK):
        lo, hi = (u + 1) * CHUNK - 1, min((u + 2) * CHUNK - 1, S)  # targets read with chunk u's neighbours
        if lo >= S:
            break
        pasted = [int(t) for j in range(ids.shape[2]) for t in ids[0, u, j][valid[0, u, j]]] + sep
        seq = torch.tensor([pasted + tokens[0, : hi + 1].tolist()])
        logits = model(seq[:, :-1], torch.arange(seq.shape[1] - 1))
        n = hi - lo
        out[lo:hi] = torch.nn.functional.cross_entropy(logits[0, -n:].float(), seq[0, -n:], reduction="none")
    return out


def perplexity(args, tokenizer, model, adapter, windows, idx, tables) -> None:
    sep = tokenizer("\n\n").input_ids
    sums = {}
    t0 = time.perf_counter()
    for n, i in enumerate(idx):
        tokens = torch.from_numpy(windows[np.array([i])])  # (1, S + 1)
        scored = slice(CHUNK - 1, None)  # targets from position 63 on: where RETRO reads its first chunk
        rows = {"base": window_nll(model, adapter, tokens)}
        for leak, table in (("leak-free", tables["heldout"]), ("leakage", tables["heldout_leak"])):
            ids, valid = table.get(table.chunks_of_windows(np.array([i]), args.seq))
            rows[f"retro {leak}"] = window_nll(model, adapter, tokens, ids, valid)
            if "rag" in args.methods:
                rows[f"rag {leak}"] = rag_nll(model, tokens, ids, valid, sep)
        for name, nll in rows.items():
            s = sums.setdefault(name, [0.0, 0])
            s[0] += float(nll[scored].sum())
            s[1] += int(nll[scored].numel())
        print(f"  window {n + 1}/{len(idx)} ({time.perf_counter() - t0:.0f} s): "
              + ", ".join(f"{k} {math.exp(v[0] / v[1]):.3f}" for k, v in sums.items()), flush=True)
    base = math.exp(sums["base"][0] / sums["base"][1])
    print(f"\nheld-out perplexity, {len(idx)} windows of {args.seq} tokens, {sums['base'][1]} tokens scored "
          f"(positions >= {CHUNK}):")
    print("| method | perplexity | vs base |")
    print("| --- | --- | --- |")
    for name, (total, count) in sums.items():
        ppl = math.exp(total / count)
        print(f"| {name} | {ppl:.3f} | {100 * (ppl / base - 1):+.1f}% |")


def open_mode(args, folder, tokenizer, model, root, store_folder=None):
    """The retro mode as the host runs it, over the corpus store (held-out documents included)."""
    from concurrent.futures import Future

    from memlm.config import StoreSettings
    from memlm.index.memory_store import MemoryStore
    from memlm.modes.base import ModeRuntime
    from memlm.modes.retro.mode import Mode
    from memlm.modes.retro.settings import Settings

    store = MemoryStore.open(store_folder or root / "store", StoreSettings(), tokenizer=tokenizer)
    torch.set_num_threads(args.threads)  # FAISS set OpenMP's count for this thread to its own (1)

    def on_model(fn):
        f = Future()
        f.set_result(fn())
        return f

    runtime = ModeRuntime(model, tokenizer, folder.name, store, on_model, model_dir=folder)
    return Mode(runtime, Settings(weights=str(args.weights))), store


def copy_check(args, folder, tokenizer, corpus, model, adapter, root) -> None:
    """Facts stated in one stored document: a held-out document's own text (no 13-gram of it is in
    train), prompted with the 48 tokens before a line start, must continue with the document's
    next 8 tokens. none, retro (the prompt's chunk reads its neighbours, the document among the
    candidates) and greedy decoding; exact match of all 8, and of the first 4."""
    from memlm.engine import GenerationRequest, SamplingParams
    from memlm.generation import generate_tokens
    from memlm.modes.retro.training import COLLECTION

    newline = set(tokenizer("\n").input_ids)
    rng = np.random.default_rng(0)
    trials = []
    split = corpus.heldout
    for d in range(split.n_docs):
        toks = split.tokens[split.doc_starts[d] : split.doc_starts[d + 1]].tolist()
        starts = [i + 1 for i, t in enumerate(toks[:-9]) if t in newline and i + 1 >= 48]
        for i in rng.permutation(starts)[: args.copy_per_doc]:
            target = toks[i : i + 8]
            if len(set(target) - newline) >= 4:  # a line with words in it, not a blank run
                trials.append((toks[i - 48 : i], target))
    mode, store = open_mode(args, folder, tokenizer, model, root)
    sampling = SamplingParams(max_new_tokens=8)
    request = GenerationRequest(prompt="x", collection=COLLECTION, memory="retro", sampling=sampling)
    hits = {"none": [0, 0], "retro": [0, 0]}
    try:
        for prompt, target in trials:
            *_, plain = generate_tokens(model, tokenizer, prompt, sampling, threading.Event(), eos_ids=())
            with mode.generation(request, None) as hooks:
                *_, retro = generate_tokens(model, tokenizer, prompt, sampling, threading.Event(), eos_ids=(), hooks=hooks)
            for name, out in (("none", plain), ("retro", retro)):
                got = list(out.token_ids)
                hits[name][0] += got[:8] == target
                hits[name][1] += got[:4] == target[:4]
    finally:
        mode.close()
        store.close()
    n = len(trials)
    print(f"\ncopy check: {n} line continuations from {split.n_docs} held-out documents (stored, unique to them), "
          "8 tokens greedy after 48:")
    for name, (all8, first4) in hits.items():
        print(f"  {name}: all 8 tokens {all8}/{n} ({100 * all8 / n:.0f}%), first 4 {first4}/{n} ({100 * first4 / n:.0f}%)")


FIRST = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Keiko", "Luca",
         "Maya", "Nils", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Talia"]
LAST = ["Moreau", "Okafor", "Lindqvist", "Tanaka", "Ferreira", "Novak", "Haddad", "Schmidt", "Costa", "Ivanova"]


def facts(args, folder, tokenizer, corpus, model, adapter, root) -> None:
    import tempfile

    from memlm.index.types import Document
    from memlm.engine import GenerationRequest, SamplingParams
    from memlm.generation import generate_tokens

    rng = np.random.default_rng(1)
    split = corpus.heldout
    texts = [tokenizer.decode(split.tokens[split.doc_starts[d] : split.doc_starts[d + 1]][:400].tolist(),
                              skip_special_tokens=True) for d in range(split.n_docs)]
    sampling = SamplingParams(max_new_tokens=8)
    hits = {"none": 0, "rag": 0, "retro": 0}
    n = 0
    with tempfile.TemporaryDirectory() as tmp:
        mode, store = open_mode(args, folder, tokenizer, model, root, store_folder=Path(tmp) / "store")
        try:
            for rnd in range(args.fact_rounds):
                names = [f"{a} {b}" for a, b in zip(rng.permutation(FIRST), rng.permutation(LAST * 2))][: len(texts)]
                keys = [str(int(k)) for k in rng.integers(10000, 100000, len(texts))]
                docs = []
                for d, (text, name, key) in enumerate(zip(texts, names, keys)):
                    lines = text.split("\n")
                    at = int(rng.integers(0, len(lines) + 1))
                    lines.insert(at, f"The pass key of {name} is {key}. Remember it: {key}.")
                    docs.append(Document(f"doc-{d}", "\n".join(lines), {}))
                coll = f"facts{rnd}"
                store.ensure_collection(coll)
                store.ingest(coll, docs)
                torch.set_num_threads(args.threads)  # the ingest's FAISS calls set this thread's OpenMP count to 1
                request = GenerationRequest(prompt="x", collection=coll, memory="retro", sampling=sampling,
                                            search_mode=args.search_mode)
                for name, key in zip(names, keys):
                    question = f"What is the pass key of {name}? The pass key of {name} is"
                    ids = tokenizer(question).input_ids
                    *_, plain = generate_tokens(model, tokenizer, ids, sampling, threading.Event(), eos_ids=())
                    with mode.generation(request, None) as hooks:
                        *_, retro = generate_tokens(model, tokenizer, ids, sampling, threading.Event(), eos_ids=(),
                                                    hooks=hooks)
                    pasted = "\n\n".join(h.text for h in hooks.citations) + "\n\n" + question
                    *_, rag = generate_tokens(model, tokenizer, tokenizer(pasted).input_ids, sampling, threading.Event(),
                                              eos_ids=())
                    for method, out in (("none", plain), ("rag", rag), ("retro", retro)):
                        hits[method] += key in tokenizer.decode(list(out.token_ids)).replace(" ", "")
                    n += 1
                    if args.verbose:
                        print(f"  {name} {key}: retro {tokenizer.decode(list(retro.token_ids))!r}")
        finally:
            mode.close()
            store.close()
    print(f"\nfacts: {n} pass keys, each stated once in one of {len(texts)} stored held-out documents "
          f"({args.fact_rounds} rounds), 8 tokens greedy after the question, neighbours by "
          f"{args.search_mode or 'the store default (hybrid)'} search:")
    for method, k in hits.items():
        print(f"  {method}: {k}/{n} ({100 * k / n:.0f}%)")


def speed(args, folder, tokenizer, corpus, model, adapter, root) -> None:
    """none against retro with the neighbour-state cache cold (emptied first), after a related
    prompt (the 256 tokens before this one in the same document: some neighbours repeat), and
    warm (the same prompt just before: every neighbour's base states kept)."""
    from memlm.engine import GenerationRequest, SamplingParams
    from memlm.generation import generate_tokens
    from memlm.modes.retro.training import COLLECTION

    start = corpus.heldout.doc_starts[0]
    related = corpus.heldout.tokens[start : start + 256].tolist()
    prompt_ids = corpus.heldout.tokens[start + 256 : start + 512].tolist()
    mode, store = open_mode(args, folder, tokenizer, model, root)
    sampling = SamplingParams(max_new_tokens=args.new_tokens)
    request = GenerationRequest(prompt="x", collection=COLLECTION, memory="retro", sampling=sampling)
    cache = mode.state_cache
    columns = ("none", "retro cold", "retro after a related prompt", "retro warm")
    rates = {name: [] for name in columns}
    per_chunk, hit_rates = [], {name: [] for name in columns[1:]}

    def retro(prompt):
        with mode.generation(request, None) as hooks:
            *_, out = generate_tokens(model, tokenizer, prompt, sampling, threading.Event(), eos_ids=(), hooks=hooks)
        return out, hooks

    try:
        for run in range(args.runs + 1):
            for name in columns:
                if name != "retro warm":
                    cache.clear()
                if name == "retro after a related prompt":
                    retro(related)
                elif name == "retro warm":
                    retro(prompt_ids)  # the column before left another prompt's states: this one's now
                hits, misses = cache.hits, cache.misses
                t0 = time.perf_counter()
                if name == "none":
                    *_, out = generate_tokens(model, tokenizer, prompt_ids, sampling, threading.Event(), eos_ids=())
                else:
                    out, hooks = retro(prompt_ids)
                dt = time.perf_counter() - t0
                if run:  # the first round warms up
                    rates[name].append(len(out.token_ids) / dt)
                    if name != "none":
                        hit_rates[name].append((cache.hits - hits) / max(1, cache.hits - hits + cache.misses - misses))
                    if name == "retro cold":
                        per_chunk.append((hooks.read_s / max(1, hooks.chunks_read),
                                          hooks.state.encode_s / max(1, hooks.chunks_read), hooks.chunks_read))
    finally:
        mode.close()
        store.close()
    base = statistics.median(rates["none"])
    search_ms = statistics.median(p[0] for p in per_chunk) * 1000
    encode_ms = statistics.median(p[1] for p in per_chunk) * 1000
    print(f"\ngeneration, {len(prompt_ids)}-token prompt, {args.new_tokens} new tokens, greedy, {args.runs} runs, "
          f"weights {args.model_weights}, threads {torch.get_num_threads()}:")
    for name in columns:
        rate = statistics.median(rates[name])
        hit = f", neighbour states cached {statistics.median(hit_rates[name]):.0%}" if name in hit_rates else ""
        print(f"  {name}: {rate:.2f} tok/s" + ("" if name == "none" else f" = {rate / base:.2f}x none (goal >= 0.8x){hit}"))
    print(f"  per chunk, cold (median): search {search_ms:.1f} ms, encode {encode_ms:.1f} ms; {per_chunk[0][2]} chunks per generation")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, help="RETRO adapter folder (adapter.json + adapter.safetensors)")
    p.add_argument("--max-docs", type=int, default=400, help="the corpus of the run (per source)")
    p.add_argument("--data", default=None, help="the run's store and tables (default: memlm's cache, retro/)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--windows", type=int, default=0, help="held-out windows (0: all)")
    p.add_argument("--parts", nargs="+", default=["perplexity", "copy", "facts", "speed"],
                   choices=["perplexity", "copy", "facts", "speed"])
    p.add_argument("--fact-rounds", type=int, default=2, help="facts: collections of all held-out documents (each with a new key), a question per document")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--copy-per-doc", type=int, default=10, help="copy-check line continuations per held-out document")
    p.add_argument("--methods", nargs="+", default=["rag"], help="extra methods beside base and retro: rag")
    p.add_argument("--model-weights", default="q4_1", help="the served model's weight format")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--search-mode", default=None, choices=("dense", "lexical", "hybrid"),
                   help="facts: how retro's neighbours are searched (default: the store's, hybrid)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    folder, tokenizer, corpus, model, adapter, windows, idx, tables, root = load(args)
    if "perplexity" in args.parts:
        perplexity(args, tokenizer, model, adapter, windows, idx, tables)
    if "copy" in args.parts:
        copy_check(args, folder, tokenizer, corpus, model, adapter, root)
    if "facts" in args.parts:
        facts(args, folder, tokenizer, corpus, model, adapter, root)
    if "speed" in args.parts:
        speed(args, folder, tokenizer, corpus, model, adapter, root)


if __name__ == "__main__":
    main()
