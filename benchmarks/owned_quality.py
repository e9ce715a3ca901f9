"""What each weight format of the owned Llama costs in quality, on the bundled SmolLM2-135M.

Three measures per format (memlm.model.quantize; "int4+head4" is int4 with the head int4 too; a
"+kv16" suffix keeps the format's KV caches in fp16, `Llama.kv_dtype`, as the server does for q4_1):
- perplexity on real held-out text: the "stdlib" corpus stream (benchmarks/corpus.py: docstring
  paragraphs of Python's standard library), from paragraph --text-offset on, --windows windows of
  --window tokens, each scored on its own (no context carried over); with --kv-chunk N, each
  window goes through a KV cache N tokens a pass, so every position reads the earlier ones from the
  cache in its dtype (what a KV dtype changes);
- greedy continuations of a few prompts (--new-tokens), and how many leading tokens equal fp32's;
- pass key in plain `none` mode: the leading stdlib documents (~1,000 tokens each) that add up
  to ~--passkey-tokens tokens, all in the prompt, with the needle at a seeded random depth (as benchmarks/passkey.py builds them), the question after them, 10 greedy
  tokens; a trial counts when the key is in them. The same seeded trials for every format.

    .venv/bin/python benchmarks/owned_quality.py [--formats dense q4_1 int4 int8 int4+head4] [--windows 4]
        [--window 1024] [--kv-chunk 0] [--passkey-trials 5] [--passkey-tokens 2048] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memlm.model import Llama, greedy_generate, load_llama
from memlm.model.quantize import quantize_model
from memlm.models import bundled_model_dir, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import documents_for_tokens, needle_sentence, pack_documents, place_needle, text_units  # noqa: E402

QUESTION = "What is the pass key? The pass key is"  # passkey.py's
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "A hash table stores keys and values so that",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
]


def build(fmt: str, dense: Llama) -> Llama:
    fmt, kv16 = fmt.removesuffix("+kv16"), fmt.endswith("+kv16")
    if fmt == "dense" and not kv16:
        return dense
    weights, head = ("int4", "int4") if fmt == "int4+head4" else (fmt, None)
    model = copy.deepcopy(dense) if weights == "dense" else quantize_model(copy.deepcopy(dense), weights, head=head)
    if kv16:
        model.kv_dtype = torch.float16
    return model


@torch.inference_mode()
def perplexity(model: Llama, windows: list[torch.Tensor], kv_chunk: int = 0) -> float:
    nll, n = 0.0, 0
    for ids in windows:  # (1, W)
        W = ids.shape[1]
        if kv_chunk:
            cache = model.new_cache(1, W)
            logits = torch.cat([model(ids[:, i:i + kv_chunk], torch.arange(i, min(i + kv_chunk, W)), cache)[0]
                                for i in range(0, W, kv_chunk)])[:-1]
        else:
            logits = model(ids, torch.arange(W))[0, :-1]  # (W - 1, V)
        nll += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        n += ids.shape[1] - 1
    return math.exp(nll / n)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--formats", nargs="+", default=["dense", "q4_1", "int4", "int8", "int4+head4"])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--kv-chunk", type=int, default=0, help="score each window through a KV cache this many tokens "
                   "a pass (0: the whole window in one pass, no cache)")
    p.add_argument("--text-offset", type=int, default=20000, help="first stdlib paragraph used (held out from "
                   "the passkey haystacks, which start at 0)")
    p.add_argument("--new-tokens", type=int, default=24)
    p.add_argument("--passkey-trials", type=int, default=5)
    p.add_argument("--passkey-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", choices=("avx2", "avx512-vnni"), default=None,
                   help="instruction set of the block formats' kernels (default: the best this CPU has; with "
                   "avx512-vnni the x16 integer kernel runs at every row count, prefill included)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from memlm.kernels import qmatmul_cpu

    if args.isa:
        qmatmul_cpu.set_isa(args.isa)
    print(f"block formats (q4_1, q8_0) on the {qmatmul_cpu.isa()} kernels, {torch.get_num_threads()} threads")
    folder = bundled_model_dir()
    tok = load_tokenizer(folder)
    dense = load_llama(folder)
    models = {fmt: build(fmt, dense) for fmt in args.formats}

    stream, ids = text_units("stdlib", seed=args.text_offset), []
    while len(ids) < args.windows * args.window:
        ids += tok(next(stream) + "\n\n").input_ids
    windows = [torch.tensor([ids[i * args.window:(i + 1) * args.window]]) for i in range(args.windows)]
    how = f", through the KV cache {args.kv_chunk} tokens a pass" if args.kv_chunk else ""
    print(f"perplexity on {args.windows} x {args.window} tokens of stdlib docstrings (from paragraph {args.text_offset}{how}):")
    for fmt, model in models.items():
        t0 = time.perf_counter()
        print(f"  {fmt:11s} {perplexity(model, windows, args.kv_chunk):.3f}  ({time.perf_counter() - t0:.0f} s)", flush=True)

    print(f"\ngreedy, {args.new_tokens} tokens:")
    for prompt in PROMPTS:
        pid = tok(prompt, return_tensors="pt").input_ids
        ref = None
        for fmt, model in models.items():
            out = greedy_generate(model, pid, args.new_tokens)
            ref = out if ref is None else ref
            n = min(len(out), len(ref))
            same = int((out[:n] == ref[:n]).cumprod(0).sum())
            print(f"  {fmt:11s} same {same:2d}/{len(ref)}: {tok.decode(out)!r}", flush=True)

    count = lambda text: len(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    docs = pack_documents("stdlib", args.passkey_tokens // 1000 + 2, count)
    counts = [count(d.text) for d in docs]
    m = documents_for_tokens(counts, args.passkey_tokens)  # the leading documents closest to N tokens
    docs, counts = docs[:m], counts[:m]
    wins = {fmt: 0 for fmt in models}
    print(f"\npass key, none mode, ~{args.passkey_tokens} tokens of stdlib documents:")
    for trial in range(args.passkey_trials):
        rng = random.Random(args.passkey_tokens * 1000 + trial * 10 + 2)  # passkey.py's seeding (stdlib = kind 2)
        key = str(rng.randint(10000, 99999))
        at, needled, depth = place_needle(docs, counts, rng.uniform(0.05, 0.95), needle_sentence(key), count)
        text = "\n\n".join((needled if i == at else d).text for i, d in enumerate(docs))
        hay = tok(text, add_special_tokens=False).input_ids
        q = tok("\n\n" + QUESTION, add_special_tokens=False).input_ids
        prompt = torch.tensor([hay + q])
        line = [f"  trial {trial} key {key} depth {depth:.2f} tokens {prompt.shape[1]}"]
        for fmt, model in models.items():
            ok = key in tok.decode(greedy_generate(model, prompt, 10))
            wins[fmt] += ok
            line.append(f"{fmt}={int(ok)}")
        print(" ".join(line), flush=True)
    print("  " + ", ".join(f"{fmt} {wins[fmt]}/{args.passkey_trials}" for fmt in models))


if __name__ == "__main__":
    main()
