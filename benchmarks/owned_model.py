"""Prefill and decode tokens/s of memlm's own Llama (`memlm.model`) in each weight format, against
transformers' `generate` and llama.cpp's `llama-bench`, on the bundled SmolLM2-135M, side by side.

Columns: `owned <format>` for each --formats entry (memlm.model.quantize: dense = the --dtype
weights, int8, int4), `transformers` (same --dtype), `llama.cpp` (llama-bench on the bundled Q4_1
GGUF itself; built or found by benchmarks/llama_bench.py, skipped with the reason when it cannot
be). The torch columns are timed through their greedy generate call: prefill tokens/s = prompt
tokens / time(generate 1 new token); decode tokens/s = (N - 1) / (time(generate N) -
time(generate 1)), so decode leaves prefill out. llama.cpp reports its own pp (prompt) and tg
(generation from an empty context) rates. One warm-up each, then --runs rounds with the columns
interleaved (a shared machine drifts); medians, best runs, and every column's ratio to llama.cpp
(else to transformers). The prompt is a counting sequence cut to --prompt-tokens, and every torch
column produces all N tokens (no early EOS); "same" counts the leading tokens equal to
transformers'.

    .venv/bin/python benchmarks/owned_model.py [--runs 3] [--prompt-tokens 128] [--new-tokens 128]
        [--threads 2] [--dtype float32|bfloat16] [--formats dense int8 int4] [--compile] [--no-llama-cpp]

--compile wraps the owned model's decode step in torch.compile.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from memlm.model import WEIGHT_FORMATS, Llama, decode_one_token, greedy_generate, load_llama
from memlm.models import bundled_model_dir, load_tokenizer
from memlm.models.loading import _bundled_gguf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_bench import find_llama_bench, run_llama_bench  # noqa: E402

PROMPT = "Counting, one number after another: " + ", ".join(str(i) for i in range(1, 200)) + ","


def timed(fn: Callable[[], torch.Tensor]) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--formats", nargs="+", default=["dense", "int4", "q4_1"], choices=WEIGHT_FORMATS)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--no-llama-cpp", action="store_true", help="leave the llama.cpp column out")
    parser.add_argument("--no-transformers", action="store_true", help="leave the transformers column out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    llama_bench, how = (None, "left out (--no-llama-cpp)") if args.no_llama_cpp else find_llama_bench()
    print(f"llama.cpp: {llama_bench or 'column skipped'} ({how})", flush=True)

    folder = bundled_model_dir()
    ids = load_tokenizer(folder)(PROMPT, return_tensors="pt").input_ids[:, : args.prompt_tokens]  # (1, T)
    T, N = ids.shape[1], args.new_tokens
    step = torch.compile(decode_one_token, dynamic=True) if args.compile else decode_one_token

    def owned_run(model: Llama) -> Callable[[int], torch.Tensor]:
        cache = model.new_cache(1, T + N)
        return lambda n: greedy_generate(model, ids, n, cache=cache, decode_step=step)

    runs: dict[str, Callable[[int], torch.Tensor]] = {}
    for fmt in args.formats:
        if fmt != "dense" and dtype != torch.float32:
            print(f"owned {fmt}: skipped (quantizes fp32 weights; --dtype is {args.dtype})")
            continue
        runs[f"owned {fmt}"] = owned_run(load_llama(folder, dtype=dtype, weights=fmt))
    if not args.no_transformers:
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()

        def theirs_run(n: int) -> torch.Tensor:
            with torch.inference_mode():
                out = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=n, min_new_tokens=n)
            return out[0, T:]

        runs["transformers"] = theirs_run
    columns = list(runs) + (["llama.cpp"] if llama_bench else [])

    print(f"SmolLM2-135M-Instruct, torch {args.dtype}, threads={torch.get_num_threads()}, prompt {T} tokens, "
          f"{N} new tokens, greedy{', owned decode step compiled' if args.compile else ''}", flush=True)
    for run in runs.values():  # warm-up (and compilation)
        run(1), run(8)
    rates: dict[str, dict[str, list[float]]] = {c: {"prefill": [], "decode": []} for c in columns}
    for _ in range(args.runs):
        outputs, line = {}, []
        for name, run in runs.items():
            t1, _ = timed(lambda: run(1))
            tn, outputs[name] = timed(lambda: run(N))
            rates[name]["prefill"].append(T / t1)
            rates[name]["decode"].append((N - 1) / (tn - t1))
        if llama_bench:
            for phase, rate in run_llama_bench(llama_bench, _bundled_gguf(), args.threads, T, N).items():
                rates["llama.cpp"][phase].append(rate)
        for name in columns:
            same = ""
            if name in outputs and "transformers" in outputs and name != "transformers":
                same = f", same {int((outputs[name] == outputs['transformers']).cumprod(0).sum())}/{N}"
            line.append(f"{name} {rates[name]['prefill'][-1]:.1f}/{rates[name]['decode'][-1]:.2f}{same}")
        print("  prefill/decode tok/s: " + "; ".join(line), flush=True)
    baseline = "llama.cpp" if llama_bench else "transformers" if "transformers" in runs else columns[0]
    print(f"\n| column | prefill tok/s (median, best) | decode tok/s (median, best) | decode / {baseline} | prefill / {baseline} |")
    print("| --- | --- | --- | --- | --- |")
    median = {c: {p: statistics.median(rates[c][p]) for p in rates[c]} for c in columns}
    for c in columns:
        pre, dec = rates[c]["prefill"], rates[c]["decode"]
        print(f"| {c} | {median[c]['prefill']:.1f} ({max(pre):.1f}) | {median[c]['decode']:.2f} ({max(dec):.2f}) | "
              f"{median[c]['decode'] / median[baseline]['decode']:.2f} | "
              f"{median[c]['prefill'] / median[baseline]['prefill']:.2f} |")

if __name__ == "__main__":
    main()
