"""Tokens/s of `ModelHost.generate` against Hugging Face `model.generate`, same model, same process.

The host serves what `ModelHost.load` loads (memlm's own Llama for the bundled model;
`--model-impl transformers` for the transformers path); `model.generate` runs transformers'
LlamaForCausalLM of the same folder.

Mode none, greedy, 128 new tokens after a ~200-token prompt; one warm-up run each, then 3 runs
each, interleaved; the median is reported. tokens/s = new tokens / wall time of the whole call
(prefill included, as a user sees it). The prompt is a counting sequence so neither side stops
early at EOS (the script checks both made the same tokens).

    .venv/bin/python benchmarks/generation_direct.py [--runs 3] [--new-tokens 128] [--model-impl transformers]
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from memlm.config import ModelSettings
from memlm.engine import GenerationRequest, GenerationResult, SamplingParams
from memlm.host import ModelHost

PROMPT = "Counting, one number after another: " + ", ".join(str(i) for i in range(1, 50)) + ","


async def host_run(host: ModelHost, new_tokens: int) -> tuple[float, GenerationResult]:
    request = GenerationRequest(prompt=PROMPT, sampling=SamplingParams(max_new_tokens=new_tokens))
    t0 = time.perf_counter()
    async for event in host.generate(request):
        result = event
    return time.perf_counter() - t0, result


def hf_run(host: ModelHost, hf_model, new_tokens: int) -> tuple[float, list[int]]:
    inputs = host.tokenizer(PROMPT, return_tensors="pt")
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = hf_model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens)
    return time.perf_counter() - t0, out[0, inputs.input_ids.shape[1] :].tolist()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--model-impl", default="auto", choices=["auto", "memlm", "transformers"])
    args = parser.parse_args()

    from memlm.models.loading import load_causal_lm, model_facts, resolve_model_dir

    host = ModelHost.load(ModelSettings(model_impl=args.model_impl))
    hf_model = load_causal_lm(resolve_model_dir(None))
    prompt_tokens = len(host.tokenizer(PROMPT).input_ids)
    served = "memlm.model" if model_facts(host.model).owned else "transformers"
    print(f"{host.info().name} served on {served}, prompt {prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"greedy, torch threads={torch.get_num_threads()}")
    asyncio.run(host_run(host, 8)), hf_run(host, hf_model, 8)  # warm-up
    ours, theirs, decode_rates = [], [], []
    for _ in range(args.runs):
        seconds, result = asyncio.run(host_run(host, args.new_tokens))
        hf_seconds, hf_ids = hf_run(host, hf_model, args.new_tokens)
        assert result.text == host.tokenizer.decode(hf_ids, skip_special_tokens=True), "greedy outputs differ"
        ours.append(result.completion_tokens / seconds)
        theirs.append(len(hf_ids) / hf_seconds)
        decode_rates.append((result.completion_tokens - 1) / (result.timings.decode_ms / 1000))
        print(f"  ModelHost {ours[-1]:6.2f} tok/s ({result.completion_tokens} tokens, prefill "
              f"{result.timings.prefill_ms:.0f} ms, TTFT {result.timings.time_to_first_token_ms:.0f} ms)   "
              f"HF generate {theirs[-1]:6.2f} tok/s ({len(hf_ids)} tokens)")
    a, b = statistics.median(ours), statistics.median(theirs)
    print(f"median: ModelHost.generate {a:.2f} tok/s, HF model.generate {b:.2f} tok/s, ratio {a / b:.3f} "
          f"(goal >= 0.95); ModelHost decode-only {statistics.median(decode_rates):.2f} tok/s")
    asyncio.run(host.close())


if __name__ == "__main__":
    main()
