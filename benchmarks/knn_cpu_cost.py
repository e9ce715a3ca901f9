"""CPU cost of the knn memory mode: building the KV memory, and generating with it.

(a) Ingest. `KVMemory.build` over a corpus of ~1,000-token "stdlib" documents (benchmarks/corpus.py,
    each its own token stream, window 1,024, overlap 128), once per `--layers` set, into a fresh
    folder: tokens/s, against the baseline of the same forward passes with nothing captured or
    written (the decoder stack over the same documents, no LM head; `model.forward_embeds`), in the
    same process. Also bytes per token: `KVMemory.bytes_per_token` (2 x layers x Hkv x D x 2 bytes
    + 12 of row metadata) and the bytes the folder really holds (du) over its tokens.
(b) Generation. The same short prompt, greedy, `--new-tokens` (32) tokens, with no memory (none)
    and with `knn` (preset "ungated": every row searched) over memories of `--memory-tokens` tokens (the cached stdlib
    corpus, see benchmarks/passkey.py; its build is printed as ingest). Prefill and decode are timed
    separately, median of `--repeats`, none and knn alternating:
        prefill tokens/s = prompt tokens / prefill seconds
        decode tokens/s  = (new tokens - 1) / decode seconds   (the first token comes from prefill)
    and the ratio knn / none. Loading the memory (prepare_layer_memories: read, re-rotate, fill the FAISS fp16 indexes) is a
    one-off per memory and reported on its own. knn-gated (the service default, knn.candidate_chunks
    = `--candidate-chunks`, preset "default"): per request, the prompt's top chunks by the store's
    search (`ranking.ChunkRanker`, the service's mode: hybrid) and the preset's following chunks
    of each (`follow_chunks`), their rows read from the
    segment files ("gated load", paid by every request, the search included), then the same
    generation over those rows only.

Full-size run (~15-25 min on a quiet 2-core machine: (a) 4 passes over 16k tokens at ~200-350
tokens/s; (b) the 64k-token stdlib memory from the cache that passkey.py fills, else ~4-6 min to
build it, then ~1-2 min per memory size):

    .venv/bin/python benchmarks/knn_cpu_cost.py --build-tokens 16384 --layers all last_half every4 \\
        --memory-tokens 16384 65536 --new-tokens 32 --repeats 3 --threads 2

Validation (small):
    .venv/bin/python benchmarks/knn_cpu_cost.py --build-tokens 4096 --layers all every4 \\
        --memory-tokens 4096 --repeats 1 --threads 1
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CHUNK_ID_STRIDE, CorpusMemory, default_cache_root  # noqa: E402
from ranking import ChunkRanker, following  # noqa: E402

from memlm.config import StoreSettings  # noqa: E402

PROMPT = "Explain in one paragraph what the standard library offers for reading and writing files:"


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@torch.inference_mode()
def baseline_forward(model, doc_ids: list[list[int]], window: int, overlap: int) -> float:
    """Seconds for the decoder stack over the same windows `KVMemory.build` reads, nothing kept."""
    t0 = time.perf_counter()
    for toks in doc_ids:
        start = 0
        while True:
            piece = torch.tensor([toks[start : start + window]])  # (1, <=window)
            model.forward_embeds(model.embed(piece), torch.arange(piece.shape[1]))
            if start + window >= len(toks):
                break
            start += window - overlap
    return time.perf_counter() - t0


@torch.inference_mode()
def timed_greedy(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of a greedy generation of new_tokens (EOS ignored)."""
    from memlm.generation import PREFILL_CHUNK_TOKENS, open_sequence

    seq = open_sequence(model, len(ids) + new_tokens)  # the host's token loop
    t0 = time.perf_counter()
    tok = seq.prefill(torch.tensor([ids]), PREFILL_CHUNK_TOKENS).argmax(-1, keepdim=True)  # (1, 1)
    t1 = time.perf_counter()
    for _ in range(new_tokens - 1):
        tok = seq.decode(tok).argmax(-1, keepdim=True)
    return t1 - t0, time.perf_counter() - t1


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--build-tokens", type=int, default=16384, help="(a) corpus size for the build throughput")
    p.add_argument("--layers", nargs="+", default=["all"],
                   help="(a) layer sets to build: memlm.modes.knn.reading LAYER_PRESETS names or comma-separated indices")
    p.add_argument("--memory-tokens", type=int, nargs="+", default=[16384, 65536], help="(b) memory sizes")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--knn-window", type=int, default=1024)
    p.add_argument("--knn-overlap", type=int, default=128)
    p.add_argument("--cache-dir", default=str(default_cache_root()))
    p.add_argument("--skip-build", action="store_true", help="only (b)")
    p.add_argument("--skip-generation", action="store_true", help="only (a)")
    p.add_argument("--candidate-chunks", type=int, default=None,
                   help="knn-gated: chunks whose rows are read (default: preset \"default\": 8)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import PRESETS, ReadConfig, gated_rows, knn_mode, prepare_layer_memories, resolve_layers
    from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(None)
    model, tok = load_model(model_dir, model_impl="memlm"), load_tokenizer(model_dir)  # the owned Llama, as the host serves it
    n_layers = model.config.n_layers
    corpus = CorpusMemory(args.cache_dir, "stdlib", model, tok, model_dir, window=args.knn_window,
                          overlap=args.knn_overlap)
    print(f"threads {args.threads}, model {model_dir.name} ({n_layers} layers)", flush=True)

    if not args.skip_build:
        m = corpus.documents_for_tokens(args.build_tokens)
        lists, ids, owners = [], [], []
        for i in range(m):
            for j, c in enumerate(corpus.chunks(i)):
                lists.append(c)
                ids.append(i * CHUNK_ID_STRIDE + j)
                owners.append(i)
        doc_ids = [[t for c in corpus.chunks(i) for t in c] for i in range(m)]
        n_tok = sum(map(len, doc_ids))
        base_s = baseline_forward(model, doc_ids, args.knn_window, args.knn_overlap)
        rows = [("forward only (baseline)", "-", n_tok / base_s, "-", "-", 1.0)]
        for spec in args.layers:
            layers = resolve_layers(spec if "," not in spec and not spec.isdigit() else [int(x) for x in spec.split(",")],
                                    n_layers)
            with tempfile.TemporaryDirectory(dir=args.cache_dir if os.path.isdir(args.cache_dir) else None) as td:
                mem = kv_memory_for_model(Path(td) / "kv", model, layers=layers, window=args.knn_window,
                                         overlap=args.knn_overlap)
                t0 = time.perf_counter()
                built = build_kv_memory(mem, model, lists, ids, documents=owners)
                dt = time.perf_counter() - t0
                disk = folder_bytes(Path(td) / "kv")
                rows.append((f"KV build, layers {spec} ({len(layers)})", len(layers), built / dt, mem.bytes_per_token,
                             disk / built, (built / dt) / (n_tok / base_s)))
            print(f"  built {spec}: {built} tokens in {dt:.1f} s", flush=True)
        print(f"\n(a) ingest of {m} stdlib documents, {n_tok:,} tokens (window {args.knn_window}, overlap {args.knn_overlap})")
        print("| what | layers | tokens/s | bytes/token (formula) | bytes/token (on disk) | x baseline speed |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, nl, tps, bpt, disk_bpt, ratio in rows:
            bpt_s = f"{bpt:,}" if bpt != "-" else "-"
            disk_s = f"{disk_bpt:,.0f}" if disk_bpt != "-" else "-"
            print(f"| {name} | {nl} | {tps:.0f} | {bpt_s} | {disk_s} | {ratio:.2f} |")

    if not args.skip_generation:
        prompt = tok(args.prompt, add_special_tokens=False).input_ids
        m_max = max(corpus.documents_for_tokens(n) for n in args.memory_tokens)
        ingest = corpus.ensure_kv(m_max)
        print(f"memory cache: {ingest['tokens']:,} tokens, built in {ingest['seconds']:.0f} s "
              f"({ingest['tokens'] / max(ingest['seconds'], 1e-9):.0f} tokens/s)"
              + ("" if ingest["built_now"] else ", cached"), flush=True)
        from memlm.index.embedding import load_embedder

        embedder = load_embedder("all-MiniLM-L6-v2")
        corpus.ensure_vectors(m_max, embedder)
        config = ReadConfig.from_name("ungated")
        gated_config = ReadConfig.from_name(
            "default", candidate_chunks=args.candidate_chunks or PRESETS["default"].candidate_chunks)
        table = []
        scratch = Path(args.cache_dir) / "trials"
        scratch.mkdir(parents=True, exist_ok=True)
        for n in args.memory_tokens:
            td = Path(tempfile.mkdtemp(dir=scratch))
            try:
                mem = corpus.trial_memory(td / "kv", corpus.documents_for_tokens(n))
                t0 = time.perf_counter()
                mems = prepare_layer_memories(model, mem, config)
                load_s = time.perf_counter() - t0
                timed_greedy(model, prompt, 2)  # warm-up
                vecs, where = corpus.vectors(corpus.documents_for_tokens(n))
                ranker = ChunkRanker(embedder, vecs, lambda r: tok.decode(corpus.chunks(where[r][0])[where[r][1]]))
                ranker.rank(StoreSettings().search_mode, args.prompt, 1)  # builds the BM25 index (the store keeps one)
                none, knn, gated, gated_load = [], [], [], []
                for _ in range(args.repeats):
                    none.append(timed_greedy(model, prompt, args.new_tokens))
                    with knn_mode(model, mem, config, layer_memories=mems):
                        knn.append(timed_greedy(model, prompt, args.new_tokens))
                    t0 = time.perf_counter()
                    rows = gated_rows(
                        model, mem, gated_config,
                        [where[r] for r in ranker.rank(StoreSettings().search_mode, args.prompt, gated_config.candidate_chunks)],
                        lambda c, n: following(c, n, len(corpus.chunks(c[0]))), lambda c: c[0] * CHUNK_ID_STRIDE + c[1])
                    gated_load.append(time.perf_counter() - t0)
                    with knn_mode(model, mem, gated_config, layer_memories=rows):
                        gated.append(timed_greedy(model, prompt, args.new_tokens))
                table.append((n, len(mem), load_s, none, knn, gated, gated_load))
                del mems
            finally:
                shutil.rmtree(td, ignore_errors=True)
            print(f"  memory {n}: done", flush=True)

        print(f"\n(b) generation, prompt {len(prompt)} tokens, {args.new_tokens} new tokens, greedy, "
              f"median of {args.repeats}; knn = {config}; gated = {gated_config}")
        print("| memory tokens | load s | none prefill tok/s | knn prefill tok/s | prefill ratio "
              "| none decode tok/s | knn decode tok/s | decode ratio | gated load ms | gated decode tok/s | gated ratio |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for n, live, load_s, none, knn, gated, gated_load in table:
            pn = len(prompt) / statistics.median(t[0] for t in none)
            pk = len(prompt) / statistics.median(t[0] for t in knn)
            dn, dk, dg = ((args.new_tokens - 1) / statistics.median(t[1] for t in ts) for ts in (none, knn, gated))
            print(f"| {live:,} | {load_s:.1f} | {pn:.0f} | {pk:.0f} | {pk / pn:.2f} | {dn:.1f} | {dk:.1f} | {dk / dn:.2f} "
                  f"| {statistics.median(gated_load) * 1000:.0f} | {dg:.1f} | {dg / dn:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
