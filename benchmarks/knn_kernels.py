"""One decode step of a memory layer on the GPU: fused Triton path against the PyTorch reference.

    python benchmarks/knn_kernels.py [--n 65536 262144 1048576 4194304] [--batch 1 16]
        [--head-dim 64 128] [--heads 8/32] [--k 32] [--local 1024] [--peak-gbps 3350]

Fused:     memory_topk (scan of mem_k, top-k in registers) + knn_attention (gather in-kernel).
Reference: scores = q @ mem_k^T (bf16 matmul, all N scores written), torch.topk, gather of the
           k rows, scaled_dot_product_attention over [local cache ; gathered rows].
Both run in the same process on the same tensors; times are medians of triton.testing.do_bench.
Default heads are Hkv/Hq = 8/32 (a Llama-8B-like layer); --heads 3/9 gives the bundled model's.
The fused output is compared with the reference before timing (max |diff| is printed; see
bench_case for why it need not be tiny).

Memory-scan bandwidth of memory_topk, against --peak-gbps (H100 SXM 3350, H200 4800):
    GB/s = Hkv * N * D * bytes_per_element / t_topk / 1e9
i.e. the bytes of mem_k it must read once (queries, candidates are negligible), over its time.
Goals from the issue: fused >= 3x faster than the reference at N = 1M, scan >= 60% of peak.
Needs CUDA: exits with status 2 without it.
"""
from __future__ import annotations

import argparse
import math
import sys

import torch
import torch.nn.functional as F


def make_inputs(b: int, hq: int, hkv: int, n: int, d: int, local: int, dtype, device, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype, generator=g)  # (B, Hq, 1, D)
    k_cache = torch.randn(b, hkv, local, d, device=device, dtype=dtype, generator=g)  # (B, Hkv, Tk, D)
    v_cache = torch.randn(b, hkv, local, d, device=device, dtype=dtype, generator=g)
    mem_k = torch.randn(hkv, n, d, device=device, dtype=dtype, generator=g)  # (Hkv, N, D)
    mem_v = torch.randn(hkv, n, d, device=device, dtype=dtype, generator=g)
    return q, k_cache, v_cache, mem_k, mem_v


def decode_step_reference(q, k_cache, v_cache, mem_k, mem_v, k: int) -> torch.Tensor:
    """Plain PyTorch: matmul scores, torch.topk, gather, SDPA. q (B, Hq, 1, D) -> (B, Hq, 1, D)."""
    b, hq, _, d = q.shape
    hkv, n, _ = mem_k.shape
    g = hq // hkv
    qh = q.view(b, hkv, g, d).transpose(0, 1).reshape(hkv, b * g, d)  # (Hkv, B*G, D)
    scores = torch.bmm(qh, mem_k.transpose(1, 2))  # (Hkv, B*G, N): every score written out
    idx = scores.topk(min(k, n), dim=-1).indices  # (Hkv, B*G, k)
    heads = torch.arange(hkv, device=q.device).view(hkv, 1, 1)
    mk = mem_k[heads, idx].view(hkv, b, g, -1, d).permute(1, 0, 2, 3, 4).reshape(b, hq, -1, d)  # (B, Hq, k, D)
    mv = mem_v[heads, idx].view(hkv, b, g, -1, d).permute(1, 0, 2, 3, 4).reshape(b, hq, -1, d)
    keys = torch.cat([k_cache.repeat_interleave(g, dim=1), mk], dim=2)  # (B, Hq, Tk + k, D)
    values = torch.cat([v_cache.repeat_interleave(g, dim=1), mv], dim=2)
    return F.scaled_dot_product_attention(q, keys, values)  # decode: every key is visible


def decode_step_fused(q, k_cache, v_cache, mem_k, mem_v, k: int, *, backend: str | None = None) -> torch.Tensor:
    """memory_topk + knn_attention through the dispatcher. q (B, Hq, 1, D) -> (B, Hq, 1, D)."""
    from memlm.kernels import knn_attention, memory_topk

    _, idx = memory_topk(q.squeeze(2), mem_k, k, backend=backend)  # (B, Hq, k)
    return knn_attention(q, k_cache, v_cache, mem_k, mem_v, idx.unsqueeze(2), backend=backend)


def bench_case(b, hq, hkv, n, d, k, local, dtype, peak_gbps, reps_ms) -> dict:
    from triton.testing import do_bench

    from memlm.kernels import memory_topk

    q, kc, vc, mem_k, mem_v = make_inputs(b, hq, hkv, n, d, local, dtype, "cuda")
    out_f = decode_step_fused(q, kc, vc, mem_k, mem_v, k)
    out_r = decode_step_reference(q, kc, vc, mem_k, mem_v, k)
    # The reference ranks by bf16-rounded scores, the kernel by fp32 ones: near the k-th score they
    # can retrieve different rows, so max|diff| up to ~0.3 is expected; it flags gross errors only.
    max_diff = (out_f.float() - out_r.float()).abs().max().item()

    t_ref = do_bench(lambda: decode_step_reference(q, kc, vc, mem_k, mem_v, k), rep=reps_ms, return_mode="median")
    t_fused = do_bench(lambda: decode_step_fused(q, kc, vc, mem_k, mem_v, k), rep=reps_ms, return_mode="median")
    t_topk = do_bench(lambda: memory_topk(q.squeeze(2), mem_k, k), rep=reps_ms, return_mode="median")
    scan_gbps = hkv * n * d * mem_k.element_size() / (t_topk * 1e-3) / 1e9
    del q, kc, vc, mem_k, mem_v
    torch.cuda.empty_cache()
    return dict(ref_ms=t_ref, fused_ms=t_fused, topk_ms=t_topk, speedup=t_ref / t_fused,
                scan_gbps=scan_gbps, peak_frac=scan_gbps / peak_gbps, max_diff=max_diff)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[65536, 262144, 1048576, 4194304], help="memory tokens")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--head-dim", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--heads", default="8/32", help="KV heads / query heads, e.g. 8/32 or 3/9")
    ap.add_argument("--k", type=int, default=32, help="retrieved entries per query head")
    ap.add_argument("--local", type=int, default=1024, help="local KV-cache length")
    ap.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    ap.add_argument("--peak-gbps", type=float, default=3350.0, help="HBM peak: 3350 H100 SXM, 4800 H200")
    ap.add_argument("--rep-ms", type=int, default=200, help="do_bench repetition time per measurement")
    args = ap.parse_args(argv)
    try:
        hkv, hq = (int(x) for x in args.heads.split("/"))
    except ValueError:
        ap.error(f"--heads {args.heads!r}: expected KV/Q head counts like 8/32")
    if hkv <= 0 or hq % hkv:
        ap.error(f"--heads {args.heads!r}: query heads must be a positive multiple of KV heads")
    args.hkv, args.hq = hkv, hq
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/knn_kernels.py needs a CUDA GPU (the kernels' speed is what it measures); "
              "none is visible to torch.", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    print(f"# {torch.cuda.get_device_name()}  Hkv/Hq={args.hkv}/{args.hq}  k={args.k}  local={args.local}  "
          f"{args.dtype}  peak={args.peak_gbps:.0f} GB/s")
    print(f"{'N':>8} {'B':>3} {'D':>4} {'ref ms':>9} {'fused ms':>9} {'speedup':>8} {'topk ms':>9} "
          f"{'scan GB/s':>10} {'of peak':>8} {'max|diff|':>10}")
    for d in args.head_dim:
        for b in args.batch:
            for n in args.n:
                try:
                    r = bench_case(b, args.hq, args.hkv, n, d, args.k, args.local, dtype, args.peak_gbps, args.rep_ms)
                except torch.cuda.OutOfMemoryError:
                    print(f"{n:>8} {b:>3} {d:>4}  out of GPU memory, skipped")
                    torch.cuda.empty_cache()
                    continue
                print(f"{n:>8} {b:>3} {d:>4} {r['ref_ms']:>9.3f} {r['fused_ms']:>9.3f} {r['speedup']:>7.2f}x "
                      f"{r['topk_ms']:>9.3f} {r['scan_gbps']:>10.0f} {100 * r['peak_frac']:>7.1f}% {r['max_diff']:>10.2e}",
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
