"""llama.cpp's Q4_1 and Q8_0 weight formats with memlm's own AVX2 matmul (`qmatmul_cpu.c`), beside
their PyTorch references.

Why a C kernel: decoding one token on CPU is a chain of (1, K) x (K, N) products, set by how fast
weights stream in. PyTorch's weight-only kernels (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`) take bf16 activations and, on AVX2 without bf16 units, run at a few GB/s;
llama.cpp's trick is to quantize the activations to int8 per block of 32 as well, so a block's
dot product is one `maddubs` of packed integers. `qmatmul_cpu.c` does the same (see its header),
and `benchmarks/owned_model.py` puts it beside PyTorch's kernels and llama.cpp itself.

- `pack_q4_1(w)` / `pack_q8_0(w)`: fp32 weight (N, K) -> the packed tensors the kernel reads.
- `q4_1_matmul(x, qs, dm)` / `q8_0_matmul(x, qs, d)`: x (M, K) fp32 -> (M, N) fp32.
- `dequantize_q4_1` / `dequantize_q8_0`, `quantize_activations_ref` and `*_matmul_ref`: the
  references the tests hold the kernel to (the reference quantizes x exactly as the kernel does,
  so the two agree to fp32 rounding).
- `available()`: None when the kernel runs here, else why not (no C compiler, no AVX2/FMA/F16C);
  callers then keep another format.

The library is compiled on first use with the system C compiler (`cc -O3 -mavx2 -mfma -mf16c
-fopenmp`, about a second) into `kernels/` of memlm's cache (`memlm.models.loading.default_cache_dir`:
`$MEMLM_CACHE_DIR`, else `$XDG_CACHE_HOME/memlm`, else `~/.cache/memlm`),
named by a hash of the source and flags, written atomically so concurrent processes agree. It
needs the OpenMP runtime torch already loaded (same soname), so torch.set_num_threads applies.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from memlm.models.loading import default_cache_dir

QK = 32  # block size of both formats (input columns per scale)
_SOURCE = Path(__file__).with_name("qmatmul_cpu.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"]


_NEEDED_FLAGS = ("avx2", "fma", "f16c")


def _cpu_lacks(cpuinfo: Path = Path("/proc/cpuinfo"), machine: Optional[str] = None) -> Optional[str]:
    """Why this CPU cannot run the library, asked before it is loaded: the library is compiled with
    -mavx2, so even a check inside it could use an instruction the CPU lacks."""
    machine = platform.machine() if machine is None else machine
    if machine.lower() not in ("x86_64", "amd64"):
        return f"the kernel is for x86-64 CPUs with AVX2, this is {machine or 'an unknown machine'}"
    try:
        text = cpuinfo.read_text()
    except OSError as e:
        return f"cannot read the CPU's flags from /proc/cpuinfo ({e.strerror})"
    missing = [f for f in _NEEDED_FLAGS if f not in _flags(text)]
    return f"this CPU lacks {', '.join(missing).upper()}" if missing else None


def _flags(cpuinfo_text: str) -> set[str]:
    line = next((ln for ln in cpuinfo_text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split())


@functools.cache
def has_amx_bf16() -> bool:
    """Whether this CPU has AMX tiles for bf16 (Sapphire Rapids and later), which oneDNN's bf16
    GEMM runs on: from about 64 rows it beats the x16 integer kernel (memlm.model.quantize)."""
    try:
        return {"amx_tile", "amx_bf16"} <= _flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return False


@functools.cache
def _library() -> tuple[Optional[ctypes.CDLL], Optional[str]]:
    """(the loaded library, None) or (None, why it cannot run here)."""
    lacks = _cpu_lacks()
    if lacks is not None:
        return None, lacks
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler (cc or gcc) on PATH to build kernels/qmatmul_cpu.c"
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    path = default_cache_dir() / "kernels" / f"qmatmul_cpu-{digest}.so"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            run = subprocess.run([compiler, *_FLAGS, str(_SOURCE), "-o", tmp], capture_output=True, text=True)
            if run.returncode != 0:
                return None, f"building kernels/qmatmul_cpu.c failed: {run.stderr.strip()[-500:]}"
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(path))
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    for fn in (lib.q4_1_matmul, lib.q8_0_matmul):
        fn.argtypes = [p, i64, i64, p, p, i64, p]
        fn.restype = ctypes.c_int
    for fn in (lib.q4_1_dequantize, lib.q8_0_dequantize):
        fn.argtypes = [p, p, i64, i64, p]
        fn.restype = None
    lib.q4_1_decode_layer.argtypes = [p, i64, i64, i64, i64, i64, ctypes.c_float, p, p, p, p, p, p, p, i64, i64, i64, i64]
    lib.q4_1_decode_layer.restype = ctypes.c_int
    lib.q4_1_decode_layer_batch.argtypes = [p, i64, i64, i64, i64, i64, i64, ctypes.c_float, p, p, p] + [p] * 6 + [i64]
    lib.q4_1_decode_layer_batch.restype = ctypes.c_int
    lib.q4_1_decode_stack_batch.argtypes = [p, i64, i64, i64, i64, i64, i64, ctypes.c_float, i64, p, p, p] + [p] * 6 + [i64, p]
    lib.q4_1_decode_stack_batch.restype = ctypes.c_int
    lib.q4_1_cross_attention_step.argtypes = [p, i64, i64, i64, i64, ctypes.c_float, p, p, p, p, p, p, i64, p]
    lib.q4_1_cross_attention_step.restype = ctypes.c_int
    lib.qmatmul_isa.argtypes = [ctypes.c_int]
    lib.qmatmul_isa.restype = ctypes.c_int
    lib.qmatmul_has_vnni.argtypes = []
    lib.qmatmul_has_vnni.restype = ctypes.c_int
    lib.q4_1_matmul_x16.argtypes = [p, i64, i64, p, p, i64, p]
    lib.q4_1_matmul_x16.restype = ctypes.c_int
    lib.q4_1_repack_x16.argtypes = [p, p, i64, i64, p, p]
    lib.q4_1_repack_x16.restype = None
    lib.q8_0_matmul_x16.argtypes = [p, i64, i64, p, p, i64, p]
    lib.q8_0_matmul_x16.restype = ctypes.c_int
    lib.q8_0_repack_x16.argtypes = [p, p, i64, i64, p, p, p]
    lib.q8_0_repack_x16.restype = None
    return lib, None


def available() -> Optional[str]:
    """None when the kernel runs on this machine, else the reason it does not."""
    return _library()[1]


ISAS = ("avx2", "avx512-vnni")


def isa() -> str:
    """The instruction set the matmuls run on here: "avx512-vnni" where the CPU has it (and the
    shape allows: K a multiple of 64), else "avx2"."""
    return ISAS[_lib().qmatmul_isa(-1)]


def has_vnni() -> bool:
    """Whether this CPU runs the AVX512-VNNI code (whatever `set_isa` chose)."""
    return bool(_lib().qmatmul_has_vnni())


def set_isa(name: str) -> str:
    """Choose the matmuls' instruction set ("avx2", or "avx512-vnni" where the CPU has it); returns
    the one now in force. For tests and benchmarks that compare the two: not while a matmul runs."""
    if name not in ISAS:
        raise ValueError(f"unknown instruction set {name!r}: expected one of {', '.join(ISAS)}")
    return ISAS[_lib().qmatmul_isa(ISAS.index(name))]


def _lib() -> ctypes.CDLL:
    lib, why = _library()
    if lib is None:
        raise RuntimeError(f"the Q4_1/Q8_0 CPU kernel is unavailable: {why}")
    return lib


def _check(x: Tensor, K: int) -> Tensor:
    if x.device.type != "cpu" or x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"expected a CPU tensor (M, {K}), got {tuple(x.shape)} on {x.device}")
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()


def _run(fn, x: Tensor, qs: Tensor, scales: Tensor, N: int) -> Tensor:
    M, K = x.shape
    y = torch.empty(M, N, dtype=torch.float32)
    if M == 0 or N == 0:
        return y
    if fn(x.data_ptr(), M, K, qs.data_ptr(), scales.data_ptr(), N, y.data_ptr()) != 0:
        raise MemoryError(f"qmatmul_cpu: no memory for the quantized activations ({M} x {K})")
    return y


# --- Q4_1 ------------------------------------------------------------------------------------

def pack_q4_1(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) -> qs (N, K/2) uint8, dm (N, K/32, 2) fp16 [d, m]: per block of 32, m = min,
    d = (max - min) / 15, codes round((w - m) / d) in [0, 15] (computed with the fp16 d and m the
    kernel reads). Byte j of a block: code j (low nibble), code j + 16 (high nibble)."""
    N, K = w.shape
    if K % QK:
        raise ValueError(f"in_features={K} is not a multiple of {QK}")
    blocks = w.detach().float().view(N, K // QK, QK)
    lo, hi = blocks.amin(-1), blocks.amax(-1)  # each (N, G)
    d = ((hi - lo) / 15).to(torch.float16)
    m = lo.to(torch.float16)
    inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(lo))
    codes = torch.round((blocks - m.float()[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)  # (N, G, 32)
    qs = (codes[..., :16] | (codes[..., 16:] << 4)).view(N, K // 2)
    return qs.contiguous(), torch.stack([d, m], -1).contiguous()


def q4_1_codes(qs: Tensor) -> Tensor:
    """qs (N, K/2) -> codes (N, K) uint8 in [0, 15], in column order."""
    N = qs.shape[0]
    b = qs.view(N, -1, 16)
    return torch.cat([b & 0x0F, b >> 4], -1).view(N, -1)


def dequantize_q4_1(qs: Tensor, dm: Tensor) -> Tensor:
    """The fp32 weight (N, K) that (qs, dm) stand for."""
    N = qs.shape[0]
    codes = q4_1_codes(qs).float().view(N, -1, QK)
    d, m = dm.float().unbind(-1)  # each (N, G)
    return (codes * d[..., None] + m[..., None]).view(N, -1)


def _unpack(fn, qs: Tensor, scales: Tensor, N: int, K: int) -> Tensor:
    w = torch.empty(N, K, dtype=torch.float32)
    if N and K:
        fn(qs.data_ptr(), scales.data_ptr(), N, K, w.data_ptr())
    return w


def q4_1_unpack(qs: Tensor, dm: Tensor) -> Tensor:
    """`dequantize_q4_1` in C (AVX2, the rows split across threads): the same fp32 weight (N, K)."""
    return _unpack(_lib().q4_1_dequantize, qs.contiguous(), dm.contiguous(), qs.shape[0], qs.shape[1] * 2)


def q4_1_matmul(x: Tensor, qs: Tensor, dm: Tensor) -> Tensor:
    """x (M, K) -> x @ dequantize_q4_1(qs, dm).T (M, N), with x quantized per block (see module)."""
    return _run(_lib().q4_1_matmul, _check(x, qs.shape[1] * 2), qs, dm, qs.shape[0])


def repack_q4_1_x16(qs: Tensor, dm: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """(qs, dm) -> the same weight interleaved by 16 output rows for the VNNI kernel (see "x16" in
    the .c file): codes (N/16, K/32, 256) uint8 and scales (N/16, K/32, 32) fp16, as many bytes as
    (qs, dm). None where it would not run: a CPU without AVX512-VNNI, or N not a multiple of 16."""
    N, K = qs.shape[0], qs.shape[1] * 2
    if N % 16 or not has_vnni():
        return None
    codes = torch.empty(N // 16, K // QK, 256, dtype=torch.uint8)
    scales = torch.empty(N // 16, K // QK, 32, dtype=torch.float16)
    qs, dm = qs.contiguous(), dm.contiguous()
    _lib().q4_1_repack_x16(qs.data_ptr(), dm.data_ptr(), N, K, codes.data_ptr(), scales.data_ptr())
    return codes, scales


def q4_1_matmul_x16(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    """`q4_1_matmul` on the x16 layout (`repack_q4_1_x16`); needs VNNI in force (`isa()`)."""
    N, K = codes.shape[0] * 16, codes.shape[1] * QK
    if isa() != "avx512-vnni":
        raise RuntimeError("the x16 Q4_1 kernel needs AVX512-VNNI in force (qmatmul_cpu.isa())")
    return _run(_lib().q4_1_matmul_x16, _check(x, K), codes, scales, N)


# --- Q8_0 ------------------------------------------------------------------------------------

def pack_q8_0(w: Tensor) -> tuple[Tensor, Tensor]:
    """w (N, K) -> qs (N, K) int8 in [-127, 127], d (N, K/32) fp16 = max |w| / 127 per block."""
    N, K = w.shape
    if K % QK:
        raise ValueError(f"in_features={K} is not a multiple of {QK}")
    blocks = w.detach().float().view(N, K // QK, QK)
    d = (blocks.abs().amax(-1) / 127).to(torch.float16)  # (N, G)
    inv = torch.where(d.float() > 0, 1 / d.float(), torch.zeros_like(d, dtype=torch.float32))
    qs = torch.round(blocks * inv[..., None]).clamp(-127, 127).to(torch.int8).view(N, K)
    return qs.contiguous(), d.contiguous()


def dequantize_q8_0(qs: Tensor, d: Tensor) -> Tensor:
    N, K = qs.shape
    return (qs.float().view(N, K // QK, QK) * d.float()[..., None]).view(N, K)


def q8_0_unpack(qs: Tensor, d: Tensor) -> Tensor:
    """`dequantize_q8_0` in C: the same fp32 weight (N, K)."""
    return _unpack(_lib().q8_0_dequantize, qs.contiguous(), d.contiguous(), qs.shape[0], qs.shape[1])


def q8_0_matmul(x: Tensor, qs: Tensor, d: Tensor) -> Tensor:
    """x (M, K) -> x @ dequantize_q8_0(qs, d).T (M, N), with x quantized per block (see module)."""
    return _run(_lib().q8_0_matmul, _check(x, qs.shape[1]), qs, d, qs.shape[0])


def repack_q8_0_x16(qs: Tensor, d: Tensor) -> Optional[tuple[Tensor, Tensor]]:
    """(qs, d) -> the Q8_0 weight interleaved by 16 output rows for the VNNI kernel: codes
    (N/16, K/32, 512) int8 and one buffer (int16 view) of the scales (N/16, K/32, 16) fp16 followed
    by each row's -128 * block code sum (N/16, K/32, 16) int32 (x goes in offset by 128). None
    where it would not run (no AVX512-VNNI, N not a multiple of 16)."""
    N, K = qs.shape
    if N % 16 or not has_vnni():
        return None
    G = K // QK
    codes = torch.empty(N // 16, G, 512, dtype=torch.int8)
    extra = torch.empty(N * G * 3, dtype=torch.int16)  # N*G fp16 scales, then N*G int32 offsets
    qs, d = qs.contiguous(), d.contiguous()
    _lib().q8_0_repack_x16(qs.data_ptr(), d.data_ptr(), N, K, codes.data_ptr(), extra.data_ptr(),
                           extra.data_ptr() + N * G * 2)
    return codes, extra


def q8_0_matmul_x16(x: Tensor, codes: Tensor, extra: Tensor) -> Tensor:
    """`q8_0_matmul` on the x16 layout (`repack_q8_0_x16`); needs VNNI in force (`isa()`)."""
    N, K = codes.shape[0] * 16, codes.shape[1] * QK
    if isa() != "avx512-vnni":
        raise RuntimeError("the x16 Q8_0 kernel needs AVX512-VNNI in force (qmatmul_cpu.isa())")
    return _run(_lib().q8_0_matmul_x16, _check(x, K), codes, extra, N)


# --- one decoder layer at one position ------------------------------------------------------

class LayerWeights:
    """A decoder layer's four Q4_1 projections (wqkv, wo, w13, w2) as the decode layers read them:
    each (qs, dm), or (qs, dm, codes, scales) with its x16 copy, which they then use where VNNI is
    in force. Holds the tensors, so the pointers it passes stay valid."""

    def __init__(self, *projections: tuple[Tensor, ...]):
        if len(projections) != 4 or any(len(p) not in (2, 4) for p in projections):
            raise ValueError("expected four projections, each (qs, dm) or (qs, dm, codes, scales)")
        self.projections = projections
        # four int64 per projection: qs, dm, codes, scales (0, 0 without an x16 copy)
        self.ptrs = torch.tensor([ptr for p in projections for ptr in ([t.data_ptr() for t in p] + [0, 0])[:4]],
                                 dtype=torch.int64)
        self.intermediate = projections[3][0].shape[1] * 2  # w2's in_features


class StackWeights:
    """Consecutive decoder layers of a model, from layer `start` on, as `q4_1_decode_stack_batch`
    reads them: each layer's `LayerWeights` and its two norm weights (fp32 contiguous). Holds them
    all, so the pointers stay valid."""

    def __init__(self, layers: list[tuple[LayerWeights, Tensor, Tensor]], start: int = 0):
        self.start = start
        if not layers or len({w.intermediate for w, _, _ in layers}) != 1:
            raise ValueError("expected one or more layers of one intermediate size")
        for _, *norms in layers:
            if any(t.dtype != torch.float32 or not t.is_contiguous() for t in norms):
                raise ValueError("norm weights must be fp32 contiguous")
        self.layers = layers
        self.n_layers, self.intermediate = len(layers), layers[0][0].intermediate
        self.attn_norms = torch.tensor([a.data_ptr() for _, a, _ in layers], dtype=torch.int64)
        self.ffn_norms = torch.tensor([f.data_ptr() for _, _, f in layers], dtype=torch.int64)
        self.ptrs = torch.cat([w.ptrs for w, _, _ in layers])


def q4_1_decode_layer(x: Tensor, n_heads: int, eps: float, attn_norm: Tensor, ffn_norm: Tensor,
                      weights: LayerWeights, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor,
                      pos: int, parts: int = 3) -> Tensor:
    """One Llama decoder layer (memlm.model.llama.Block with SDPA attention and a SwiGLU MLP) for
    one sequence at one new position, in one C call (see `q4_1_decode_layer` in the .c file).

    x (D,) fp32 -> the layer's output (D,) (x is not modified); cos, sin (hd,) the position's RoPE
    rows; k_cache, v_cache (KV, S_max, hd) fp32 or fp16 (`KV_DTYPES`) contiguous, written at `pos`
    and read over [0, pos]. hd must be a multiple of 8. parts: 1 only x + attention, 2 only x +
    MLP, 3 the whole layer."""
    KV, S, hd = k_cache.shape
    D = x.shape[-1]
    half = _cache_is_half([k_cache], [v_cache])
    out = x.to(torch.float32, copy=True).contiguous()
    if _lib().q4_1_decode_layer(out.data_ptr(), D, n_heads, KV, hd, weights.intermediate, eps, attn_norm.data_ptr(),
                                ffn_norm.data_ptr(), weights.ptrs.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                k_cache.data_ptr(), v_cache.data_ptr(), S, pos, parts, half) != 0:
        raise MemoryError("qmatmul_cpu: no memory for a decode layer's buffers")
    return out


class ProjectionPair:
    """Two Q4_1 projections of a layer (RETRO's cross-attention: wqkv, wo) as
    `q4_1_cross_attention_step` reads them; holds the tensors, so the pointers stay valid."""

    def __init__(self, *projections: tuple[Tensor, ...]):
        if len(projections) != 2 or any(len(p) not in (2, 4) for p in projections):
            raise ValueError("expected two projections, each (qs, dm) or (qs, dm, codes, scales)")
        self.projections = projections
        self.ptrs = torch.tensor([ptr for p in projections for ptr in ([t.data_ptr() for t in p] + [0, 0])[:4]],
                                 dtype=torch.int64)


def q4_1_cross_attention_step(x: Tensor, n_heads: int, eps: float, attn_norm: Tensor, weights: ProjectionPair,
                              cos: Tensor, sin: Tensor, k: Tensor, v: Tensor, gate: Tensor) -> Tensor:
    """RETRO's chunked cross-attention for one query in one C call (`q4_1_cross_attention_step` in
    the .c file): x (D,) fp32 -> x + wo(gate * attention of the rotated query over k, v) (x is not
    modified). The query is wqkv's first n_heads * hd outputs of rms_norm(x) * attn_norm, rotated at
    cos, sin (hd,); k, v (KV, L, hd) fp32 contiguous, every row read (L >= 1); gate (n_heads,) the
    per-head factor (tanh of the learned gate). hd must be a multiple of 8."""
    KV, L, hd = k.shape
    if L < 1 or v.shape != k.shape or hd % 8 or n_heads % KV:
        raise ValueError(f"cross-attention over k {tuple(k.shape)}, v {tuple(v.shape)} with {n_heads} heads")
    for t in (k, v, cos, sin, gate, attn_norm):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"cross-attention step: every tensor fp32 and contiguous, got {t.dtype} {tuple(t.shape)} {t.stride()}")
    D = x.shape[-1]
    out = x.to(torch.float32, copy=True).contiguous()
    if _lib().q4_1_cross_attention_step(out.data_ptr(), D, n_heads, KV, hd, eps, attn_norm.data_ptr(),
                                        weights.ptrs.data_ptr(), cos.data_ptr(), sin.data_ptr(), k.data_ptr(),
                                        v.data_ptr(), L, gate.data_ptr()) != 0:
        raise MemoryError("qmatmul_cpu: no memory for a cross-attention step's buffers")
    return out


KV_DTYPES = (torch.float32, torch.float16)  # what the decode layers' KV caches may hold


def _cache_is_half(k: list[Tensor], v: list[Tensor]) -> bool:
    """Whether the caches are fp16 (else fp32): all of one of `KV_DTYPES`, contiguous."""
    dtype = k[0].dtype
    for t in (*k, *v):
        if t.dtype != dtype or dtype not in KV_DTYPES or not t.is_contiguous():
            raise ValueError(f"expected contiguous KV caches all fp32 or all fp16, got {t.dtype} "
                             f"({'' if t.is_contiguous() else 'not '}contiguous) beside {dtype}")
    return dtype == torch.float16


class BatchCaches:
    """The KV caches of the B sequences of a batched decode step, as `q4_1_decode_layer_batch`
    reads them: k[b], v[b] (n_layers, KV, S_b, hd) contiguous, all fp32 or all fp16, each written
    this step at positions[b]. Built once a step; each layer then costs two small adds, not B
    tensor lookups."""

    def __init__(self, k: list[Tensor], v: list[Tensor], positions: list[int]):
        self.half = _cache_is_half(k, v)
        for t in (*k, *v):
            if t.dim() != 4 or t.shape[::3] != k[0].shape[::3]:
                raise ValueError(f"expected caches (n_layers, KV, S, hd) like {tuple(k[0].shape)}, got {tuple(t.shape)}")
        self.n_layers, self.kv_heads, _, self.head_dim = k[0].shape
        self._keep = (k, v)  # the pointers below stay valid while these live
        self._k = torch.tensor([t.data_ptr() for t in k], dtype=torch.int64)
        self._v = torch.tensor([t.data_ptr() for t in v], dtype=torch.int64)
        self._layer_bytes = torch.tensor([t[0].numel() * t.element_size() for t in k], dtype=torch.int64)
        self.seqs = torch.tensor([t.shape[2] for t in k], dtype=torch.int64)
        self.positions = torch.tensor(positions, dtype=torch.int64)

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Pointers to layer i's caches (B,) for k and for v."""
        if not 0 <= i < self.n_layers:
            raise IndexError(f"layer {i} of {self.n_layers}")
        return self._k + i * self._layer_bytes, self._v + i * self._layer_bytes

    def all_layers(self) -> tuple[Tensor, Tensor]:
        """Pointers to every layer's caches, (n_layers, B) for k and for v (layer-major); made once."""
        if "_all" not in self.__dict__:
            offsets = torch.arange(self.n_layers, dtype=torch.int64)[:, None] * self._layer_bytes
            self._all = (self._k + offsets).contiguous(), (self._v + offsets).contiguous()
        return self._all


def q4_1_decode_layer_batch(x: Tensor, n_heads: int, eps: float, attn_norm: Tensor, ffn_norm: Tensor,
                            weights: LayerWeights, cos: Tensor, sin: Tensor, caches: BatchCaches,
                            layer: int) -> Tensor:
    """`q4_1_decode_layer` for B sequences in one call: x (B, D) -> (B, D); cos, sin (B, hd);
    sequence b's caches of `layer` in `caches`, written at its position. The projections run on
    the B rows together."""
    B, D = x.shape
    if B != len(caches.seqs):
        raise ValueError(f"{B} rows for {len(caches.seqs)} caches")
    out = x.to(torch.float32, copy=True).contiguous()
    cos, sin = cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()
    k_ptrs, v_ptrs = caches.layer(layer)
    if _lib().q4_1_decode_layer_batch(
            out.data_ptr(), B, D, n_heads, caches.kv_heads, caches.head_dim, weights.intermediate, eps,
            attn_norm.data_ptr(), ffn_norm.data_ptr(), weights.ptrs.data_ptr(), cos.data_ptr(), sin.data_ptr(), k_ptrs.data_ptr(), v_ptrs.data_ptr(), caches.seqs.data_ptr(),
            caches.positions.data_ptr(), caches.half) != 0:
        raise MemoryError("qmatmul_cpu: no memory for a batched decode layer's buffers")
    return out


STACK_CROSS = 10  # int64 per layer of `q4_1_decode_stack_batch`'s cross table (see the .c file)


def q4_1_decode_stack_batch(x: Tensor, n_heads: int, eps: float, stack: StackWeights, cos: Tensor, sin: Tensor,
                            caches: BatchCaches, cross: Optional[Tensor] = None) -> Tensor:
    """`q4_1_decode_layer_batch` through every layer of `stack` in one call: x (B, D) the states
    entering layer `stack.start` -> those leaving its last layer (B, D) (x is not modified);
    cos, sin (B, hd) the rows' RoPE rows (the same at every layer). cross: None, or for one
    sequence an int64 (n_layers, STACK_CROSS) table of the cross-attention steps to run after
    layers' attention halves (its pointers must stay valid for the call)."""
    B, D = x.shape
    end = stack.start + stack.n_layers
    if B != len(caches.seqs) or end > caches.n_layers:
        raise ValueError(f"{B} rows and layers [{stack.start}, {end}) for {len(caches.seqs)} caches of "
                         f"{caches.n_layers} layers")
    if cross is not None and (B != 1 or cross.shape != (stack.n_layers, STACK_CROSS) or cross.dtype != torch.int64
                              or not cross.is_contiguous()):
        raise ValueError(f"a cross table is (n_layers, {STACK_CROSS}) int64 for one sequence, got {tuple(cross.shape)} "
                         f"{cross.dtype} for {B} rows")
    out = x.to(torch.float32, copy=True).contiguous()
    cos, sin = cos.to(torch.float32).contiguous(), sin.to(torch.float32).contiguous()
    k_ptrs, v_ptrs = (t[stack.start:end] for t in caches.all_layers())
    if _lib().q4_1_decode_stack_batch(
            out.data_ptr(), B, D, n_heads, caches.kv_heads, caches.head_dim, stack.intermediate, eps, stack.n_layers,
            stack.attn_norms.data_ptr(), stack.ffn_norms.data_ptr(), stack.ptrs.data_ptr(), cos.data_ptr(),
            sin.data_ptr(), k_ptrs.data_ptr(), v_ptrs.data_ptr(), caches.seqs.data_ptr(), caches.positions.data_ptr(),
            caches.half, None if cross is None else cross.data_ptr()) != 0:
        raise MemoryError("qmatmul_cpu: no memory for a batched decode layer's buffers")
    return out


# --- references ------------------------------------------------------------------------------

def quantize_activations_ref(x: Tensor) -> Tensor:
    """x (M, K) -> what the kernel computes with: per block of 32, round(x / dx) * dx with
    dx = max |x| / 127 (fp32)."""
    M, K = x.shape
    b = x.float().view(M, K // QK, QK)
    dx = b.abs().amax(-1, keepdim=True) / 127
    q = torch.round(b * torch.where(dx > 0, 1 / dx, torch.zeros_like(dx))).clamp(-127, 127)
    return (q * dx).view(M, K)


def q4_1_matmul_ref(x: Tensor, qs: Tensor, dm: Tensor) -> Tensor:
    return quantize_activations_ref(x).double() @ dequantize_q4_1(qs, dm).double().T


def q8_0_matmul_ref(x: Tensor, qs: Tensor, d: Tensor) -> Tensor:
    return quantize_activations_ref(x).double() @ dequantize_q8_0(qs, d).double().T

