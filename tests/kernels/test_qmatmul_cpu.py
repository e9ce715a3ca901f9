"""memlm.kernels.qmatmul_cpu: the Q4_1 / Q8_0 matmuls (AVX2, and AVX512-VNNI where the CPU has it,
in llama.cpp's layout and interleaved by 16 rows) against their PyTorch references over awkward
shapes, the packing formats, and the GGUF round trip (weights already on a Q4_1 / Q8_0 grid come
back with the same codes and scales)."""
from __future__ import annotations

import pytest
import torch

from memlm.kernels import qmatmul_cpu as q

WHY = q.available()
needs_kernel = pytest.mark.skipif(WHY is not None, reason=f"qmatmul_cpu kernel unavailable: {WHY}")

# (M, K, N): one row (decode), odd block counts (K = 96: 3 blocks; 32: 1), odd N, a prefill-sized M,
# M = 0, and the bundled model's widest layers.
SHAPES = [(1, 64, 83), (7, 96, 769), (3, 32, 5), (128, 160, 33), (0, 64, 8), (2, 576, 3072), (1, 1536, 576)]
VNNI = WHY is None and q.has_vnni()



def _x16(fmt: str, packed):
    return (q.repack_q4_1_x16 if fmt == "q4_1" else q.repack_q8_0_x16)(*packed)


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_kernel_matches_its_reference(fmt, M, K, N, qmatmul_isa):
    isa = qmatmul_isa
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
    if isa == "avx512-vnni" and N % 16 == 0:  # the same weight interleaved by 16 rows
        x16 = _x16(fmt, packed)
        run16 = q.q4_1_matmul_x16 if fmt == "q4_1" else q.q8_0_matmul_x16
        out16 = run16(x, *x16)
        assert out16.shape == (M, N) and torch.isfinite(out16).all()
        if M:
            assert (out16.double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item() + 1e-6


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX512-VNNI" if WHY is None else f"qmatmul_cpu: {WHY}")
@pytest.mark.parametrize("fmt", ["q4_1", "q8_0"])
def test_vnni_rows_do_not_depend_on_the_rows_beside_them(fmt):
    """With VNNI every output row runs the same instructions whatever M and wherever it sits in a
    block of rows, so a batched decode step gives each sequence exactly what it would get alone
    (the AVX2 code's 4-row blocks do not promise this)."""
    torch.manual_seed(5)
    M, K, N = 13, 576, 80  # one full block of 8 rows and a tail of 5
    x, w = torch.randn(M, K), torch.randn(N, K) * 0.05
    packed = (q.pack_q4_1 if fmt == "q4_1" else q.pack_q8_0)(w)
    run = q.q4_1_matmul if fmt == "q4_1" else q.q8_0_matmul
    run16 = q.q4_1_matmul_x16 if fmt == "q4_1" else q.q8_0_matmul_x16
    x16 = _x16(fmt, packed)
    for f, weights in ((run, packed), (run16, x16)):
        together = f(x, *weights)
        assert torch.equal(torch.cat([f(x[i : i + 1], *weights) for i in range(M)]), together)
        assert torch.equal(f(x[3:11], *weights), together[3:11])


@needs_kernel
def test_x16_repacking_keeps_every_code_and_scale():
    """The x16 layouts hold the same codes and scales in another order (checked byte by byte
    against the layout the .c file describes), and refuse what they cannot hold."""
    torch.manual_seed(6)
    N, K = 32, 96
    w = torch.randn(N, K)
    qs, dm = q.pack_q4_1(w)
    x16 = q.repack_q4_1_x16(qs, dm)
    if not q.has_vnni():
        assert x16 is None
        return
    codes, scales = x16
    assert codes.shape == (N // 16, K // 32, 256) and scales.shape == (N // 16, K // 32, 32)
    want = q.q4_1_codes(qs).view(N // 16, 16, K // 32, 32)  # (group, row j, block, code k)
    t, i = torch.arange(32) // 4, torch.arange(32) % 4
    byte = (t % 4)[None, :] * 64 + torch.arange(16)[:, None] * 4 + i[None, :]  # (j, k)
    got = codes.long()[:, :, byte]  # (group, block, j, k)
    got = torch.where((t < 4)[None, None, None, :], got & 15, got >> 4)
    assert torch.equal(got.permute(0, 2, 1, 3), want.long())
    d, m = dm.view(N // 16, 16, K // 32, 2).permute(0, 2, 1, 3).unbind(-1)
    assert torch.equal(scales[..., :16], d) and torch.equal(scales[..., 16:], m)
    assert q.repack_q4_1_x16(*q.pack_q4_1(torch.randn(24, K))) is None  # N not a multiple of 16

    qs8, d8 = q.pack_q8_0(w)
    codes8, extra = q.repack_q8_0_x16(qs8, d8)
    assert torch.equal(codes8.view(N // 16, K // 32, 8, 16, 4).permute(0, 3, 1, 2, 4).reshape(N, K), qs8)
    G = K // 32
    assert torch.equal(extra[: N * G].view(N // 16, G, 16).permute(0, 2, 1).reshape(N, G).view(torch.float16), d8)
    sums = qs8.view(N, G, 32).long().sum(-1)
    offsets = extra[N * G :].view(torch.int32).view(N // 16, G, 16).permute(0, 2, 1).reshape(N, G)
    assert torch.equal(offsets.long(), -128 * sums)


@needs_kernel
def test_the_instruction_set_can_be_chosen():
    assert q.isa() in q.ISAS
    with pytest.raises(ValueError, match="unknown instruction set"):
        q.set_isa("sse2")
    assert q.set_isa("avx2") == "avx2" and q.isa() == "avx2"
    if VNNI:
        qs, dm = q.pack_q4_1(torch.randn(16, 64))
        with pytest.raises(RuntimeError, match="VNNI in force"):
            q.q4_1_matmul_x16(torch.randn(1, 64), *q.repack_q4_1_x16(qs, dm))
    assert q.set_isa("avx512-vnni") == ("avx512-vnni" if VNNI else "avx2")


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
    pair = q.ProjectionPair(q.pack_q4_1(torch.randn(192, 64)), q.pack_q4_1(torch.randn(64, 64)))
    ones, k = torch.ones(64), torch.randn(2, 5, 16)
    with pytest.raises(ValueError, match=r"k \(2, 0, 16\)"):  # no rows to read
        q.q4_1_cross_attention_step(torch.randn(64), 4, 1e-5, ones, pair, ones[:16], ones[:16], k[:, :0], k[:, :0], ones[:4])
    with pytest.raises(ValueError, match="contiguous"):
        q.q4_1_cross_attention_step(torch.randn(64), 4, 1e-5, ones, pair, ones[:16], ones[:16], k.transpose(0, 1).contiguous().transpose(0, 1), k, ones[:4])


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


@pytest.mark.skipif(not VNNI, reason="this CPU has no AVX512-VNNI" if WHY is None else f"qmatmul_cpu: {WHY}")
def test_vnni_batched_decode_layer_equals_each_sequence_alone():
    """The batched decode layer (the batch scheduler's step) against the one-sequence layer, sequence
    by sequence, bit for bit: with VNNI a row's matmuls do not depend on the other rows, and its
    attention runs the same code; the keys and values written too."""
    torch.manual_seed(7)
    D, H, KV, hd, I, S = 64, 4, 2, 16, 128, 24
    shapes = [((H + 2 * KV) * hd, D), (D, H * hd), (2 * I, D), (D, I)]
    packed = [q.pack_q4_1(torch.randn(n, k) * 0.1) for n, k in shapes]
    weights = q.LayerWeights(*((*p, *q.repack_q4_1_x16(*p)) for p in packed))
    norms = torch.rand(D) + 0.5, torch.rand(D) + 0.5
    positions = [3, 17, 9]
    ks = [torch.randn(1, KV, S, hd) for _ in positions]
    vs = [torch.randn(1, KV, S, hd) for _ in positions]
    x, cos, sin = torch.randn(3, D), torch.randn(3, hd), torch.randn(3, hd)
    alone_k, alone_v = [k.clone() for k in ks], [v.clone() for v in vs]
    alone = torch.stack([q.q4_1_decode_layer(x[b], H, 1e-5, *norms, weights, cos[b], sin[b], alone_k[b][0],
                                             alone_v[b][0], pos) for b, pos in enumerate(positions)])
    together = q.q4_1_decode_layer_batch(x, H, 1e-5, *norms, weights, cos, sin, q.BatchCaches(ks, vs, positions), 0)
    assert torch.equal(together, alone) and not torch.equal(together, x)
    assert all(torch.equal(a, b) for a, b in zip(ks + vs, alone_k + alone_v))
