"""What KV-memory compression costs: fp16 against product quantization (keys AND values) in RAM.

    .venv/bin/python benchmarks/kv_compression.py [--tokens 4096] [--error-layers every4]
        [--haystack 4096] [--pq-m 8 16 32] [--trials 1]
    .venv/bin/python benchmarks/kv_compression.py --timing [--n 65536 262144]

Accuracy (default): a KVMemory is built with the bundled SmolLM2 over --tokens of varied prose
(benchmarks/corpus.py's "prose" kind, ~1k-token documents) at --error-layers (a knn layer preset: PQ trains
2 x Hkv codebooks per stored layer, seconds each). The model then reads a prose prompt in
knn mode over that memory with EXACT retrieval (fp32 copies of the stored fp16 keys, torch
matmul + topk), and every memory layer's (q, local K/V) is recorded. For each codec the memory
is loaded as `prepare_layer_memories` does (FAISS per KV head) and, on the recorded inputs:
- recall@k: |retrieved ∩ exact top-k| / k, mean over layers, query heads and query tokens;
- rel err: ||out - out_exact||_F / ||out_exact||_F of the layer's attention output (local context
  ∪ retrieved rows, one softmax), mean and max over layers;
- bytes/token: RAM per memory token over all 30 layers (`LayerMemories.bytes_per_token`: codes;
  PQ codebooks add 2 x 256 x D x 4 B per layer and KV head, fixed) and per layer;
- load s: first `prepare_layer_memories` of the prose memory per stored layer (PQ: k-means of
  2 x Hkv codebooks and encoding, written to disk by KVMemory.ensure_pq), then a second load
  (codes read back from disk);
- pass key: the "ungated" knn preset (every row searched, layers 1-29) with that codec on a --haystack filler haystack
  (corpus.py's documents and needle, passkey.py's QUESTION / greedy / found), local prompt =
  the question only.
Timing (--timing): one memory layer's retrieval on random keys, Hkv = 3, G = 3, D = 64, k = 8,
per query head, 1 thread: the old path (fp32 copy in RAM, torch matmul + topk) against FAISS
fp16 and PQ (M = 16) search, and the whole layer call (search, gather, knn_attention).

Figures (2 CPU cores shared with other jobs, 1 thread; one pass-key trial: a direction, not an
estimate):
  .venv/bin/python benchmarks/kv_compression.py --tokens 4096 --haystack 4096 --pq-m 8 16 32 --trials 1
  recall / error: 3,767 prose tokens, layers every4 (8), per query head, k=8;
  pass key: 3,865-token filler haystack (depth 0.55), all 30 layers
  | codec   | B/token, 30 layers | B/token/layer | incl. codebooks* | recall@8 | rel err mean | max   | load s/layer | reload | pass key |
  | fp16    | 23,040 |  768 | 768 | 0.999 | 0.0000 | 0.0000 |  0.00 | 0.00 | 1/1 |
  | pq M=8  |  1,440 |   48 | 152 | 0.659 | 0.4838 | 0.7657 |  3.92 | 0.00 | 0/1 |
  | pq M=16 |  2,880 |   96 | 200 | 0.717 | 0.3442 | 0.4999 |  7.77 | 0.00 | 0/1 |
  | pq M=32 |  5,760 |  192 | 296 | 0.845 | 0.1898 | 0.2747 | 17.83 | 0.00 | 0/1 |
  * per layer: codebooks (393,216 B per layer) spread over these 3,767 tokens; negligible at 1M.
  "load" is the first load (training + encoding, then written to disk); "reload" reads the codes.
  Reading: memory rows take 70-80% of the attention mass at these layers, so retrieval errors
  move the output. A diagnostic on layers 4/12/20/28 (M = 16) split the error: PQ retrieval with
  exact rows 0.19-0.34, decoded keys alone 0.09-0.16, decoded values alone 0.08-0.42; dropping
  the window-start rows (attention sinks, 19-48% of what is retrieved) did not help (recall fell
  to 0.42-0.81). 8-bit PQ of 64-dim heads loses the pass key at every M tried: PQ buys 4-16x RAM
  at a real accuracy cost; fp16 is the default.

  .venv/bin/python benchmarks/kv_compression.py --timing --n 65536 262144   (ms per layer call)
  | N       | Tq | torch fp32 search | faiss fp16 | faiss pq16 | torch fp32 layer | faiss fp16 | faiss pq16 |
  | 65,536  |  1 |   8.95 |   4.58 |   6.00 |  10.24 |   5.92 |   7.24 |
  | 65,536  | 32 | 117.81 | 114.88 | 186.25 | 123.03 | 121.00 | 191.72 |
  | 262,144 |  1 |  38.65 |  19.70 |  23.88 |  40.76 |  21.71 |  25.44 |
  | 262,144 | 32 | 463.66 | 604.07 | 742.95 | 464.04 | 585.61 | 741.28 |
  Decode (Tq = 1): FAISS fp16 ~2x faster than the fp32 matmul and half its RAM; PQ ~1.6x faster
  at 1/8 of fp16's RAM. Prefill-sized batches (Tq = 32): BLAS wins (faiss scans per query).
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ for passkey's helpers

QUERY_TEXT = ("The old miller carried a wooden chest before dawn because the roads were flooded. "
              "Our neighbour sold the winter coats after the storm, and everyone laughed.")


def haystack(tok, kind: str, n_tokens: int, seed: int) -> tuple[list[list[int]], str, float]:
    """~n_tokens of corpus documents with a pass key inside: (token ids per document, key, depth)."""
    from corpus import documents_for_tokens, needle_sentence, pack_documents, place_needle

    count = lambda text: len(tok(text, add_special_tokens=False).input_ids)
    docs = pack_documents(kind, n_tokens // 900 + 2, count)
    counts = [count(d.text) for d in docs]
    n = documents_for_tokens(counts, n_tokens)
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    i, needled, depth = place_needle(docs[:n], counts[:n], rng.uniform(0.05, 0.95), needle_sentence(key), count)
    docs = list(docs[:n])
    docs[i] = needled
    return [tok(d.text).input_ids for d in docs], key, depth


def build_memory(model, path: Path, docs: list[list[int]], layers=None):
    """A KVMemory of the documents (each its own token stream, 64-token chunks), as ingest builds it."""
    from memlm.index.kv_memory import KVMemory
    from memlm.modes.knn.capture import build_kv_memory, kv_memory_for_model

    chunks, doc_of = [], []
    for j, ids in enumerate(docs):
        for i in range(0, len(ids), 64):
            chunks.append(ids[i : i + 64])
            doc_of.append(j)
    mem = kv_memory_for_model(path, model, layers=layers)
    build_kv_memory(mem, model, chunks, list(range(len(chunks))), documents=doc_of)
    return mem


def _torch_topk_fp32(q: torch.Tensor, mem_k: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-FAISS CPU retrieval: fp32 keys (Hkv, N, D) in RAM, one matmul per KV head + topk.
    q (B, Hq, Tq, D) -> (B, Hkv, G*Tq, k)."""
    b, hq, tq, d = q.shape
    hkv = mem_k.shape[0]
    s = torch.matmul(q.reshape(b, hkv, hq // hkv * tq, d), mem_k.transpose(1, 2).unsqueeze(0))  # (B, Hkv, G*Tq, N)
    return s.topk(k, dim=-1)


def _best_ms(f, rounds: int = 3, reps: int = 5) -> float:
    f()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            f()
        out.append((time.perf_counter() - t0) / reps * 1e3)
    return min(out)


def timing(ns: list[int], k: int = 8) -> None:
    from memlm.modes.knn.attention import FaissKV

    hkv, g, d = 3, 3, 64
    print(f"| N | Tq | torch fp32 search ms | faiss fp16 | faiss pq16 | torch fp32 layer call ms | faiss fp16 | faiss pq16 |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in ns:
        gen = torch.Generator().manual_seed(n)
        keys = torch.randn(hkv, n, d, generator=gen).half()  # as stored on disk
        values = torch.randn(hkv, n, d, generator=gen).half()
        k32, v32 = keys.float(), values.float()  # the old path's RAM copies
        fp16 = FaissKV.from_tensors(keys, values, "fp16")
        pq = FaissKV.from_tensors(keys, values, "pq", pq_m=16, train_rows=16384)
        for tq in (1, 32):
            q = torch.randn(1, hkv * g, tq, d, generator=gen)
            kc, vc = torch.randn(1, hkv, 64 + tq, d, generator=gen), torch.randn(1, hkv, 64 + tq, d, generator=gen)

            def torch_layer():
                from memlm.kernels import knn_attention

                idx = _torch_topk_fp32(q, k32, k).indices.view(1, hkv * g, tq, k)
                return knn_attention(q, kc, vc, k32, v32, idx)

            row = [_best_ms(lambda: _torch_topk_fp32(q, k32, k)), _best_ms(lambda: fp16.search(q, k)),
                   _best_ms(lambda: pq.search(q, k)), _best_ms(torch_layer),
                   _best_ms(lambda: fp16.attention(q, kc, vc, k)), _best_ms(lambda: pq.attention(q, kc, vc, k))]
            print(f"| {n} | {tq} | " + " | ".join(f"{t:.2f}" for t in row) + " |", flush=True)


class _Recording:
    """A KVStore stand-in: exact retrieval, recording the inputs of every layer call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def attention(self, q, k_cache, v_cache, top_k, *, shared_per_kv_head=False, scale=None, gate=None):
        self.calls.append((q.clone(), k_cache.clone(), v_cache.clone(), scale))
        return self.inner.attention(q, k_cache, v_cache, top_k, shared_per_kv_head=shared_per_kv_head, scale=scale,
                                    gate=gate)


def accuracy(args) -> None:
    from passkey import QUESTION, found, greedy
    from memlm.modes.knn.reading import ReadConfig, LayerMemories, LayerMemory, knn_mode, prepare_layer_memories, resolve_layers
    from memlm.modes.knn.attention import TensorKV
    from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(None)
    model, tok = load_model(model_dir, model_impl="memlm"), load_tokenizer(model_dir)  # the owned Llama, as the host serves it
    # "fixed" positions (no rotation at load) throughout: the exact reference below holds the keys
    # as stored, and stored PQ codes are of un-rotated keys. ("ungated" itself rotates to the rows'
    # original positions: against un-rotated references its recall read 0.009.)
    base = ReadConfig.from_name("ungated", positions="fixed")
    codecs = [("fp16", base)] + [(f"pq M={m}", ReadConfig.from_name("ungated", positions="fixed", codec="pq", pq_m=m))
                                 for m in args.pq_m]
    rows = {name: dict(recall=[], err=[], passkey=[], load=[], reload=[]) for name, _ in codecs}
    sizes = {}
    error_layers = resolve_layers(args.error_layers, model.config.n_layers)

    with tempfile.TemporaryDirectory() as td, torch.inference_mode():
        # 1. Recall and attention error on prose.
        docs, _, _ = haystack(tok, "prose", args.tokens, seed=7)
        t0 = time.perf_counter()
        mem = build_memory(model, Path(td) / "prose", docs, layers=error_layers)
        print(f"prose memory: {len(mem)} tokens, {len(error_layers)} layers, built in {time.perf_counter() - t0:.0f} s", flush=True)
        exact_cfg = ReadConfig.from_name("ungated", layers=error_layers, positions="fixed")
        exact = LayerMemories(exact_cfg, torch.device("cpu"))
        for l in mem.layers:
            k, v = mem.layer(l)  # (Hkv, N, D) fp16, "fixed" positions: no rotation
            exact[l] = LayerMemory(_Recording(TensorKV(k.float(), v.float())), base.top_k, base.shared_per_kv_head)
        with knn_mode(model, mem, exact_cfg, layer_memories=exact):
            query = tok(QUERY_TEXT).input_ids
            model(torch.tensor([query]), torch.arange(len(query)))
        for name, cfg in codecs:
            cfg = ReadConfig.from_name("ungated", layers=error_layers, positions="fixed", codec=cfg.codec, pq_m=cfg.pq_m)
            t0 = time.perf_counter()
            mems = prepare_layer_memories(model, mem, cfg)
            rows[name]["load"].append((time.perf_counter() - t0) / len(mems))
            t0 = time.perf_counter()
            mems = prepare_layer_memories(model, mem, cfg)
            rows[name]["reload"].append((time.perf_counter() - t0) / len(mems))
            sizes[name] = (mems.bytes_per_token / len(mems), mems.nbytes / max(1, mems.num_rows) / len(mems))
            for l, m in mems.items():
                (q, kc, vc, scale), = exact[l].store.calls
                _, want = exact[l].store.inner.search(q, cfg.top_k)  # (1, Hq, Tq, k)
                _, got = m.store.search(q, cfg.top_k)
                hit = (got.unsqueeze(-1) == want.unsqueeze(-2)).any(-1).float().mean().item()
                ref = exact[l].store.inner.attention(q, kc, vc, cfg.top_k, scale=scale)
                out = m.store.attention(q, kc, vc, cfg.top_k, scale=scale)
                rows[name]["recall"].append(hit)
                rows[name]["err"].append(((out - ref).norm() / ref.norm()).item())
            print(f"{name}: recall {sum(rows[name]['recall']) / len(mems):.3f}, load {rows[name]['load'][-1]:.1f} s", flush=True)
            del mems

        # 2. Pass key on filler.
        q_ids = tok(QUESTION).input_ids
        for trial in range(args.trials):
            docs, key, depth = haystack(tok, "filler", args.haystack, seed=args.haystack * 1000 + 10 * trial)
            mem = build_memory(model, Path(td) / f"filler{trial}", docs)
            for name, cfg in codecs:
                mems = prepare_layer_memories(model, mem, cfg)
                with knn_mode(model, mem, cfg, layer_memories=mems):
                    out = greedy(model, q_ids)
                ok = found(tok, out, key)
                rows[name]["passkey"].append(ok)
                print(f"trial {trial} depth {depth:.2f} tokens {len(mem)} {name}: {int(ok)} {tok.decode(out)!r}", flush=True)
                del mems

    n_all = model.config.n_layers
    print(f"\nrecall / error: {args.tokens} prose tokens, layers {args.error_layers} ({len(error_layers)}), per query head, "
          f"k={base.top_k}; pass key: {args.haystack}-token filler haystack, all {n_all} layers")
    print(f"| codec | B/token RAM, {n_all} layers | B/token/layer | incl. codebooks | recall@k | rel err mean | rel err max "
          "| load s/layer | reload s/layer | pass key |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, _ in codecs:
        r = rows[name]
        per_layer, with_books = sizes[name]
        print(f"| {name} | {per_layer * n_all:,.0f} | {per_layer:,.0f} | {with_books:,.0f} | {sum(r['recall']) / len(r['recall']):.3f} "
              f"| {sum(r['err']) / len(r['err']):.4f} | {max(r['err']):.4f} | {r['load'][0]:.2f} | {r['reload'][0]:.2f} "
              f"| {sum(r['passkey'])}/{len(r['passkey'])} |")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="prose memory for recall / error (>= 2560 for PQ)")
    p.add_argument("--error-layers", default="every4", help="knn layer preset stored in the prose memory")
    p.add_argument("--haystack", type=int, default=4096, help="filler haystack for the pass key")
    p.add_argument("--pq-m", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--trials", type=int, default=1, help="pass-key haystacks")
    p.add_argument("--timing", action="store_true", help="retrieval timing on random keys instead")
    p.add_argument("--n", type=int, nargs="+", default=[65536, 262144], help="memory rows for --timing")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    import faiss

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    if args.timing:
        timing(args.n)
    else:
        accuracy(args)


if __name__ == "__main__":
    main(sys.argv[1:])
