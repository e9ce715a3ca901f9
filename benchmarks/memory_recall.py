"""Memory recall: perplexity of the continuation of an ingested document, given a short prefix.

Several documents of ~1,500 tokens (half "stdlib" docstring text, half "prose"; benchmarks/corpus.py)
are ingested together: each cut into 64-token chunks, all of them in ONE KVMemory (each document
its own token stream, window 1,024, overlap 128, all layers) and, for rag, their chunks embedded
with the bundled MiniLM. For each document the scored span is its tokens [S, S+256) with
S = `--span-start` (default 1024), and the local context is the `--prefix` (64) tokens just before
it. The span is scored by teacher forcing, one forward pass, under:
- none:  the 64-token prefix only;
- knn:   the same prefix, with the KV memory of all documents (memlm.modes.knn.reading, default config)
         read whole (ungated: every row is searched);
- knn-gated: the same, reading only the rows of the top `--candidate-chunks` (8) chunks retrieved
         with the prefix's text, "ranked" positions (the service's default, preset "default");
- landmark: the same KV memory read as blocks (its 64-token chunks; memlm.modes.landmark.blocks,
         the service's default: every layer but the first, each query head reads the rows of its 4
         best blocks, scored by their best row, positions in_block);
- landmark-trained: the same blocks chosen and read through the trained landmarks (the shipped
         weights, or --landmark-weights; representation "trained": grouped softmax over each head's
         4 best landmarks);
- rag:   the top-4 64-token chunks of the whole corpus retrieved with the prefix's text as the query
         (in corpus order), "\\n\\n", then the prefix;
- full:  every token of the document before the span (S tokens): what reading the document in
         context gives.
rag and knn-gated rank chunks as the store's search does, by `--retrieval` (default: the
service's, hybrid: MiniLM + BM25 fused by reciprocal rank; `ranking.py`).
The scored span is itself in memory for knn and in the chunk index for rag: this measures
memorisation recall (can the model reproduce what it was given?), not generalisation. full sees
only what comes before the span, so knn or rag may beat it. With `--span-start 64` the prefix is
the document's first 64 tokens and full equals none.

Perplexity = exp(mean negative log-likelihood over the span's tokens); per kind it pools all
tokens of that kind's documents (and "all" every document). Each document's line is printed.

Full-size run (~5-10 min on a quiet 2-core machine: ingest of 8 x ~1,500 tokens ~1 min, then
~15 s per document for the four methods; 2 documents took 80 s in all with --threads 1 under load):

    .venv/bin/python benchmarks/memory_recall.py --docs 8 --threads 2

Validation (small): .venv/bin/python benchmarks/memory_recall.py --docs 2 --threads 1
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn.functional as F

from memlm.config import StoreSettings

sys.path.insert(0, str(Path(__file__).parent))
from corpus import CHUNK_ID_STRIDE, CHUNK_TOKENS, pack_documents  # noqa: E402
from ranking import SEARCH_MODES, ChunkRanker, following  # noqa: E402

RAG_K = 4
SEPARATOR = "\n\n"
METHODS = ("none", "knn", "knn-gated", "landmark", "landmark-trained", "rag", "full")


@torch.inference_mode()
def span_nll(model, context: list[int], span: list[int]) -> float:
    """Summed negative log-likelihood of `span` after `context`, one forward pass (teacher forcing)."""
    ids = torch.tensor([context + span])  # (1, C + S)
    hidden = model.forward_embeds(model.embed(ids), torch.arange(ids.shape[1]))  # (1, C + S, D), no KV cache
    # The states at positions C-1 .. C+S-2 predict the span: only they go through the LM head.
    logits = model.output(hidden[0, len(context) - 1 : -1])  # (S, vocab)
    return float(F.cross_entropy(logits.float(), torch.tensor(span), reduction="sum"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=8, help="documents in all, split evenly over --kinds")
    p.add_argument("--kinds", nargs="+", default=["stdlib", "prose"], choices=["stdlib", "prose", "filler"])
    p.add_argument("--doc-tokens", type=int, default=1500)
    p.add_argument("--span-start", type=int, default=1024, help="first scored token of each document")
    p.add_argument("--span", type=int, default=256, help="tokens scored")
    p.add_argument("--prefix", type=int, default=64, help="local context: tokens just before the span")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--knn-window", type=int, default=1024)
    p.add_argument("--knn-overlap", type=int, default=128)
    p.add_argument("--retrieval", default=StoreSettings().search_mode, choices=SEARCH_MODES,
                   help="how rag and knn-gated rank chunks (default: the service's store.search_mode)")
    p.add_argument("--fusion", default=None, choices=["absolute", "rrf", "relative_score", "dbsf"],
                   help="how hybrid search fuses (default: the store's store.fusion)")
    p.add_argument("--follow-chunks", type=int, default=None,
                   help="knn-gated: chunks after each candidate also read (default: the preset's)")
    p.add_argument("--candidate-chunks", type=int, default=None,
                   help="knn-gated: chunks whose rows are read (default: preset \"default\": 8)")
    p.add_argument("--landmark-weights", default=None, help="landmark-trained: an adapter folder (default: shipped)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.prefix > args.span_start:
        p.error(f"--prefix {args.prefix} must be at most --span-start {args.span_start}")

    from memlm.index.chunking import Chunker
    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model
    from memlm.modes.knn.reading import PRESETS, ReadConfig, gated_rows, knn_mode, prepare_layer_memories
    from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_dir(None)
    model, tok = load_model(model_dir, model_impl="memlm"), load_tokenizer(model_dir)  # the owned Llama, as the host serves it
    chunker = Chunker(tok, CHUNK_TOKENS)
    need = args.span_start + args.span

    # Documents: the first ones of each kind long enough for prefix + span, interleaved by kind.
    per_kind = -(-args.docs // len(args.kinds))
    by_kind: dict[str, list[list[tuple[int, ...]]]] = {}
    for kind in args.kinds:
        chunked = ([c.token_ids for c in chunker.chunk(d.text)]
                   for d in pack_documents(kind, 3 * per_kind, chunker.count_tokens, args.doc_tokens))
        by_kind[kind] = [cs for cs in chunked if sum(map(len, cs)) >= need][:per_kind]
        if len(by_kind[kind]) < per_kind:
            p.error(f"only {len(by_kind[kind])} {kind} documents hold {need} tokens: raise --doc-tokens")
    docs = [(kind, by_kind[kind][r]) for r in range(per_kind) for kind in args.kinds][: args.docs]  # (kind, chunks)
    n_tokens = sum(len(t) for _, cs in docs for t in cs)
    print(f"{len(docs)} documents ({', '.join(f'{k}: {sum(1 for x, _ in docs if x == k)}' for k in args.kinds)}), "
          f"{n_tokens:,} tokens; span [{args.span_start}, {need}), local prefix {args.prefix} tokens", flush=True)

    flat = {i: [t for c in cs for t in c] for i, (_, cs) in enumerate(docs)}
    nll: dict[tuple[str, str], list[float]] = defaultdict(list)  # (method, kind) -> per-document sums
    seconds: dict[str, float] = defaultdict(float)
    sep_ids = tok(SEPARATOR, add_special_tokens=False).input_ids

    with tempfile.TemporaryDirectory() as td:
        mem = mems = None
        if {"knn", "knn-gated", "landmark", "landmark-trained"} & set(args.methods):
            t0 = time.perf_counter()
            mem = kv_memory_for_model(Path(td) / "kv", model, window=args.knn_window, overlap=args.knn_overlap)
            lists, ids, owners = [], [], []
            for i, (_, cs) in enumerate(docs):
                for j, c in enumerate(cs):
                    lists.append(c)
                    ids.append(i * CHUNK_ID_STRIDE + j)
                    owners.append(i)
            rows = build_kv_memory(mem, model, lists, ids, documents=owners)
            dt = time.perf_counter() - t0
            print(f"ingest: KV memory of {rows:,} tokens in {dt:.1f} s ({rows / dt:.0f} tokens/s)", flush=True)
            config = ReadConfig.from_name("ungated")
            gated_config = ReadConfig.from_name(
                "default", candidate_chunks=args.candidate_chunks or PRESETS["default"].candidate_chunks,
                follow_chunks=PRESETS["default"].follow_chunks if args.follow_chunks is None else args.follow_chunks)
            mems = prepare_layer_memories(model, mem, config) if "knn" in args.methods else None
            from memlm.modes.landmark.blocks import load_block_memories
            from memlm.modes.landmark.settings import Settings as LandmarkSettings

            ls = LandmarkSettings()
            if "landmark" in args.methods:
                blocks, _, _ = load_block_memories(model, mem, layers="all_but_first", top_k=ls.top_k,
                                                   representation=ls.representation, positions=ls.positions,
                                                   group=ls.group, candidates=ls.candidates,
                                                   min_memory_position=ls.min_memory_position)
            if "landmark-trained" in args.methods:
                from passkey import trained_landmarks

                adapter = trained_landmarks(model, model_dir, ["landmark:trained"], args.landmark_weights)
                trained_blocks, _, _ = load_block_memories(model, mem, layers="all_but_first", top_k=ls.top_k,
                                                           representation="trained", positions="in_block",
                                                           min_memory_position=ls.min_memory_position,
                                                           landmarks=adapter)
        if "rag" in args.methods or "knn-gated" in args.methods:
            from memlm.index.embedding import load_embedder

            embedder = load_embedder("all-MiniLM-L6-v2")
            where = [(i, j) for i, (_, cs) in enumerate(docs) for j in range(len(cs))]
            t0 = time.perf_counter()
            texts = [tok.decode(docs[i][1][j]) for i, j in where]
            ranker = ChunkRanker(embedder, embedder.embed(texts), texts.__getitem__, args.fusion)  # (C, 384) vectors
            print(f"ingest: {len(where)} chunk vectors in {time.perf_counter() - t0:.1f} s", flush=True)

        for i, (kind, cs) in enumerate(docs):
            ids = flat[i]
            span = ids[args.span_start : need]
            prefix = ids[args.span_start - args.prefix : args.span_start]
            line = [f"doc {i} ({kind}, {len(ids)} tokens):"]

            def ranked(k: int) -> list[tuple[int, int]]:  # the k best chunks for the prefix's text, as the store ranks
                return [where[r] for r in ranker.rank(args.retrieval, tok.decode(prefix), k)]

            for method in args.methods:
                t0 = time.perf_counter()
                if method == "none":
                    s = span_nll(model, prefix, span)
                elif method == "knn":
                    with knn_mode(model, mem, config, layer_memories=mems):
                        s = span_nll(model, prefix, span)
                elif method == "knn-gated":
                    gated = gated_rows(model, mem, gated_config, ranked(gated_config.candidate_chunks),
                                       lambda c, n: following(c, n, len(docs[c[0]][1])),
                                       lambda c: c[0] * CHUNK_ID_STRIDE + c[1])
                    with knn_mode(model, mem, gated_config, layer_memories=gated):
                        s = span_nll(model, prefix, span)
                elif method == "landmark":
                    with knn_mode(model, mem, blocks.config, layer_memories=blocks):
                        s = span_nll(model, prefix, span)
                elif method == "landmark-trained":
                    with knn_mode(model, mem, trained_blocks.config, layer_memories=trained_blocks):
                        s = span_nll(model, prefix, span)
                elif method == "rag":
                    top = sorted(ranked(RAG_K))
                    ctx = [t for a, b in top for t in docs[a][1][b]]
                    s = span_nll(model, ctx + sep_ids + prefix, span)
                else:  # full
                    s = span_nll(model, ids[: args.span_start], span)
                seconds[method] += time.perf_counter() - t0
                nll[(method, kind)].append(s)
                line.append(f"{method} {math.exp(s / len(span)):.2f}")
            print(" ".join(line), flush=True)

    print(f"\nperplexity of {args.span} tokens after a {args.prefix}-token prefix (exp of the mean token NLL)")
    print("| method | " + " | ".join(args.kinds) + " | all | s/document |")
    print("| --- | " + " | ".join("---" for _ in args.kinds) + " | --- | --- |")
    for method in args.methods:
        cells = []
        for kind in args.kinds:
            sums = nll[(method, kind)]
            cells.append(f"{math.exp(sum(sums) / (len(sums) * args.span)):.2f}" if sums else "-")
        pooled = [s for kind in args.kinds for s in nll[(method, kind)]]
        cells.append(f"{math.exp(sum(pooled) / (len(pooled) * args.span)):.2f}")
        print(f"| {method} | " + " | ".join(cells) + f" | {seconds[method] / len(docs):.1f} |")
    base = [s for kind in args.kinds for s in nll[("none", kind)]]
    for method in ("knn", "knn-gated", "landmark", "landmark-trained"):
        if base and method in args.methods:
            ours = [s for kind in args.kinds for s in nll[(method, kind)]]
            print(f"{method} / none perplexity ratio: {math.exp((sum(ours) - sum(base)) / (len(base) * args.span)):.3f}")


if __name__ == "__main__":
    main(sys.argv[1:])
