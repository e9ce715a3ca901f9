"""The CPU weight-only matmul kernels at SmolLM2-135M's decode shapes, side by side in one run:
memlm's Q4_1 / Q8_0 kernel (memlm.kernels.qmatmul_cpu) against PyTorch's `_weight_int4pack_mm_for_cpu`
(Int4Linear), `_weight_int8pack_mm` (Int8Linear) and fp32 `F.linear` (MKL).

"layers": one input row through 30 layers' distinct projections (fused QKV 576 -> 960, output
576 -> 576, gate/up 576 -> 3072, down 1536 -> 576), so the weights stream from memory as in a
decode step rather than sitting in cache; "head": the 576 -> 49152 output projection; "prefill":
128 rows through one gate/up projection, where the block formats unpack the weight to fp32 in C
and run the BLAS GEMM (`PREFILL_ROWS`), shown beside their integer kernel alone. Random weights
(speed does not depend on their values). Rounds interleave the kernels; medians of --rounds.
"bundled prefill": the bundled SmolLM2-135M in q4_1, one forward pass over --prompt-tokens
tokens, with the GEMM path against the integer kernel for every row count, where the CPU has AMX
the bf16 GEMM from `AMX_ROWS` rows (the served path there), and dense fp32.
"batched decode": the bundled model in q4_1, one decode step of B sequences (128 tokens in each
cache) as the batch scheduler runs it (memlm.model.RaggedBatch; B = 1 is the fused one-sequence
layer): with the AVX2 kernels, the module path on the integer kernel and on the bf16 weight copy
and the fused C layer over B rows (`qmatmul_cpu.q4_1_decode_layer_batch`); and, where the CPU has
AVX512-VNNI, the fused layers on the x16 kernels, a C call per layer, then the whole stack in one
call (`Llama.decode_stack`) with fp32 and with fp16 KV caches (the served path there): ms per
step and aggregate tokens/s.
Each part runs its kernels under each instruction set the CPU has (`qmatmul_cpu.set_isa`): AVX2,
and AVX512-VNNI, where the block formats use their x16 copies at every row count.

    .venv/bin/python benchmarks/qmatmul_cpu.py [--threads 1] [--rounds 5] [--prompt-tokens 256] [--only-batched]
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from memlm.kernels import qmatmul_cpu
from memlm.model.quantize import Int4Linear, Int8Linear, Q4_1Linear, Q8_0Linear

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K) per decoder layer
N_LAYERS, VOCAB, DIM = 30, 49152, 576


def _isas() -> list[str]:
    return ["avx2"] + (["avx512-vnni"] if qmatmul_cpu.available() is None and qmatmul_cpu.has_vnni() else [])


ISAS = _isas()


def on(isa: "str | None", fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the kernels' instruction set `isa` in force (None: as it is)."""
    if isa is None:
        return fn

    def run() -> object:
        qmatmul_cpu.set_isa(isa)
        return fn()
    return run


def timed_ms(fn: Callable[[], object], reps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--only-batched", action="store_true", help="only the batched decode part")
    args = p.parse_args()
    if args.only_batched:
        torch.set_num_threads(args.threads)
        return batched_decode(args)
    torch.set_num_threads(args.threads)
    if (why := qmatmul_cpu.available()) is not None:
        raise SystemExit(f"the Q4_1/Q8_0 kernel cannot run here: {why}")
    torch.manual_seed(0)
    weights = [torch.randn(N, K) * 0.05 for _ in range(N_LAYERS) for N, K in LAYER_SHAPES]
    head = torch.randn(VOCAB, DIM) * 0.05
    x = {K: torch.randn(1, K) for K in (576, 1536)}
    x128 = torch.randn(128, 576)

    def dense(w: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda inp: F.linear(inp, w)

    formats = {  # name: (layer class for the projections, class for the head, instruction set)
        **{f"q4_1 / q8_0 head (memlm kernel, {isa})": (Q4_1Linear, Q8_0Linear, isa) for isa in ISAS},
        "int4 / int8 head (PyTorch kernels)": (Int4Linear, Int8Linear, None),
        "fp32 (MKL)": (dense, dense, None),
    }
    built = {}
    for name, (layer_cls, head_cls, isa) in formats.items():
        layers = [layer_cls(w) for w in weights]
        built[name] = {
            "layers": on(isa, lambda layers=layers: [m(x[m_k]) for m, m_k in zip(layers, [K for _, K in LAYER_SHAPES] * N_LAYERS)]),
            "head": on(isa, lambda h=head_cls(head): h(x[576])),
            "prefill": on(isa, lambda m=layers[2]: m(x128)),
        }
        if layer_cls is Q4_1Linear and isa == "avx2":
            built["q4_1 integer kernel alone (avx2)"] = {"prefill": on(isa, lambda m=layers[2]: m._matmul(x128))}
    times = {name: {part: [] for part in parts} for name, parts in built.items()}
    with torch.inference_mode():
        for parts in built.values():  # warm-up
            for fn in parts.values():
                fn()
        for _ in range(args.rounds):
            for name, parts in built.items():
                for part, fn in parts.items():
                    times[name][part].append(timed_ms(fn, 3 if part != "layers" else 2))
    print(f"threads={torch.get_num_threads()}, medians of {args.rounds} rounds (ms)")
    print("| kernel | 30 layers, 1 row | head, 1 row | gate/up, 128 rows |")
    print("| --- | --- | --- | --- |")
    base = next(iter(built))
    med = {n: {p: statistics.median(v) for p, v in t.items()} for n, t in times.items()}
    for name in built:
        cells = [f"{med[name][p]:.2f}" + ("" if name == base else f" ({med[name][p] / med[base][p]:.2f}x)")
                 if p in med[name] else "" for p in ("layers", "head", "prefill")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"(x: time relative to {base})")
    bundled_prefill(args)
    batched_decode(args)


@torch.inference_mode()
def batched_decode(args) -> None:
    from memlm.model import load_llama
    from memlm.model.generate import decode_one_token, prefill, ragged_step
    from memlm.model.llama import RaggedBatch
    from memlm.models import bundled_model_dir

    model = load_llama(bundled_model_dir(), weights="q4_1")
    batch_rows = Q4_1Linear.BATCH_ROWS
    if batch_rows is None:
        print("\nbatched decode: this CPU has no native bf16; the integer kernel serves every row count")
    # (fused C layers?, BATCH_ROWS, instruction set, one-call stack?, KV dtype): with AVX2, the module
    # path on the integer kernel and on the bf16 copy at every row count, and the fused path; with
    # VNNI, the fused layers on the x16 kernels one C call per layer, then the whole stack in one
    # call (`Llama.decode_stack`) with fp32 and with fp16 KV caches (the served path)
    f32, f16 = torch.float32, torch.float16
    variants = {"avx2: module path, integer kernel": (False, None, "avx2", False, f32)} | (
        {"avx2: module path, bf16 weights": (False, 2, "avx2", False, f32)} if batch_rows else {}) | {
        "avx2: fused C layer over B rows": (True, batch_rows, "avx2", True, f32)} | ({
            "avx512-vnni: fused C layers, x16, a call per layer": (True, batch_rows, "avx512-vnni", False, f32),
            "avx512-vnni: one-call stack, fp32 KV": (True, batch_rows, "avx512-vnni", True, f32),
            "avx512-vnni: one-call stack, fp16 KV (served)": (True, batch_rows, "avx512-vnni", True, f16),
        } if "avx512-vnni" in ISAS else {})
    fused, stack = [b.decode_fast for b in model.layers], model.decode_stack
    gen = torch.Generator().manual_seed(0)
    print(f"\nbundled SmolLM2-135M in q4_1, one decode step of B sequences at position 128, "
          f"medians of {args.rounds} rounds of 4 steps:")
    print("| B | " + " | ".join(f"{v}: ms/step, tok/s" for v in variants) + " |")
    print("| --- |" + " --- |" * len(variants))
    try:
        for B in args.batch_sizes:
            caches = {}
            for dtype in (f32, f16):
                caches[dtype] = [model.new_cache(1, 160, dtype) for _ in range(B)]
                for c in caches[dtype]:
                    prefill(model, torch.randint(0, VOCAB, (1, 128), generator=gen), c)
            tokens = torch.randint(0, VOCAB, (B,), generator=gen)
            times = {v: [] for v in variants}
            for r in range(args.rounds + 1):
                for v, (use_fused, rows, isa, use_stack, dtype) in variants.items():
                    Q4_1Linear.BATCH_ROWS = Q8_0Linear.BATCH_ROWS = rows
                    qmatmul_cpu.set_isa(isa)
                    for b, f in zip(model.layers, fused):
                        b.decode_fast = f if use_fused else None
                    model.decode_stack = stack if use_stack else None
                    cs = caches[dtype]
                    t0 = time.perf_counter()
                    for _ in range(4):  # the same positions again: the cost is the same
                        if B == 1:
                            decode_one_token(model, tokens[:1, None], torch.tensor([128]), cs[0])
                        else:
                            ragged_step(model, tokens, RaggedBatch(cs, [128] * B, [1] * B))
                    if r:
                        times[v].append((time.perf_counter() - t0) / 4 * 1e3)
            cells = [f"{statistics.median(t):.1f}, {B / statistics.median(t) * 1e3:.1f}" for t in times.values()]
            print(f"| {B} | " + " | ".join(cells) + " |", flush=True)
    finally:
        Q4_1Linear.BATCH_ROWS = Q8_0Linear.BATCH_ROWS = batch_rows
        qmatmul_cpu.set_isa(ISAS[-1])
        for b, f in zip(model.layers, fused):
            b.decode_fast = f
        model.decode_stack = stack


@torch.inference_mode()
def bundled_prefill(args) -> None:
    from memlm.model import load_llama
    from memlm.models import bundled_model_dir

    folder = bundled_model_dir()
    T = args.prompt_tokens
    tokens = torch.randint(0, VOCAB, (1, T), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(T)
    q4, dense = load_llama(folder, weights="q4_1"), load_llama(folder, weights="dense")
    gemm_rows, amx_rows = Q4_1Linear.PREFILL_ROWS, Q4_1Linear.AMX_ROWS
    # (model, PREFILL_ROWS, instruction set, AMX_ROWS)
    runs = {"q4_1 avx2, GEMM from PREFILL_ROWS": (q4, gemm_rows, "avx2", None),
            "q4_1 avx2, integer kernel only": (q4, 1 << 30, "avx2", None)} | (
        {"q4_1 avx512-vnni, x16 integer kernel (every row count)": (q4, gemm_rows, "avx512-vnni", None)}
        if "avx512-vnni" in ISAS else {}) | (
        {"q4_1 avx512-vnni, AMX bf16 GEMM from AMX_ROWS (served)": (q4, gemm_rows, "avx512-vnni", amx_rows)}
        if "avx512-vnni" in ISAS and amx_rows else {}) | {"dense fp32": (dense, gemm_rows, None, None)}
    times = {name: [] for name in runs}
    try:
        for r in range(args.rounds + 1):
            for name, (model, rows, isa, amx) in runs.items():
                if isa is not None:
                    qmatmul_cpu.set_isa(isa)
                Q4_1Linear.PREFILL_ROWS = Q8_0Linear.PREFILL_ROWS = rows
                Q4_1Linear.AMX_ROWS = Q8_0Linear.AMX_ROWS = amx
                t0 = time.perf_counter()
                model(tokens, pos)
                if r:  # the first round warms up
                    times[name].append((time.perf_counter() - t0) * 1e3)
    finally:
        Q4_1Linear.PREFILL_ROWS = Q8_0Linear.PREFILL_ROWS = gemm_rows
        Q4_1Linear.AMX_ROWS = Q8_0Linear.AMX_ROWS = amx_rows
        qmatmul_cpu.set_isa(ISAS[-1])
    base = next(iter(runs))
    print(f"\nbundled SmolLM2-135M, one forward pass over {T} tokens (logits for all), medians of {args.rounds} (ms):")
    for name, t in times.items():
        print(f"  {name}: {statistics.median(t):.0f}" + ("" if name == base else f" ({statistics.median(t) / statistics.median(times[base]):.2f}x)"))


if __name__ == "__main__":
    main()
