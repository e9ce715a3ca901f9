"""RETRO over a live store: generation tokens/s of `none` against `retro` (the shipped adapter), with
each chunk's neighbours searched in a real collection, and what stored neighbour states (a
collection made with retro memory on, `memlm.modes.retro.memory`) save against computing them.

    .venv/bin/python benchmarks/retro_store.py [--files 6] [--prompt-tokens 256] [--new-tokens 128]
        [--runs 3] [--threads 2] [--model-weights q4_1] [--search-mode dense|lexical|hybrid]

The collection: --files Python standard-library modules (one document each), ingested twice into
a MemoryStore in a temporary folder (LMDB, FAISS, BM25, MiniLM): "plain" without retro memory and
"states" with it (`memory={"retro": {}}`: every chunk's states built after the ingest, timed). The
prompt: the start of another standard-library module. Columns, each through the retro mode's own
generation hooks (search in the live store, the store's default hybrid search, 2 neighbours):
- none: the plain model;
- retro, computed: over "plain" with the state cache emptied before each run (every neighbour's
  base pass runs: a collection whose chunks were never read);
- retro, stored: over "states" with the state cache emptied (the states read from disk);
- retro, warm: over "plain", every neighbour read in the run before (the state cache's case).
tok/s counts the prefill too (the prompt's own chunks get their neighbours there). Per chunk: the
search, and search + encode (`hooks.memory_s`), in ms.
"""
from __future__ import annotations

import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import Future
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _retro_common import generation_arguments, load_served_model, print_rates, run_summary, stdlib_modules  # noqa: E402


def run_now(fn) -> Future:
    f: Future = Future()
    f.set_result(fn())
    return f


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    p = generation_arguments(__doc__)
    p.add_argument("--files", type=int, default=6, help="standard-library modules in the collection")
    p.add_argument("--search-mode", default=None, choices=("dense", "lexical", "hybrid"),
                   help="the requests' search mode for neighbours (default: the store's, hybrid)")
    args = p.parse_args()

    from memlm.config import StoreSettings
    from memlm.engine import GenerationRequest, SamplingParams
    from memlm.generation import generate_tokens
    from memlm.index.memory_store import MemoryStore
    from memlm.index.types import Document
    from memlm.modes.base import ModeRuntime
    from memlm.modes.retro.mode import Mode
    from memlm.modes.retro.settings import Settings

    folder, tokenizer, model = load_served_model(args)
    texts = stdlib_modules(args.files + 1, args.seed)  # the first is the prompt's
    prompt = tokenizer.decode(tokenizer.encode(texts[0][1])[: args.prompt_tokens])
    ids = tokenizer(prompt).input_ids
    sampling = SamplingParams(max_new_tokens=args.new_tokens)

    with tempfile.TemporaryDirectory() as td, torch.inference_mode():
        store = MemoryStore.open(Path(td) / "data", StoreSettings(), tokenizer=tokenizer)
        runtime = ModeRuntime(model=model, tokenizer=tokenizer, model_name=store.tokenizer_name, store=store,
                              run_on_model=run_now, model_dir=folder)
        mode = Mode(runtime, Settings())
        docs = [Document(name, text) for name, text in texts[1:]]
        store.create_collection("plain")
        store.create_collection("states", memory={"retro": {}})
        store.ingest("plain", docs)
        store.ingest("states", docs)
        chunks = len(store.chunk_ids("states"))
        torch.set_num_threads(args.threads)  # the store's FAISS calls set this thread's OpenMP count to its own
        t0 = time.perf_counter()
        report = mode.memories.catch_up("states")
        build_s = time.perf_counter() - t0
        size = folder_bytes(store.memory_folder("states") / "retro")
        print(f"{len(docs)} documents, {chunks} chunks; neighbour states built in {build_s:.1f} s "
              f"({1000 * build_s / max(1, report.added_rows):.1f} ms per chunk), {size / 2**20:.1f} MiB on disk "
              f"({size / max(1, chunks) / 1024:.0f} KiB per chunk)")

        columns = ("none", "retro, computed", "retro, stored", "retro, warm")
        rates = {c: [] for c in columns}
        search_ms, memory_ms = {c: [] for c in columns[1:]}, {c: [] for c in columns[1:]}

        def run(name: str) -> None:
            if name == "none":
                t0 = time.perf_counter()
                *_, out = generate_tokens(model, tokenizer, ids, sampling, threading.Event(), eos_ids=())
                return len(out.token_ids) / (time.perf_counter() - t0), None
            if name != "retro, warm":
                mode.state_cache.clear()
            collection = "states" if name == "retro, stored" else "plain"
            request = GenerationRequest(prompt=prompt, collection=collection, memory="retro", sampling=sampling,
                                        search_mode=args.search_mode)
            mode.validate(request, store.collection_config(collection))
            t0 = time.perf_counter()
            with mode.generation(request, None) as hooks:
                *_, out = generate_tokens(model, tokenizer, ids, sampling, threading.Event(), eos_ids=(), hooks=hooks)
            return len(out.token_ids) / (time.perf_counter() - t0), hooks

        for i in range(args.runs + 1):  # the first round warms up
            for name in columns:
                rate, hooks = run(name)
                if i:
                    rates[name].append(rate)
                    if hooks is not None:
                        n = max(1, hooks.chunks_read)
                        search_ms[name].append(1000 * hooks.read_s / n)
                        memory_ms[name].append(1000 * hooks.memory_s / n)
        mode.close()
        store.close()

    per_chunk = {column: {name: f"{statistics.median(ms):.1f} ms" for name, ms in times.items()}
                 for column, times in (("search per chunk", search_ms), ("search + encode per chunk", memory_ms))}
    print_rates(f"{run_summary(args)}, neighbours by {args.search_mode or 'the store default (hybrid)'} search, "
                f"medians of {args.runs}:", rates, per_chunk)


if __name__ == "__main__":
    main()
