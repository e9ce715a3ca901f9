"""Ingest throughput, and how much of it is embedding versus store and index work.

    python benchmarks/ingest.py --docs 10000

1. In-process `MemoryStore`: the same chunk texts are first embedded alone (the embedding cost),
   then the documents are ingested for real (chunk + embed + LMDB commit + FAISS add). The
   difference is the store and index overhead; goal: at most 15% on top of embedding.
2. Over gRPC: the real server and client, end to end, chunks/s.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from corpus import documents  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=64, help="documents per ingest call")
    ap.add_argument("--skip-grpc", action="store_true")
    args = ap.parse_args()

    from memlm.config import StoreSettings
    from memlm.index.memory_store import MemoryStore
    from memlm.index.types import Document

    docs = documents(args.docs)
    settings = StoreSettings()
    with tempfile.TemporaryDirectory() as tmp:
        store = MemoryStore.open(Path(tmp), settings)
        store.create_collection("bench")
        chunker, embedder = store.chunker_for("bench"), store.embedder_for("bench")
        texts = [c.text for d in docs for c in chunker.chunk(d["text"])]
        embedder.embed(texts[:64])  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(texts), settings.embed_batch_size):
            embedder.embed(texts[i : i + settings.embed_batch_size])
        embed_s = time.perf_counter() - t0

        t0 = time.perf_counter()
        for i in range(0, len(docs), args.batch):
            store.ingest("bench", [Document(**d) for d in docs[i : i + args.batch]])
        total_s = time.perf_counter() - t0
        stats = store.describe("bench")
        store.close()
    assert stats.chunks == len(texts), (stats.chunks, len(texts))
    overhead = (total_s - embed_s) / embed_s
    print(f"documents {len(docs)}, chunks {len(texts)} ({len(texts) / len(docs):.2f} per document)")
    print(f"embedding alone       {embed_s:8.1f} s  {len(texts) / embed_s:8.1f} chunks/s")
    print(f"MemoryStore.ingest    {total_s:8.1f} s  {len(texts) / total_s:8.1f} chunks/s")
    print(f"store + index overhead on top of embedding: {overhead * 100:.1f}%  (goal <= 15%)")

    if args.skip_grpc:
        return
    import memlm
    from memlm.services.process import ServerProcess

    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(Path(tmp))
        try:
            with memlm.Client(server.address, timeout=600) as client:
                client.create_collection("bench")
                t0 = time.perf_counter()
                report = client.ingest(docs, collection="bench", batch_size=args.batch)
                grpc_s = time.perf_counter() - t0
        finally:
            server.terminate()
    print(f"gRPC end to end       {grpc_s:8.1f} s  {report.chunks / grpc_s:8.1f} chunks/s  "
          f"({grpc_s / total_s:.2f}x the in-process time)")


if __name__ == "__main__":
    main()
