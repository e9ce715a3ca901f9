"""memlm.kernels.qmatmul_cpu: the AVX2 Q4_1 / Q8_0 matmuls against their PyTorch references over
awkward shapes, the packing formats, and the GGUF round trip (weights already on a Q4_1 / Q8_0
grid come back with the same codes and scales)."""
from __future__ import annotations

import pytest
import torch

from memlm.kernels import qmatmul_cpu as q

WHY = q.available()
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"qmatmul_cpu kernel unavailable: {WHY}")

# (M, K, N): one row (decode), odd block counts (K = 96: 3 blocks; 32: 1), odd N, a prefill-sized M,
# M = 0, and the bundled model's widest layers.
SHAPES = [(1, 64, 83), (7, 96, 769), (3, 32, 5), (128, 160, 33), (0, 64, 8), (2, 576, 3072), (1, 1536, 576)]


@needs_kernel
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_kernel_matches_its_reference(fmt, M, K, N):
    torch.manual_seed(M * 1000 + N)
    w = torch.randn(N, K) * 0.05
    x = torch.randn(M, K) * 3
    x[:, :7] = 0  # a block with zeros (and, at K = 32, partly zero)
    if M:
        x[0, -32:] = 0  # an all-zero block: scale 0 must not give NaN
    pack, run, ref = {"q4_1": (q.pack_q4_1, q.q4_1_matmul, q.q4_1_matmul_ref),
                      "q8_0": (q.pack_q8_0, q.q8_0_matmul, q.q8_0_matmul_ref)}[fmt]
    packed = pack(w)
    out = run(x, *packed)
    expected = ref(x, *packed)  # fp64 over the same quantized x and weights
    assert out.shape == (M, N) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The kernel sums the same integer products in fp32, block by block: fp32 rounding only.
    if M:
        assert (out.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item() + 1e-6


@needs_kernel
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_unpacking_in_c_gives_the_reference_weights_exactly(fmt, M, K, N):
    torch.manual_seed(K * 1000 + N)
    w = torch.randn(N, K) * 0.05
    w[0, :32] = 0.25  # a constant block: d = 0
    pack, unpack, ref = {"q4_1": (q.pack_q4_1, q.q4_1_unpack, q.dequantize_q4_1),
                         "q8_0": (q.pack_q8_0, q.q8_0_unpack, q.dequantize_q8_0)}[fmt]
    packed = pack(w)
    out = unpack(*packed)
    assert out.shape == (N, K) and out.dtype == torch.float32
    assert torch.equal(out, ref(*packed))


@needs_kernel
def test_inputs_are_checked():
    qs, dm = q.pack_q4_1(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"\(M, 64\)"):
        q.q4_1_matmul(torch.randn(2, 32), qs, dm)
    with pytest.raises(ValueError, match="multiple of 32"):
        q.pack_q8_0(torch.randn(4, 40))
    y = q.q4_1_matmul(torch.randn(2, 64, dtype=torch.float64).t().contiguous().t(), qs, dm)  # fp64, strided
    assert y.dtype == torch.float32 and y.shape == (2, 8)


def test_quantization_error_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(83, 128)
    qs, dm = q.pack_q4_1(w)
    step = dm[..., 0].float().repeat_interleave(q.QK, dim=1)  # (N, K)
    assert ((q.dequantize_q4_1(qs, dm) - w).abs() <= step / 2 * 1.001 + 1e-3 * step.max()).all()
    qs8, d = q.pack_q8_0(w)
    step8 = d.float().repeat_interleave(q.QK, dim=1)
    assert ((q.dequantize_q8_0(qs8, d) - w).abs() <= step8 / 2 * 1.01).all()


def test_weights_on_the_gguf_grids_come_back_exactly():
    """GGUF Q4_1 is w = d * q + m per block of 32, q in 0..15, d and m fp16; Q8_0 is w = d * q,
    q in -127..127. Packing such weights (both ends of each block used) recovers q, d and m
    exactly, so the bundled model's layers and head are its own GGUF codes."""
    torch.manual_seed(0)
    N, K = 40, 96
    codes = torch.randint(0, 16, (N, K // 32, 32))
    codes[..., 0], codes[..., 1] = 0, 15
    d = (torch.rand(N, K // 32) * 0.01 + 1e-3).half()
    m = (torch.randn(N, K // 32) * 0.05).half()
    w = (codes * d.float()[..., None] + m.float()[..., None]).view(N, K)
    qs, dm = q.pack_q4_1(w)
    assert torch.equal(q.q4_1_codes(qs).view(N, K // 32, 32).long(), codes)
    assert torch.equal(dm[..., 0], d) and torch.equal(dm[..., 1], m)
    assert torch.equal(q.dequantize_q4_1(qs, dm), w)

    codes8 = torch.randint(-127, 128, (N, K // 32, 32))
    codes8[..., 0] = 127
    w8 = (codes8 * d.float()[..., None]).view(N, K)
    qs8, d8 = q.pack_q8_0(w8)
    assert torch.equal(qs8.view(N, K // 32, 32).long(), codes8) and torch.equal(d8, d)


def test_the_cpu_is_asked_before_the_library_loads(tmp_path):
    # The library is built with -mavx2: a CPU without it must get a reason, never an illegal
    # instruction from code inside the library.
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx fma f16c\n")
    assert q._cpu_lacks(info, "x86_64") == "this CPU lacks AVX2"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma f16c\n")
    assert q._cpu_lacks(info, "x86_64") is None
    assert "x86-64" in q._cpu_lacks(info, "aarch64")
    assert "cannot read" in q._cpu_lacks(tmp_path / "absent", "x86_64")
