"""Ingest throughput, and how much of it is embedding versus store and index work.

    python benchmarks/ingest.py --docs 10000

1. In-process `MemoryStore`, timed by stage from the store's own Prometheus histogram
   (memlm_ingest_stage_seconds): chunk (tokenizer), embed, store (the durable LMDB commit),
   index (FAISS + metadata and lexical indexes + snapshots). Goal: store + index at most 15% of embed.
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


STAGES = ("chunk", "embed", "store", "index")


def _stage_sum(stage: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("memlm_ingest_stage_seconds_sum", {"stage": stage}) or 0.0


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
    with tempfile.TemporaryDirectory() as tmp:
        store = MemoryStore.open(Path(tmp), StoreSettings())
        store.create_collection("bench")
        store.ingest("bench", [Document(id="warm-up", text="Warm the tokenizer and the embedder up.")])
        before = {s: _stage_sum(s) for s in STAGES}
        t0 = time.perf_counter()
        for i in range(0, len(docs), args.batch):
            store.ingest("bench", [Document(**d) for d in docs[i : i + args.batch]])
        total_s = time.perf_counter() - t0
        chunks = store.describe("bench").chunks - 1
        store.close()
    stage = {s: _stage_sum(s) - before[s] for s in STAGES}
    overhead = (stage["store"] + stage["index"]) / stage["embed"]
    print(f"documents {len(docs)}, chunks {chunks} ({chunks / len(docs):.2f} per document), {args.batch} per call")
    print(f"MemoryStore.ingest  {total_s:8.1f} s  {chunks / total_s:8.1f} chunks/s")
    for s in STAGES:
        print(f"  {s:6s}            {stage[s]:8.2f} s  {stage[s] / total_s * 100:5.1f}%")
    print(f"store + index on top of embedding: {overhead * 100:.1f}%  (goal <= 15%)")

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
    print(f"gRPC end to end      {grpc_s:8.1f} s  {report.chunks / grpc_s:8.1f} chunks/s  "
          f"({grpc_s / total_s:.2f}x the in-process time)")


if __name__ == "__main__":
    main()
