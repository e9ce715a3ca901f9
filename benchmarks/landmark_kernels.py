"""One decode step of landmark attention on the GPU: the fused Triton kernel against its PyTorch
reference, as the memory grows.

    python benchmarks/landmark_kernels.py [--n 65536 262144 1048576] [--batch 1 16] [--heads 3/9]
        [--k 4] [--block 64] [--local 1024] [--representation landmark max]
    python benchmarks/landmark_kernels.py --interpret   # CPU: the script's own check, tiny shapes

Fused:     memlm.kernels.landmark_attention_triton: block scoring, top-k selection and the gather
           attention in one kernel, no block score written out.
Reference: memlm.kernels.landmark_reference on the same CUDA tensors (PyTorch ops: every block
           score written out, torch.topk, the rows gathered, the softmax).
Representations: "landmark", one key per block of --block rows (the trained landmark's or the
mean key: the flat-cost case, N / block keys scanned); "max", every row scored (the training-free
default, exact; N keys scanned). Before timing, the two must choose the same blocks (the share
that agree is printed) and agree on the output (max |diff|). Times are medians of
triton.testing.do_bench. Needs CUDA unless --interpret (exits with status 2 without it).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch


def make_inputs(b, hq, hkv, n, d, block, local, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=g)
    kc = torch.randn(b, hkv, local, d, device=device, dtype=dtype, generator=g)
    vc = torch.randn(b, hkv, local, d, device=device, dtype=dtype, generator=g)
    mk = torch.randn(hkv, n, d, device=device, dtype=dtype, generator=g)
    mv = torch.randn(hkv, n, d, device=device, dtype=dtype, generator=g)
    nb = -(-n // block)
    rows = torch.arange(nb * block, device=device).view(nb, block)
    rows = rows.masked_fill(rows >= n, -1)
    return q, kc, vc, mk, mv, rows


def representation(kind: str, mk: torch.Tensor, rows: torch.Tensor) -> dict:
    if kind == "max":
        return {}
    keys = mk[:, rows.clamp(min=0)].float()  # (Hkv, nB, R, D)
    present = (rows >= 0)[None, ..., None]
    mean = ((keys * present).sum(2) / present.sum(2).clamp(min=1)).to(mk.dtype)  # (Hkv, nB, D)
    return {"rep_k": mean, "rep_rows": torch.arange(rows.shape[0], device=mk.device)[:, None]}


def timer(fn, reps_ms: int, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, rep=reps_ms, return_mode="median")
    fn()
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def bench_case(b, hq, hkv, n, d, k, block, local, dtype, kind, reps_ms, device) -> dict:
    from memlm.kernels.landmark_attention_triton import landmark_attention
    from memlm.kernels.landmark_reference import landmark_attention_ref

    q, kc, vc, mk, mv, rows = make_inputs(b, hq, hkv, n, d, block, local, dtype, device)
    rep = representation(kind, mk, rows)
    out_f, reads_f = landmark_attention(q, kc, vc, mk, mv, rows, k, **rep)
    out_r, reads_r = landmark_attention_ref(q, kc, vc, mk, mv, rows, k, **rep)
    same = (reads_f.blocks.sort(-1).values == reads_r.blocks.sort(-1).values).all(-1).float().mean().item()
    max_diff = (out_f.float() - out_r.float()).abs().max().item()
    t_ref = timer(lambda: landmark_attention_ref(q, kc, vc, mk, mv, rows, k, **rep), reps_ms, device)
    t_fused = timer(lambda: landmark_attention(q, kc, vc, mk, mv, rows, k, **rep), reps_ms, device)
    scanned = n if kind == "max" else rows.shape[0]
    gbps = hkv * scanned * d * mk.element_size() / (t_fused * 1e-3) / 1e9
    del q, kc, vc, mk, mv, rows, rep
    if device == "cuda":
        torch.cuda.empty_cache()
    return dict(ref_ms=t_ref, fused_ms=t_fused, speedup=t_ref / t_fused, same=same, max_diff=max_diff, gbps=gbps,
                scanned=scanned)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[65536, 262144, 1048576], help="memory tokens")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--heads", default="3/9", help="KV heads / query heads (3/9: the bundled model's)")
    ap.add_argument("--k", type=int, default=4, help="blocks read per query head")
    ap.add_argument("--block", type=int, default=64, help="rows per block")
    ap.add_argument("--local", type=int, default=1024, help="local KV-cache length")
    ap.add_argument("--representation", nargs="+", choices=["landmark", "max"], default=["landmark", "max"])
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per measurement")
    ap.add_argument("--interpret", action="store_true", help="CPU under TRITON_INTERPRET=1, tiny shapes (a check)")
    args = ap.parse_args(argv)
    hkv, hq = (int(x) for x in args.heads.split("/"))
    if hkv <= 0 or hq % hkv:
        ap.error(f"--heads {args.heads!r}: query heads must be a positive multiple of KV heads")
    args.hkv, args.hq = hkv, hq
    if args.interpret:
        args.n, args.batch, args.local = [257], [1], 16
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.interpret:
        if "triton" in sys.modules or any(m.endswith("_triton") for m in sys.modules):
            print("--interpret must set TRITON_INTERPRET=1 before triton loads", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        device, name = "cpu", "CPU (Triton interpreter: a check of the script, not a speed)"
    elif not torch.cuda.is_available():
        print("benchmarks/landmark_kernels.py needs a CUDA GPU (the kernel's speed is what it measures); none is "
              "visible to torch. --interpret checks the script on CPU.", file=sys.stderr)
        return 2
    else:
        device, name = "cuda", torch.cuda.get_device_name()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    print(f"# {name}  Hkv/Hq={args.hkv}/{args.hq}  D={args.head_dim}  k={args.k} blocks of {args.block}  "
          f"local={args.local}  {args.dtype}")
    print("| representation | memory tokens | batch | keys scanned | reference ms | fused ms | speed-up | "
          "scan GB/s | same blocks | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for kind in args.representation:
        for b in args.batch:
            for n in args.n:
                try:
                    r = bench_case(b, args.hq, args.hkv, n, args.head_dim, args.k, args.block, args.local, dtype,
                                   kind, args.rep_ms, device)
                except torch.cuda.OutOfMemoryError:
                    print(f"| {kind} | {n} | {b} | out of GPU memory, skipped |")
                    torch.cuda.empty_cache()
                    continue
                print(f"| {kind} | {n:,} | {b} | {r['scanned']:,} | {r['ref_ms']:.3f} | {r['fused_ms']:.3f} | "
                      f"{r['speedup']:.2f}x | {r['gbps']:.0f} | {100 * r['same']:.0f}% | {r['max_diff']:.2e} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
