"""Text-search latency while other clients ingest, against the real server, idle and loaded in one run.

    python benchmarks/search_under_ingest.py [--docs 400] [--queries 200] [--ingest-clients 2]
                                            [--ingest-batch 16] [--max-seconds 75] [--mode hybrid]

The corpus is real text: docstring paragraphs of this Python's standard library
(`corpus.stdlib_paragraphs`), one document each. --docs of them are ingested first; the queries
are the opening words (up to 12) of other paragraphs. One client then searches sequentially
(k 10, --mode), measuring each call at the client:
  1. idle: nothing else runs;
  2. loaded: --ingest-clients other clients, each on its own channel, ingest batches of
     --ingest-batch new paragraphs into the same collection without pause (every batch is new
     text, so each is embedded and committed) until the searches are done.
Each phase runs --queries searches or --max-seconds, whichever ends first (a slow phase then has
fewer samples; the count is printed). Printed: p50 and p99 of each phase, the loaded/idle ratios
(goal: p99 loaded <= 2x p99 idle) and the ingest rate during the loaded phase.
"""
from __future__ import annotations

import argparse
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from corpus import stdlib_paragraphs  # noqa: E402


def percentile(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def search_phase(client, collection: str, qs: list[str], mode: str, max_seconds: float) -> list[float]:
    lat = []
    end = time.perf_counter() + max_seconds
    for q in qs:
        t0 = time.perf_counter()
        client.search(q, collection=collection, k=10, mode=mode)
        lat.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() > end:
            break
    return lat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", type=int, default=400, help="paragraphs ingested before searching")
    ap.add_argument("--queries", type=int, default=200, help="searches per phase")
    ap.add_argument("--ingest-clients", type=int, default=2)
    ap.add_argument("--ingest-batch", type=int, default=16, help="documents per Ingest call")
    ap.add_argument("--max-seconds", type=float, default=75.0, help="cap on each phase")
    ap.add_argument("--mode", default="hybrid", choices=["dense", "lexical", "hybrid"])
    ap.add_argument("--data-dir", type=Path, default=None, help="default: a fresh temporary folder")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import memlm
    from memlm.services.process import ServerProcess

    rng = random.Random(args.seed)
    paras = [p for p in stdlib_paragraphs() if 80 <= len(p) <= 600]
    rng.shuffle(paras)
    initial, query_paras, pool = paras[: args.docs], paras[args.docs : args.docs + args.queries], paras[args.docs + args.queries :]
    qs = [" ".join(p.split()[:12]) for p in query_paras]

    tmp = tempfile.TemporaryDirectory()
    data_dir = args.data_dir or Path(tmp.name)
    server = ServerProcess(data_dir)
    collection = "under-ingest"
    try:
        with memlm.Client(server.address, timeout=600) as client:
            client.create_collection(collection, if_not_exists=True)
            t0 = time.perf_counter()
            client.ingest([{"id": f"init-{i}", "text": t} for i, t in enumerate(initial)],
                          collection=collection, batch_size=64)
            stats = client.describe_collection(collection)
            print(f"{stats.documents} stdlib paragraphs ({stats.chunks} chunks) ingested in "
                  f"{time.perf_counter() - t0:.0f} s; mode {args.mode}, k 10", flush=True)
            for q in qs[:20]:
                client.search(q, collection=collection, k=10, mode=args.mode)  # warm-up

            idle = search_phase(client, collection, qs, args.mode, args.max_seconds)

            stop = threading.Event()
            errors: list[BaseException] = []

            def ingester(n: int) -> None:
                try:
                    with memlm.Client(server.address, timeout=600) as c:
                        b = 0
                        while not stop.is_set():
                            start = (b * args.ingest_clients + n) * args.ingest_batch
                            batch = [{"id": f"load-{n}-{b}-{j}", "text": pool[(start + j) % len(pool)]}
                                     for j in range(args.ingest_batch)]
                            c.ingest(batch, collection=collection, batch_size=args.ingest_batch)
                            b += 1
                except BaseException as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=ingester, args=(n,), daemon=True) for n in range(args.ingest_clients)]
            for t in threads:
                t.start()
            time.sleep(1.0)  # let both ingests reach their embedding
            t0, before = time.perf_counter(), client.describe_collection(collection).chunks
            loaded = search_phase(client, collection, qs, args.mode, args.max_seconds)
            elapsed = time.perf_counter() - t0
            chunks_during = client.describe_collection(collection).chunks - before  # committed meanwhile
            stop.set()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
    finally:
        server.terminate()
        tmp.cleanup()

    p50_i, p99_i, p50_l, p99_l = (percentile(idle, 50), percentile(idle, 99), percentile(loaded, 50),
                                  percentile(loaded, 99))
    print(f"idle:   p50 {p50_i:7.1f} ms  p99 {p99_i:7.1f} ms  ({len(idle)} searches)")
    print(f"loaded: p50 {p50_l:7.1f} ms  p99 {p99_l:7.1f} ms  ({len(loaded)} searches, {args.ingest_clients} "
          f"ingest clients: {chunks_during} chunks committed meanwhile, {chunks_during / elapsed:.1f}/s)")
    print(f"ratio loaded/idle: p50 {p50_l / p50_i:.2f}x, p99 {p99_l / p99_i:.2f}x (goal: p99 <= 2x: "
          f"{'met' if p99_l <= 2 * p99_i else 'missed'})")


if __name__ == "__main__":
    main()
