"""Weight formats for the owned `Llama`'s linear layers: fewer bytes read per decoded token.

Decoding one token reads every weight once, so on a CPU its speed is set by weight bytes and how
fast the kernel turns them into products, not by FLOPs. Each format is an `nn.Module` with the
`nn.Linear` call shape and a `forward_native` (dequantize, then `F.linear`) that the tests hold
the kernel to. Two families:

- llama.cpp's block formats, run by memlm's own AVX2 kernel (`memlm.kernels.qmatmul_cpu`, which
  also quantizes the activations to int8 per block of 32, as llama.cpp does):
  `Q4_1Linear` (4-bit codes, fp16 scale and min per block of 32) and `Q8_0Linear` (int8 codes,
  fp16 scale per block of 32). The bundled SmolLM2 ships as GGUF Q4_1 layers and a Q8_0 head,
  and min/max quantization of the dequantized weights finds those same codes and scales again
  (tests check it), so `q4_1` runs the bundled model's own weights.
- PyTorch's weight-only CPU kernels, bf16 activations: `Int4Linear` (asymmetric 4-bit, bf16
  scale and zero per group of 32, `_weight_int4pack_mm_for_cpu`) and `Int8Linear` (per output
  row, `_weight_int8pack_mm`). Their fp32 paths are 10-20x slower on this AVX2 CPU, so each layer
  rounds its input to bf16 and widens its output back to fp32.

`quantize_model(model, weights)` swaps the decoder layers' projections (fused QKV, output, fused
gate/up, down) and the output head. The bundled model's head is tied to the token embeddings and
ships as Q8_0: 4-bit would lose real precision there, so `q4_1` puts the head in `Q8_0Linear`
and `int4` in per-row `Int8Linear` (its own copy; the embedding table stays fp32 for lookups).
What each format costs in speed and perplexity is in README "The owned model".

Limits: CPU kernels (on another device, or where `qmatmul_cpu.available()` gives a reason, the
block formats run `forward_native`: correct, slow); inference only; in_features a multiple of 32;
the model fp32 when quantized.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from memlm.kernels import qmatmul_cpu

WeightFormat = Literal["dense", "q4_1", "q8_0", "int8", "int4"]
WEIGHT_FORMATS: tuple[str, ...] = ("dense", "q4_1", "q8_0", "int8", "int4")
BLOCK_FORMATS: tuple[str, ...] = ("q4_1", "q8_0")  # run by qmatmul_cpu (dense without it: memlm.models.loading)
INT4_GROUP_SIZE = 32  # GGUF Q4_1's block: the bundled weights round-trip exactly at this size


class _WeightOnlyLinear(nn.Module):
    """What every format shares: the `nn.Linear` call shape, the kernel on CPU, the dequantized
    reference (`forward_native`) elsewhere and in tests. Subclasses give `dequantize()` and
    `_kernel(x)`: (M, K) in `kernel_dtype` -> (M, >= N), the kernel's output (extra padded columns
    dropped), and may set `kernel_ready` False (the kernel cannot run on this machine)."""

    out_features: int
    in_features: int
    kernel_dtype = torch.bfloat16
    kernel_ready = True

    def forward_native(self, x: Tensor) -> Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type != "cpu" or not self.kernel_ready:
            return self.forward_native(x)
        shape = x.shape  # (..., K)
        y = self._kernel(x.reshape(-1, shape[-1]).to(self.kernel_dtype))  # (M, >= N)
        y = y[:, : self.out_features].to(x.dtype).view(*shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8Linear(_WeightOnlyLinear):
    """y = x @ (q * scale).T + bias with q int8 (N, K) and one scale per output row (N,), kept in
    bf16 for the kernel.

    Symmetric: scale = max |w| over the row / 127, so the row's largest weight is exact (up to
    the bf16 scale)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        w = weight.detach().float()  # (N, K)
        scale = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(torch.bfloat16)  # (N,)
        self.out_features, self.in_features = w.shape
        self.register_buffer("weight_int8", torch.round(w / scale[:, None].float()).clamp(-127, 127).to(torch.int8))  # (N, K)
        self.register_buffer("scale", scale)  # (N,) bf16
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def dequantize(self) -> Tensor:
        """The fp32 weight (N, K) this layer computes with."""
        return self.weight_int8.float() * self.scale[:, None].float()

    def _kernel(self, x: Tensor) -> Tensor:
        return torch._weight_int8pack_mm(x, self.weight_int8, self.scale)  # (M, N)


class Int4Linear(_WeightOnlyLinear):
    """y = x @ w.T + bias with w = (q - 8) * scale + zero, q in [0, 15], scale and zero (bf16, for
    the kernel) per output row and group of `group_size` input columns.

    Asymmetric min/max per group: scale = (max - min) / 15, zero = min + 8 * scale (the kernel's
    convention: codes centred on 8), so each group's smallest and largest weights are exact."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        w = weight.detach().float()  # (N, K)
        N, K = w.shape
        if K % group_size:
            raise ValueError(f"in_features={K} is not a multiple of the int4 group size {group_size}")
        self.out_features, self.in_features, self.group_size = N, K, group_size
        groups = w.view(N, K // group_size, group_size)  # (N, G, gs)
        lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)  # each (N, G, 1)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = torch.round((groups - lo) / scale).clamp(0, 15).to(torch.int32).view(N, K)  # (N, K) codes
        zero = lo + 8 * scale
        self.register_buffer("codes", q.to(torch.uint8))  # (N, K), for forward_native and tests
        # (G, N, 2): [scale, zero] per group and row, the layout the kernel reads.
        self.register_buffer("scales_and_zeros", torch.cat([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16))
        # The kernel tiles rows by 16: pad with zero rows (code 8 with zero 0 is weight 0), slice after.
        pad = -N % 16
        sz = F.pad(self.scales_and_zeros, (0, 0, 0, pad)) if pad else self.scales_and_zeros  # (G, N + pad, 2)
        self.register_buffer("kernel_scales_and_zeros", sz)
        # Two codes a byte in the kernel's own tile order, (N + pad, K / 2) uint8.
        self.register_buffer("weight_int4", torch._convert_weight_to_int4pack_for_cpu(F.pad(q, (0, 0, 0, pad), value=8), 1))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)

    def dequantize(self) -> Tensor:
        """The fp32 weight (N, K) this layer computes with."""
        N, K, gs = self.out_features, self.in_features, self.group_size
        scale, zero = self.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # each (N, G)
        codes = self.codes.float().view(N, K // gs, gs)
        return ((codes - 8) * scale[..., None] + zero[..., None]).view(N, K)

    def _kernel(self, x: Tensor) -> Tensor:
        return torch._weight_int4pack_mm_for_cpu(x, self.weight_int4, self.group_size, self.kernel_scales_and_zeros)  # (M, N + pad)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")


_batched = threading.local()


@contextmanager
def batched_steps() -> Iterator[None]:
    """The forward passes inside are batched steps of several sequences (see `_BlockLinear.BATCH_ROWS`)."""
    before = getattr(_batched, "on", False)
    _batched.on = True
    try:
        yield
    finally:
        _batched.on = before


class _BlockLinear(_WeightOnlyLinear):
    """llama.cpp block formats on `qmatmul_cpu`: fp32 in, fp32 out. Below `PREFILL_ROWS` input
    rows the integer kernel (`_matmul`, activations quantized per block as llama.cpp does); from
    there on the weight is unpacked to fp32 in C (`_unpack`) for the BLAS GEMM, which is faster
    for many rows (prompt prefill, RETRO's neighbours: benchmarks/qmatmul_prefill.py)."""

    kernel_dtype = torch.float32
    PREFILL_ROWS = 32
    # In a batched step of several sequences (`batched_steps()`, memlm.model.generate.ragged_step),
    # from BATCH_ROWS rows up to PREFILL_ROWS: a bf16 copy of the weight, made on first use and kept
    # (2 bytes a weight), on oneDNN's bf16 GEMM where the CPU has native bf16 (AVX512-BF16 or AMX):
    # its cost hardly grows with the rows, the AVX2 integer kernel's grows linearly (benchmarks/
    # qmatmul_cpu.py "batched decode"). None: off. One sequence alone never takes it, so its
    # numbers stay those of the one-at-a-time engine.
    BATCH_ROWS: "int | None" = 8 if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else None

    # With AVX512-VNNI and AMX: from AMX_ROWS rows (a prompt's prefill) the bf16 copy on oneDNN's
    # AMX GEMM, every pass, batched or not. 30 layers' projections of the bundled model on a
    # Sapphire Rapids, 2 threads (benchmarks/batched_step.py "rows", x16 against bf16): 64 rows
    # 42.5 / 44.6 ms, 128 rows 76.5 / 58.3, 256 145.9 / 96.0, 512 294.6 / 153.7; 8 rows 8.8 / 25.1
    # (below ~64 the bf16 GEMM is bound by its weight bytes).
    AMX_ROWS: "int | None" = 96 if BATCH_ROWS is not None and qmatmul_cpu.has_amx_bf16() else None

    def _kernel(self, x: Tensor) -> Tensor:
        # With AVX512-VNNI (no AMX) the x16 integer kernel is the fastest at every row count measured,
        # 1 to 384 (a 384-token prefill on a Zen 4: 411 ms against 428 on the bf16 copy and 746
        # unpacked to fp32), so neither threshold below applies (benchmarks/qmatmul_cpu.py "prefill").
        rows = x.shape[0]
        if self._x16_in_force():
            amx = self.AMX_ROWS is not None and rows >= self.AMX_ROWS
            return self._bf16_matmul(x) if amx else self._matmul(x)
        if rows >= self.PREFILL_ROWS:
            return F.linear(x, self._unpack())
        if self.BATCH_ROWS is not None and rows >= self.BATCH_ROWS and getattr(_batched, "on", False):
            return self._bf16_matmul(x)
        return self._matmul(x)

    def _bf16_matmul(self, x: Tensor) -> Tensor:
        weight = self.__dict__.get("_bf16_weight")
        if weight is None:
            weight = self.__dict__["_bf16_weight"] = self._unpack().to(torch.bfloat16)
        return F.linear(x.to(torch.bfloat16), weight).float()

    def _x16_in_force(self) -> bool:
        return self.x16() is not None and qmatmul_cpu.isa() == "avx512-vnni"

    def x16(self) -> "tuple[Tensor, Tensor] | None":
        """The weight interleaved by 16 output rows for the AVX512-VNNI kernel (about as many bytes
        again as the packed weight), made on first use; None where that kernel cannot run."""
        if "_x16" not in self.__dict__:
            self.__dict__["_x16"] = self._repack_x16() if self.kernel_ready else None
        return self.__dict__["_x16"]

    def __init__(self, weight: Tensor, bias: Tensor | None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().float(), requires_grad=False)
        self.kernel_ready = qmatmul_cpu.available() is None


class Q4_1Linear(_BlockLinear):
    """GGUF Q4_1: per block of 32 input columns, w = q * d + m with q in [0, 15], d and m fp16
    (m = the block's min, d = (max - min) / 15, so its smallest weight is exact)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__(weight, bias)
        qs, dm = qmatmul_cpu.pack_q4_1(weight)
        self.register_buffer("qs", qs)  # (N, K/2) uint8, two codes a byte
        self.register_buffer("dm", dm)  # (N, K/32, 2) fp16 [d, m]

    def dequantize(self) -> Tensor:
        return qmatmul_cpu.dequantize_q4_1(self.qs, self.dm)

    def _unpack(self) -> Tensor:
        return qmatmul_cpu.q4_1_unpack(self.qs, self.dm)

    def _repack_x16(self) -> "tuple[Tensor, Tensor] | None":
        return qmatmul_cpu.repack_q4_1_x16(self.qs, self.dm)

    def kernel_weights(self) -> tuple[Tensor, ...]:
        """(qs, dm), or (qs, dm, codes, scales) with the x16 copy: a projection of
        `qmatmul_cpu.LayerWeights`."""
        x16 = self.x16()
        return (self.qs, self.dm) if x16 is None else (self.qs, self.dm, *x16)

    def _matmul(self, x: Tensor) -> Tensor:
        if self._x16_in_force():
            return qmatmul_cpu.q4_1_matmul_x16(x, *self.x16())
        return qmatmul_cpu.q4_1_matmul(x, self.qs, self.dm)


class Q8_0Linear(_BlockLinear):
    """GGUF Q8_0: per block of 32 input columns, w = q * d with q in [-127, 127], d = max |w| / 127
    in fp16."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__(weight, bias)
        qs, d = qmatmul_cpu.pack_q8_0(weight)
        self.register_buffer("qs", qs)  # (N, K) int8
        self.register_buffer("d", d)  # (N, K/32) fp16

    def dequantize(self) -> Tensor:
        return qmatmul_cpu.dequantize_q8_0(self.qs, self.d)

    def _unpack(self) -> Tensor:
        return qmatmul_cpu.q8_0_unpack(self.qs, self.d)

    def _repack_x16(self) -> "tuple[Tensor, Tensor] | None":
        return qmatmul_cpu.repack_q8_0_x16(self.qs, self.d)

    def _matmul(self, x: Tensor) -> Tensor:
        if self._x16_in_force():
            return qmatmul_cpu.q8_0_matmul_x16(x, *self.x16())
        return qmatmul_cpu.q8_0_matmul(x, self.qs, self.d)


def q4_1_decode_step(block: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], cache, kv_len: int) -> Tensor | None:
    """`Block.decode_fast` for layers in q4_1: the whole layer for one new token in one C call
    (`qmatmul_cpu.q4_1_decode_layer`), or None when this layer or call is not the plain case it
    computes (then the module path runs): one sequence and one fp32 token on CPU, the layer's
    own SDPA attention and SwiGLU MLP with bias-free Q4_1 projections. Modules after the attention
    (RETRO's cross-attention, adapters) run between the attention half and the MLP half, two C
    calls; a memory mode that swaps the attention backend (knn) keeps the module path."""
    from memlm.model.llama import RaggedBatch  # llama imports this module lazily

    att, ff = block.attention, block.feed_forward
    linears = (att.wqkv, att.wo, getattr(ff, "w13", None), getattr(ff, "w2", None))
    if isinstance(cache, RaggedBatch):
        return _q4_1_decode_batch(block, x, rope, cache, linears)
    if (x.shape[:2] != (1, 1) or x.dtype != torch.float32 or x.device.type != "cpu"
            or cache.k.dtype not in qmatmul_cpu.KV_DTYPES or not _plain_q4_1_layer(block, linears)):
        return None
    cos, sin = rope

    def run(x: Tensor, parts: int) -> Tensor:
        return qmatmul_cpu.q4_1_decode_layer(
            x.view(-1), att.n_heads, block.attention_norm.eps, block.attention_norm.weight, block.ffn_norm.weight,
            _layer_weights(block, linears), cos.reshape(-1).contiguous(), sin.reshape(-1).contiguous(),
            cache.k[att.layer, 0], cache.v[att.layer, 0], kv_len - 1, parts).view(1, 1, -1)

    if not block.after_attention:
        return run(x, 3)
    x = run(x, 1)
    input_pos = torch.tensor([kv_len - 1])
    for module in block.after_attention:
        x = module(x, input_pos)
    return run(x, 2)


def q4_1_decode_stack(model: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], input_pos: Tensor, cache,
                      kv_len: int) -> Tensor | None:
    """`Llama.decode_stack` for models in q4_1: a decode step's decoder stack in as few C calls as
    its layers allow (`qmatmul_cpu.q4_1_decode_stack_batch`), for one sequence feeding one token
    or a RaggedBatch of sequences each feeding one; the same arithmetic as `q4_1_decode_step`
    layer by layer, without returning to Python between layers. Each run of plain q4_1 layers
    is one call, and so is a plain layer whose one module after its attention can run inside it
    (it has `stack_step`: RETRO's cross-attention, for one sequence); any other layer (other
    modules after its attention; a swapped attention backend, as knn's) runs its own path between
    two runs. None (each layer then takes its own path) when no layer is plain, the step is not a
    decode step, or a module inside a run cannot run there this token."""
    from memlm.model.llama import RaggedBatch  # llama imports this module lazily

    if x.dtype != torch.float32 or x.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if isinstance(cache, RaggedBatch):
        if any(n != 1 for n in cache.lengths) or not _c_caches(cache.caches):
            return None
        caches = _batch_caches(cache)
    elif x.shape[:2] == (1, 1) and cache.k.shape[1] == 1 and cache.k.dtype in qmatmul_cpu.KV_DTYPES:
        caches = qmatmul_cpu.BatchCaches([cache.k[:, 0]], [cache.v[:, 0]], [kv_len - 1])
    else:
        return None
    plan = _stack_plan(model)
    if plan is None:
        return None
    tables = {}  # run -> (cross table, its steps): asked of every module first, so a refusal changes nothing
    for item in plan:
        if isinstance(item, _Run) and any(m is not None for m in item.modules):
            if isinstance(cache, RaggedBatch):
                return None  # modules inside a run: one sequence only
            steps = [None if m is None else m.stack_step(model, x, input_pos) for m in item.modules]
            if any(st is None for st, m in zip(steps, item.modules) if m is not None):
                return None  # a module cannot run inside the C call this token: every layer its own path
            rows = [st.values if st is not None else (0,) * qmatmul_cpu.STACK_CROSS for st in steps]
            tables[id(item)] = (torch.tensor(rows, dtype=torch.int64), [st for st in steps if st is not None])
    first = model.layers[0]
    cos, sin = rope  # each (N, 1, hd)
    cos, sin = cos.reshape(cos.shape[0], -1), sin.reshape(sin.shape[0], -1)
    for item in plan:
        if isinstance(item, _Run):
            table, steps = tables.get(id(item), (None, ()))
            x = qmatmul_cpu.q4_1_decode_stack_batch(
                x.reshape(-1, x.shape[-1]), first.attention.n_heads, first.attention_norm.eps, item.weights, cos, sin,
                caches, table).view_as(x)
            for st in steps:
                if st.after is not None:
                    st.after()
        else:
            x = item(x, rope, input_pos, None, cache, kv_len)
    return x


def _batch_caches(batch) -> qmatmul_cpu.BatchCaches:
    """A RaggedBatch's caches as the C layers read them, made once a step (the same for every layer)."""
    caches = batch.__dict__.get("_q4_1_caches")
    if caches is None:
        caches = batch.__dict__["_q4_1_caches"] = qmatmul_cpu.BatchCaches(
            [c.k[:, 0] for c in batch.caches], [c.v[:, 0] for c in batch.caches], batch.starts)
    return caches


def _c_caches(caches) -> bool:
    """Whether the C layers read these KV caches: all of one dtype of `qmatmul_cpu.KV_DTYPES`."""
    dtypes = {c.k.dtype for c in caches}
    return len(dtypes) == 1 and dtypes <= set(qmatmul_cpu.KV_DTYPES)


@dataclass
class StackStep:
    """What a module after a layer's attention asks of one C decode step that runs it
    (`stack_step(model, x, input_pos)`, see `q4_1_decode_stack`): `values`, its STACK_CROSS-long
    row of `qmatmul_cpu.q4_1_decode_stack_batch`'s cross table; `keep`, what its pointers point
    into; `after`, called once the step has run (the module's bookkeeping of the token)."""

    values: tuple[int, ...]
    keep: tuple = ()
    after: Optional[Callable[[], None]] = None


@dataclass
class _Run:
    """Consecutive layers run in one C call: their weights, and per layer the module after its
    attention that the call runs too (`stack_step`), or None."""

    weights: qmatmul_cpu.StackWeights
    modules: tuple


def _stack_plan(model: nn.Module) -> "list[_Run | nn.Module] | None":
    """How `q4_1_decode_stack` runs the layers: each run of plain q4_1 layers as one `_Run` (a
    plain layer may carry one module after its attention that can run inside the C call: it has
    `stack_step`), every other layer as itself; None when no layer is plain. Kept on the model
    while its layers hold the same modules."""
    keys = [_layer_key(block) for block in model.layers]
    cached = model.__dict__.get("_q4_1_plan")
    if cached is not None and len(cached[0]) == len(keys) and all(map(_same, cached[0], keys)):
        return cached[1]
    entries = []  # per layer: (block, module or None, LayerWeights, attn_norm, ffn_norm) when plain, else (block,)
    for block in model.layers:
        att, ff = block.attention, block.feed_forward
        linears = (att.wqkv, att.wo, getattr(ff, "w13", None), getattr(ff, "w2", None))
        after = list(block.after_attention)
        inside = after[0] if len(after) == 1 and hasattr(after[0], "stack_step") else None
        plain = (block.decode_fast is q4_1_decode_step and (not after or inside is not None)
                 and _plain_q4_1_layer(block, linears))
        entries.append((block, inside, _layer_weights(block, linears), block.attention_norm.weight,
                        block.ffn_norm.weight) if plain else (block,))
    plan: list = []
    i = 0
    while i < len(entries):
        if len(entries[i]) == 1:
            plan.append(entries[i][0])
            i += 1
            continue
        j = i
        while j < len(entries) and len(entries[j]) > 1:
            j += 1
        plan.append(_Run(qmatmul_cpu.StackWeights([e[2:] for e in entries[i:j]], start=i),
                         tuple(e[1] for e in entries[i:j])))
        i = j
    if not any(isinstance(item, _Run) for item in plan):
        plan = None
    model.__dict__["_q4_1_plan"] = (keys, plan)
    return plan


def _layer_key(block: nn.Module) -> tuple:
    """What `_stack_plan`'s choice for a layer depends on, read from the modules' own dicts (a
    decode step reads it for every layer: nn.Module attribute lookups would cost ~1 ms a step)."""
    m = block._modules
    att, ff = m["attention"], m["feed_forward"]
    after = m["after_attention"]
    return (block, block.__dict__.get("decode_fast"), after, len(after), *after._modules.values(), att, ff,
            att._modules.get("backend"),
            att.__dict__.get("backend"), att._modules.get("wqkv"), att._modules.get("wo"), ff._modules.get("w13"),
            ff._modules.get("w2"), m["attention_norm"], m["ffn_norm"], m["attention_norm"]._parameters.get("weight"),
            m["ffn_norm"]._parameters.get("weight"))


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y or (type(x) is int and x == y) for x, y in zip(a, b))


def _layer_weights(block: nn.Module, linears) -> qmatmul_cpu.LayerWeights:
    """The layer's four projections as the C layers take them (with their x16 copies where VNNI
    runs), made once and kept on the block while it holds the same modules."""
    cached = block.__dict__.get("_q4_1_layer_weights")
    if cached is None or any(a is not b for a, b in zip(cached[0], linears)):
        cached = block.__dict__["_q4_1_layer_weights"] = (
            tuple(linears), qmatmul_cpu.LayerWeights(*(m.kernel_weights() for m in linears)))
    return cached[1]


def _plain_q4_1_layer(block: nn.Module, linears) -> bool:
    """The layer is what the fused C layers compute: SDPA attention, a SwiGLU MLP, RMSNorms and
    bias-free Q4_1 projections whose kernel runs here."""
    from memlm.model.llama import FeedForward, RMSNorm, SDPABackend

    att = block.attention
    return (type(att.backend) is SDPABackend and type(block.feed_forward) is FeedForward
            and type(block.attention_norm) is RMSNorm and type(block.ffn_norm) is RMSNorm
            and all(type(m) is Q4_1Linear and m.kernel_ready and m.bias is None for m in linears)
            and att.head_dim % 8 == 0 and not torch.compiler.is_compiling())


def _q4_1_decode_batch(block: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], batch, linears) -> Tensor | None:
    """A batched decode step (every sequence of the RaggedBatch feeds one token) of a plain q4_1
    layer in one C call (`qmatmul_cpu.q4_1_decode_layer_batch`), or None (the module path runs):
    a prefill chunk in the batch, modules after the attention, another weight format."""
    att = block.attention
    if (any(n != 1 for n in batch.lengths) or block.after_attention or x.dtype != torch.float32
            or x.device.type != "cpu" or not _c_caches(batch.caches)
            or not _plain_q4_1_layer(block, linears)):
        return None
    cos, sin = rope  # each (N, 1, hd)
    caches = _batch_caches(batch)
    out = qmatmul_cpu.q4_1_decode_layer_batch(
        x.reshape(x.shape[1], -1), att.n_heads, block.attention_norm.eps, block.attention_norm.weight,
        block.ffn_norm.weight, _layer_weights(block, linears), cos.reshape(cos.shape[0], -1),
        sin.reshape(sin.shape[0], -1), caches, att.layer)
    return out.view_as(x)


def _quantized(linear: nn.Linear, fmt: str) -> nn.Module:
    cls = {"q4_1": Q4_1Linear, "q8_0": Q8_0Linear, "int8": Int8Linear, "int4": Int4Linear}[fmt]
    return cls(linear.weight, linear.bias)


@torch.no_grad()
def quantize_model(model: nn.Module, weights: WeightFormat = "int4", head: WeightFormat | None = None) -> nn.Module:
    """Replace the linear layers of a `Llama` (in place) with the `weights` format; returns it.

    weights: the decoder projections (fused QKV, attention output, fused gate/up, down): "dense"
    (unchanged), "q4_1", "q8_0", "int8" (per row) or "int4" (group 32). head: the output
    projection; None = the 8-bit format of the same family ("q8_0" for q4_1/q8_0, "int8" for
    int4/int8; see the module docstring), "dense" for dense. Only layers that are still
    `nn.Linear` are replaced, so modules a memory mode added are left alone, and quantizing twice
    is a no-op."""
    head_format = head or {"dense": "dense", "q4_1": "q8_0", "q8_0": "q8_0"}.get(weights, "int8")
    for fmt in (weights, head_format):
        if fmt not in WEIGHT_FORMATS:
            raise ValueError(f"weight format {fmt!r} is not one of {', '.join(WEIGHT_FORMATS)}")
    for block in model.layers:
        for parent, name in ((block.attention, "wqkv"), (block.attention, "wo"),
                             (block.feed_forward, "w13"), (block.feed_forward, "w2")):
            layer = getattr(parent, name, None)
            if type(layer) is nn.Linear and weights != "dense":
                setattr(parent, name, _quantized(layer, weights))
    if type(model.output) is nn.Linear and head_format != "dense":
        model.output = _quantized(model.output, head_format)
    if weights == "q4_1":
        for block in model.layers:
            block.decode_fast = q4_1_decode_step
        model.decode_stack = q4_1_decode_stack
    return model
