"""Continuous batching against the one-at-a-time engine, and prefix reuse, over the real gRPC service.

    python benchmarks/batching.py [--clients 1 2 4 8 16] [--new-tokens 64] [--requests 4] [--threads 2]

Two servers on the same machine, one after the other (never at once): the default engine
(`model.batching = true`) and the one-at-a-time engine (`MEMLM_MODEL__BATCHING=false`). For each
number of concurrent clients C, C threads each send requests back to back (closed loop) until at
least `--requests` requests per client and C x `--requests` in all have finished; greedy,
`--new-tokens` new tokens, varied chat requests of 20-110 tokens (the instruct model answers them
at length: most reach `--new-tokens`). Printed per engine and C: aggregate
tokens/s (all completion tokens / wall time), p50 and p99 request latency (send to last token),
and the ratios against the same engine's C = 1. Goal (issue 13): batched, 8 clients at least 4x
the aggregate tokens/s of one, with p50 latency at most 2x a single request's.

Prefix reuse: a third server (batching on, `MEMLM_MODEL__PREFIX_CACHE_MB=0`) against the default
one: `--prefix-requests` requests one after another, each the same ~`--prefix-tokens`-token system
prompt and a different question; median time to first token (the server's own timing) after a
warm-up request that fills the cache.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPTS = [
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain, step by step and in detail, how a bicycle gear system works.",
    "List twenty things to pack for a week of hiking in the mountains, with a sentence on each.",
    "The history of the lighthouse at Kell begins in 1854, when the volcano buried the old harbour in ash. "
    "The engineers who rebuilt the harbour wall needed a light to guide the fishing boats home at night. "
    "Write the next chapter of this history in detail:\n",
    "Describe the water cycle in detail, in at least ten paragraphs.",
    "Write a Python function that parses a CSV file without the csv module, and explain each line.",
    "Compare trains and planes for a 600 km trip: cost, time, comfort and emissions.",
    "Tell me about the life of bees in a hive over one year, season by season.",
]


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def load(address: str, clients: int, per_client: int, new_tokens: int) -> dict:
    """C closed-loop clients; returns aggregate tokens/s and latency percentiles."""
    import memlm

    latencies: list[float] = []
    tokens = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client_loop(c: int) -> None:
        try:
            with memlm.Client(address, timeout=1800) as client:
                for i in range(per_client):
                    prompt = PROMPTS[(c * per_client + i) % len(PROMPTS)]
                    t0 = time.perf_counter()
                    result = client.generate(messages=[{"role": "user", "content": prompt}], memory="none",
                                             max_new_tokens=new_tokens).result
                    dt = time.perf_counter() - t0
                    with lock:
                        latencies.append(dt)
                        tokens[0] += result.completion_tokens
        except BaseException as exc:  # noqa: BLE001 - reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return dict(tok_s=tokens[0] / wall, p50=percentile(latencies, 0.5), p99=percentile(latencies, 0.99),
                requests=len(latencies), tokens=tokens[0])


def serve(tmp: str, name: str, env: dict):
    from memlm.services.process import ServerProcess

    return ServerProcess(Path(tmp) / name, env=env)


def engine_rows(args, name: str, env: dict) -> list[dict]:
    import memlm

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        server = serve(tmp, name, env)
        try:
            with memlm.Client(server.address, timeout=600) as client:
                client.generate("Hello", memory="none", max_new_tokens=4).result  # warm-up
            for c in args.clients:
                per_client = max(1, args.requests)
                row = load(server.address, c, per_client, args.new_tokens)
                row["clients"] = c
                rows.append(row)
                print(f"  {name}: {c:2d} clients: {row['tok_s']:6.1f} tok/s aggregate, p50 {row['p50']:.2f} s, "
                      f"p99 {row['p99']:.2f} s ({row['requests']} requests, {row['tokens']} tokens)", flush=True)
        finally:
            server.terminate()
    return rows


def prefix_ttft(args, name: str, env: dict) -> float:
    import memlm

    system = ("You are the help desk of the Kell lighthouse museum. The museum opens at nine and closes at five, "
              "every day but Monday. Tickets cost six euros, children under twelve enter free. The tower has 212 "
              "steps and no lift. Guided tours start on the hour. ")
    words = len(system.split())
    system = system * max(1, round(args.prefix_tokens / (words * 1.3)))
    questions = ["When does it open?", "How much is a ticket?", "Is there a lift?", "When do tours start?",
                 "Can children come?", "Is it open on Monday?", "How many steps are there?", "Where is it?"]
    ttfts, prompt_tokens = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        server = serve(tmp, name, env)
        try:
            with memlm.Client(server.address, timeout=600) as client:
                client.generate(system + "Hello?", memory="none", max_new_tokens=2).result  # fills the cache
                for q in questions[: args.prefix_requests]:
                    result = client.generate(system + q, memory="none", max_new_tokens=2).result
                    ttfts.append(result.timings.time_to_first_token_ms / 1000)
                    prompt_tokens = result.prompt_tokens
        finally:
            server.terminate()
    median = statistics.median(ttfts)
    print(f"  {name}: {prompt_tokens}-token prompts, time to first token median {median * 1000:.0f} ms "
          f"({', '.join(f'{t * 1000:.0f}' for t in ttfts)})", flush=True)
    return median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--prefix-tokens", type=int, default=1000)
    ap.add_argument("--prefix-requests", type=int, default=6)
    ap.add_argument("--skip-engines", action="store_true", help="only the prefix-reuse part")
    ap.add_argument("--skip-prefix", action="store_true")
    args = ap.parse_args()
    base = {"MEMLM_MODEL__TORCH_THREADS": str(args.threads)}

    if not args.skip_engines:
        print(f"concurrent clients, greedy, {args.new_tokens} new tokens, {args.requests} requests per client:")
        batched = engine_rows(args, "batched", base)
        serial = engine_rows(args, "one-at-a-time", {**base, "MEMLM_MODEL__BATCHING": "false"})
        print("\n| clients | one-at-a-time: tok/s, p50, p99 | **batched**: tok/s, p50, p99 | batched tok/s vs its 1 client "
              "| batched p50 vs its 1 client | batched vs one-at-a-time tok/s |")
        print("| --- | --- | --- | --- | --- | --- |")
        b1, s1 = batched[0], serial[0]
        for b, s in zip(batched, serial):
            print(f"| {b['clients']} | {s['tok_s']:.1f}, {s['p50']:.2f} s, {s['p99']:.2f} s "
                  f"| **{b['tok_s']:.1f}**, {b['p50']:.2f} s, {b['p99']:.2f} s | {b['tok_s'] / b1['tok_s']:.2f}x "
                  f"| {b['p50'] / b1['p50']:.2f}x | {b['tok_s'] / s['tok_s']:.2f}x |")
        eight = next((b for b in batched if b["clients"] == 8), None)
        if eight is not None:
            ok = eight["tok_s"] >= 4 * b1["tok_s"] and eight["p50"] <= 2 * b1["p50"]
            print(f"\ngoal (8 clients >= 4x one's tok/s, p50 <= 2x): {eight['tok_s'] / b1['tok_s']:.2f}x tok/s, "
                  f"{eight['p50'] / b1['p50']:.2f}x p50: {'met' if ok else 'MISSED'}")
    if not args.skip_prefix:
        print(f"\nprefix reuse, ~{args.prefix_tokens}-token shared system prompt:")
        on = prefix_ttft(args, "prefix cache on", base)
        off = prefix_ttft(args, "prefix cache off", {**base, "MEMLM_MODEL__PREFIX_CACHE_MB": "0"})
        print(f"time to first token: {on * 1000:.0f} ms with reuse, {off * 1000:.0f} ms without: {off / on:.1f}x faster")


if __name__ == "__main__":
    sys.exit(main())
