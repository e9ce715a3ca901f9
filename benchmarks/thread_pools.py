"""What another thread's idle OpenMP team costs the model's decode, and what `memlm.openmp`'s
`release_thread_pool` gives back, in one process:

    .venv/bin/python benchmarks/thread_pools.py [--threads 2] [--new-tokens 128] [--runs 3]

The bundled model in q4_1 decodes --new-tokens greedy tokens after a 256-token prompt on a thread
of its own (as the model host's worker does), three ways, rounds interleaved, medians:
- alone: no other thread has run parallel torch work;
- beside a live team: another thread (alive, waiting) ran one parallel torch op and kept its
  OpenMP workers, as the main thread did after loading the model and the embedder's threads did
  after every batch before memlm.openmp;
- beside a released team: the same, then that thread called `release_thread_pool()`.
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from memlm.engine import SamplingParams
    from memlm.generation import generate_tokens
    from memlm.models.loading import load_model, load_tokenizer, resolve_model_dir
    from memlm.openmp import release_thread_pool

    folder = resolve_model_dir(None)
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, weights="q4_1")
    release_thread_pool()  # loading ran on this thread
    ids = tokenizer("def main():\n    import os\n    print(os.getcwd())\n" * 16).input_ids[:256]
    sampling = SamplingParams(max_new_tokens=args.new_tokens)

    def decode_on_a_thread() -> float:
        out = {}

        def run():
            torch.set_num_threads(args.threads)
            with torch.inference_mode():
                t0 = time.perf_counter()
                *_, o = generate_tokens(model, tokenizer, ids, sampling, threading.Event(), eos_ids=())
                out["rate"] = len(o.token_ids) / (time.perf_counter() - t0)
            release_thread_pool()

        t = threading.Thread(target=run)
        t.start()
        t.join()
        return out["rate"]

    def beside(release: bool) -> float:
        ready, done = threading.Event(), threading.Event()

        def other():
            torch.randn(1 << 22).exp()  # one parallel region: this thread's team
            if release:
                release_thread_pool()
            ready.set()
            done.wait()

        t = threading.Thread(target=other)
        t.start()
        ready.wait()
        try:
            return decode_on_a_thread()
        finally:
            done.set()
            t.join()

    columns = {"alone": decode_on_a_thread, "beside a live team": lambda: beside(False),
               "beside a released team": lambda: beside(True)}
    rates = {name: [] for name in columns}
    for i in range(args.runs + 1):  # the first round warms up
        for name, fn in columns.items():
            rate = fn()
            if i:
                rates[name].append(rate)
    base = statistics.median(rates["alone"])
    print(f"decode tok/s, {args.new_tokens} greedy tokens after 256, q4_1, {args.threads} threads, medians of {args.runs}:")
    print("| the decoding thread | tok/s | vs alone |")
    print("| --- | --- | --- |")
    for name in columns:
        rate = statistics.median(rates[name])
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
