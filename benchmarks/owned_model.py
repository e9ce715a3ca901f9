"""Prefill and decode tokens/s of memlm's own Llama (`memlm.model`) against transformers'
`generate`, on the bundled SmolLM2-135M, in the same process.

Both sides are timed the same way, through their greedy generate call: prefill tokens/s =
prompt tokens / time(generate 1 new token); decode tokens/s = (N - 1) / (time(generate N) -
time(generate 1)), so the decode figure leaves prefill out. One warm-up run each, then --runs runs
interleaved; medians reported, and the best run of each (the steadier figure on a shared machine). The prompt is a counting sequence cut to --prompt-tokens, and both
sides are made to produce all N tokens (no early EOS).

    .venv/bin/python benchmarks/owned_model.py [--runs 3] [--prompt-tokens 128] [--new-tokens 128]
        [--threads 2] [--dtype float32|bfloat16] [--compile]

--dtype applies to both models; --compile wraps the owned model's decode step in torch.compile.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from memlm.model import Llama, decode_one_token, greedy_generate, load_llama
from memlm.models import bundled_model_dir, load_tokenizer

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
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    from transformers import AutoModelForCausalLM

    folder = bundled_model_dir()
    ours: Llama = load_llama(folder, dtype=dtype)
    theirs = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = load_tokenizer(folder)(PROMPT, return_tensors="pt").input_ids[:, : args.prompt_tokens]  # (1, T)
    T, N = ids.shape[1], args.new_tokens
    cache = ours.new_cache(1, T + N)
    step = torch.compile(decode_one_token, dynamic=True) if args.compile else decode_one_token

    def ours_run(n: int) -> torch.Tensor:
        return greedy_generate(ours, ids, n, cache=cache, decode_step=step)

    def theirs_run(n: int) -> torch.Tensor:
        with torch.inference_mode():
            out = theirs.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                  max_new_tokens=n, min_new_tokens=n)
        return out[0, T:]

    print(f"SmolLM2-135M-Instruct, {args.dtype}, torch threads={torch.get_num_threads()}, prompt {T} tokens, "
          f"{N} new tokens, greedy{', owned decode step compiled' if args.compile else ''}")
    for run in (ours_run, theirs_run):  # warm-up (and compilation)
        run(1), run(8)
    rates: dict[str, dict[str, list[float]]] = {"owned": {"prefill": [], "decode": []},
                                                 "transformers": {"prefill": [], "decode": []}}
    agree = []
    for _ in range(args.runs):
        outputs = {}
        for name, run in (("owned", ours_run), ("transformers", theirs_run)):
            t1, _ = timed(lambda: run(1))
            tn, outputs[name] = timed(lambda: run(N))
            rates[name]["prefill"].append(T / t1)
            rates[name]["decode"].append((N - 1) / (tn - t1))
        same = int((outputs["owned"] == outputs["transformers"]).cumprod(0).sum())
        agree.append(same)
        print(f"  owned prefill {rates['owned']['prefill'][-1]:7.1f} tok/s decode {rates['owned']['decode'][-1]:6.2f} tok/s"
              f"   transformers prefill {rates['transformers']['prefill'][-1]:7.1f} tok/s decode "
              f"{rates['transformers']['decode'][-1]:6.2f} tok/s   same first {same}/{N} tokens")
    for phase in ("prefill", "decode"):
        a, b = (statistics.median(rates[n][phase]) for n in ("owned", "transformers"))
        best_a, best_b = (max(rates[n][phase]) for n in ("owned", "transformers"))
        print(f"median {phase}: owned {a:.2f} tok/s, transformers {b:.2f} tok/s, ratio {a / b:.2f} "
              f"(best runs: {best_a:.2f} vs {best_b:.2f}, ratio {best_a / best_b:.2f})")


if __name__ == "__main__":
    main()
