"""Search over gRPC at 100k chunks: latency of a text query (embedding included) and throughput
with concurrent clients, against the real server.

    python benchmarks/search.py --chunks 100000 [--data-dir DIR] [--index-factory Flat] [--modes dense hybrid]

The collection is built once (embedding 100k chunks takes minutes on 2 cores) and kept in
--data-dir, so later runs only search. Latency is measured at the client: p50/p99 over
--queries sequential queries; throughput with --clients threads, each on its own channel. Each
search mode in --modes (dense: embedding; lexical: BM25; hybrid: both, fused, the server default)
is measured on the same queries in the same run.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from corpus import documents, queries  # noqa: E402


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def measure(address: str, collection: str, qs: list[str], k: int, clients: int, mode: str) -> None:
    import memlm

    lat = []
    with memlm.Client(address, timeout=600) as client:
        for q in qs:
            t0 = time.perf_counter()
            client.search(q, collection=collection, k=k, mode=mode)
            lat.append((time.perf_counter() - t0) * 1e3)
    print(f"[{mode}] sequential text queries: p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms, "
          f"mean {statistics.mean(lat):.1f} ms over {len(lat)} (goal: p50 < 20 ms)")

    done = [0] * clients

    def worker(i: int) -> None:
        with memlm.Client(address, timeout=600) as c:
            for q in qs[i::clients]:
                c.search(q, collection=collection, k=k, mode=mode)
                done[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    print(f"[{mode}] {clients} concurrent clients: {sum(done) / elapsed:.1f} queries/s "
          f"(sequential: {1e3 / statistics.mean(lat):.1f} queries/s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--data-dir", type=Path, default=Path("/tmp/memlm-bench-search"))
    ap.add_argument("--index-factory", default="Flat")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("-k", type=int, default=10)
    ap.add_argument("--modes", nargs="+", default=["dense", "hybrid"], choices=["dense", "lexical", "hybrid"])
    args = ap.parse_args()

    import memlm
    from memlm.services.process import ServerProcess

    collection = f"bench-{args.index_factory.replace(',', '_')}-{args.chunks}"
    server = ServerProcess(args.data_dir)
    try:
        with memlm.Client(server.address, timeout=600) as client:
            client.create_collection(collection, index_factory=args.index_factory, if_not_exists=True)
            have = client.describe_collection(collection).chunks
            if have < args.chunks:
                # One sentence-group per chunk: 3-4 short sentences stay under 64 tokens.
                docs = documents(args.chunks, sentences=(3, 4), seed=42)
                print(f"building: {args.chunks} documents into {args.data_dir} ...", flush=True)
                t0 = time.perf_counter()
                client.ingest(docs, collection=collection, batch_size=256, progress=True)
                print(f"built in {time.perf_counter() - t0:.0f} s")
            stats = client.describe_collection(collection)
            print(f"collection {collection}: {stats.chunks} chunks, index {stats.config.index_factory}")

            qs = queries(args.queries)
            for q in qs[:20]:
                for mode in args.modes:
                    client.search(q, collection=collection, k=args.k, mode=mode)  # warm-up
        for mode in args.modes:
            measure(server.address, collection, qs, args.k, args.clients, mode)
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
