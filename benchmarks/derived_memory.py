"""When should an Ingest into a knn collection answer: after its KV memory is built, or right after
LMDB commits with the build queued (`knn.ingest_waits_for_memory`)? Both, in one process, on the
real bundled model, an in-process MemoryStore and ModelHost (the server's parts without gRPC):

  ingest alone        latency of one ~1,000-token document into a knn collection, nothing else running
  ingest under gen    the same while a 192-token `none` generation is running
  TTFT under build    time to first token of a 16-token `none` generation sent 0.5 s after an
                      8-document (~8k-token) ingest committed (its KV build queued or running)
  knn right after     time to first token of a knn generation sent the moment the ingest answered
                      (it catches the memory up first: reads never miss an acknowledged write)
  lag seen            Describe's memory_lag["knn"] the moment the ingest answered

    .venv/bin/python benchmarks/derived_memory.py [--runs 2] [--threads 2]

Each cell: the median of --runs runs; both settings alternate run by run.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import stdlib_paragraphs  # noqa: E402

from memlm.config import ModelSettings, StoreSettings  # noqa: E402
from memlm.engine import GenerationRequest, SamplingParams  # noqa: E402
from memlm.host import ModelHost  # noqa: E402
from memlm.index.memory_store import MemoryStore  # noqa: E402
from memlm.index.types import Document  # noqa: E402
from memlm.modes.knn.settings import Settings as KnnSettings  # noqa: E402


def texts(n: int, tokens: int, tokenizer, offset: int = 0) -> list[str]:
    """n documents of about `tokens` tokens of real text (stdlib docstrings), none shared."""
    out, paragraphs = [], iter(stdlib_paragraphs())
    for _ in range(offset):
        next(paragraphs)
    for _ in range(n):
        parts, size = [], 0
        while size < tokens:
            p = next(paragraphs)
            parts.append(p)
            size += len(tokenizer(p, add_special_tokens=False).input_ids)
        out.append("\n\n".join(parts))
    return out


def generate(host: ModelHost, loop: asyncio.AbstractEventLoop, request: GenerationRequest):
    async def run():
        async for event in host.generate(request):
            result = event
        return result

    return asyncio.run_coroutine_threadsafe(run(), loop)


def one_run(model, tokenizer, embedder, waits: bool, docs: dict[str, list[str]], threads: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as td:
        store = MemoryStore.open(Path(td) / "data", StoreSettings(), embedder=embedder, tokenizer=tokenizer)
        knn = KnnSettings(ingest_waits_for_memory=waits, build_batch_tokens=1024)
        host = ModelHost(model, tokenizer, ModelSettings(torch_threads=threads), store, mode_settings={"knn": knn})
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        out: dict[str, float] = {}
        try:
            store.create_collection("kv", memory={"knn": {}})
            plain = lambda n: GenerationRequest(prompt="Once upon a time", sampling=SamplingParams(max_new_tokens=n))  # noqa: E731

            t0 = time.perf_counter()
            store.ingest("kv", [Document("alone", docs["alone"][0])])
            out["ingest alone s"] = time.perf_counter() - t0
            generate(host, loop, plain(4)).result()  # let a queued build finish

            running = generate(host, loop, plain(192))
            time.sleep(0.5)
            t0 = time.perf_counter()
            store.ingest("kv", [Document("under", docs["under"][0])])
            out["ingest under gen s"] = time.perf_counter() - t0
            running.result()
            generate(host, loop, plain(4)).result()

            big = [Document(f"big{i}", t) for i, t in enumerate(docs["big"])]
            writer = threading.Thread(target=store.ingest, args=("kv", big))
            t0 = time.perf_counter()
            writer.start()
            while store.describe("kv").memory_lag["knn"] == 0:  # committed: the build is queued or running
                time.sleep(0.05)
            time.sleep(0.5)
            out["TTFT under build s"] = generate(host, loop, plain(16)).result().timings.time_to_first_token_ms / 1000
            writer.join()
            out["big ingest s"] = time.perf_counter() - t0
            generate(host, loop, plain(4)).result()

            store.ingest("kv", [Document("last", docs["last"][0])])
            out["lag seen"] = store.describe("kv").memory_lag["knn"]
            ask = GenerationRequest(prompt="What does the documentation say?", collection="kv", memory="knn",
                                    sampling=SamplingParams(max_new_tokens=4))
            out["knn right after s"] = generate(host, loop, ask).result().timings.time_to_first_token_ms / 1000
        finally:
            asyncio.run_coroutine_threadsafe(host.close(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            store.close()
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from memlm.index.embedding import load_embedder
    from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(None)
    model, tokenizer, embedder = load_model(model_dir), load_tokenizer(model_dir), load_embedder("all-MiniLM-L6-v2")  # as the host loads them
    all_docs = texts(11, 1000, tokenizer)
    docs = {"alone": all_docs[:1], "under": all_docs[1:2], "big": all_docs[2:10], "last": all_docs[10:]}
    results: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for _ in range(args.runs):
        for waits in (True, False):
            results[waits].append(one_run(model, tokenizer, embedder, waits, docs, args.threads))
    keys = list(results[True][0])
    print(f"SmolLM2-135M, torch threads {args.threads}, medians of {args.runs} runs; knn.ingest_waits_for_memory:")
    print(f"{'':22s} {'True (waits)':>14s} {'False (queued)':>15s} {'ratio T/F':>10s}")
    for k in keys:
        a = statistics.median(r[k] for r in results[True])
        b = statistics.median(r[k] for r in results[False])
        print(f"{k:22s} {a:14.2f} {b:15.2f} {a / b if b else float('nan'):10.2f}")


if __name__ == "__main__":
    main()
