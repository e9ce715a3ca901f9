"""Two measurements behind the batched engine's step (memlm.scheduler), on the bundled SmolLM2-135M
in q4_1 with the served fp16 KV caches, in one run:

- "mixed": one step of D decoding sequences (100 tokens in each cache) beside one prompt of P
  tokens, run as one ragged pass (the decoders then take the module path too) against apart: the
  decoders' one-call C stack, then the prompt alone (what `BatchScheduler._forward` does);
- "rows": 30 layers' distinct projections (QKV, output, gate/up, down) over M rows, on the x16
  integer kernel against the bf16 weight copy on oneDNN's GEMM (AMX where the CPU has it), the
  crossover behind `_BlockLinear.AMX_ROWS`. Needs AVX512-VNNI (the x16 kernel).

Medians of --rounds, the variants interleaved within each round.

    .venv/bin/python benchmarks/batched_step.py [--decoders 7] [--prompts 20 60 200] [--rows 8 32 64 128 256 512]
        [--rounds 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

VOCAB = 49152


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@torch.inference_mode()
def mixed(model, args) -> None:
    from memlm.model.generate import prefill, ragged_step
    from memlm.model.llama import RaggedBatch

    gen = torch.Generator().manual_seed(0)
    D = args.decoders
    caches = [model.new_cache(1, 400) for _ in range(D)]
    for c in caches:
        prefill(model, torch.randint(0, VOCAB, (1, 100), generator=gen), c)
    tokens = torch.randint(0, VOCAB, (D,), generator=gen)
    print(f"\nmixed step: {D} decoders (position 100) beside one prompt, ms (medians of {args.rounds}):")
    print("| prompt tokens | one pass | apart: decoders' C stack + prompt alone | apart / one pass |")
    print("| --- | --- | --- | --- |")
    for P in args.prompts:
        cache = model.new_cache(1, 400)
        prompt = torch.randint(0, VOCAB, (P,), generator=gen)
        together, apart = [], []
        for r in range(args.rounds + 1):
            # the same positions every round: the cost is the same
            t = timed(lambda: ragged_step(model, torch.cat([tokens, prompt]),
                                          RaggedBatch(caches + [cache], [100] * D + [0], [1] * D + [P])))
            d = timed(lambda: ragged_step(model, tokens, RaggedBatch(caches, [100] * D, [1] * D)))
            p = timed(lambda: prefill(model, prompt[None], cache, 0))
            if r:
                together.append(t)
                apart.append((d, p))
        t = statistics.median(together)
        d, p = statistics.median(a for a, _ in apart), statistics.median(b for _, b in apart)
        print(f"| {P} | {t:.1f} | {d:.1f} + {p:.1f} = {d + p:.1f} | {(d + p) / t:.2f}x |", flush=True)


@torch.inference_mode()
def rows(model, args) -> None:
    from memlm.kernels import qmatmul_cpu

    if not qmatmul_cpu.has_vnni():
        print("\nrows: this CPU has no AVX512-VNNI (no x16 kernel to compare)")
        return
    qmatmul_cpu.set_isa("avx512-vnni")
    mods = [m for b in model.layers for m in (b.attention.wqkv, b.attention.wo, b.feed_forward.w13, b.feed_forward.w2)]
    bf16 = [m._unpack().to(torch.bfloat16) for m in mods]
    print(f"\n30 layers' projections over M rows, ms (medians of {args.rounds}; AMX bf16: {qmatmul_cpu.has_amx_bf16()}):")
    print("| M | x16 integer kernel | bf16 GEMM (oneDNN) | bf16 / x16 |")
    print("| --- | --- | --- | --- |")
    for M in args.rows:
        xs = [torch.randn(M, m.in_features) for m in mods]
        a, b = [], []
        for r in range(args.rounds + 1):
            ta = timed(lambda: [m._matmul(x) for m, x in zip(mods, xs)])
            tb = timed(lambda: [F.linear(x.to(torch.bfloat16), w).float() for w, x in zip(bf16, xs)])
            if r:
                a.append(ta)
                b.append(tb)
        ma, mb = statistics.median(a), statistics.median(b)
        print(f"| {M} | {ma:.1f} | {mb:.1f} | {mb / ma:.2f}x |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decoders", type=int, default=7)
    p.add_argument("--prompts", type=int, nargs="+", default=[20, 60, 200])
    p.add_argument("--rows", type=int, nargs="+", default=[8, 32, 64, 128, 256, 512])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from memlm.model import load_llama
    from memlm.models import bundled_model_dir

    model = load_llama(bundled_model_dir(), weights="q4_1")
    model.kv_dtype = torch.float16  # as served (model.kv_cache_dtype "auto")
    print(f"bundled SmolLM2-135M in q4_1, fp16 KV, {torch.get_num_threads()} threads")
    mixed(model, args)
    rows(model, args)


if __name__ == "__main__":
    main()
