"""memlm.model.quantize: each quantized linear against its own `forward_native` and the fp32
layer it replaces, over awkward shapes; the quantized bundled model against the fp32 one. The
block formats' kernel itself is tested in tests/kernels/test_qmatmul_cpu.py."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from memlm.model import load_llama
from memlm.kernels import qmatmul_cpu
from memlm.model.quantize import INT4_GROUP_SIZE, Int4Linear, Int8Linear, Q4_1Linear, Q8_0Linear, quantize_model

PROMPT = ("Memory lets a language model read more than its context window holds: documents are "
          "turned into keys and values, and each query attends to the nearest ones.")  # test_owned_model's

# (M, K, N); odd N catch tiling bugs; (24, 64, 48) takes the x16 layout on a VNNI CPU at 48 rows
SHAPES = [(1, 64, 83), (7, 96, 769), (3, 576, 960), (128, 32, 5), (24, 64, 48)]


def _pair(x: torch.Tensor, layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(kernel output, reference output in fp32, the error plain torch makes in bf16 on the same
    dequantized weights): the kernels take bf16 activations and return bf16, so their error is
    judged against what a bf16 F.linear gets, flash-attention style, not a magic tolerance."""
    w = layer.dequantize()
    ref = F.linear(x, w)
    torch_bf16 = F.linear(x.bfloat16(), w.bfloat16()).float()
    return layer(x), ref, (torch_bf16 - ref).abs().max().item()


@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@torch.inference_mode()
def test_kernel_matches_its_reference(cls, M, K, N):
    torch.manual_seed(M * 1000 + N)
    linear = nn.Linear(K, N, bias=True)
    layer = cls(linear.weight, linear.bias)
    x = torch.randn(2, M, K)
    out, ref, bf16_err = _pair(x, layer)
    ref = ref + linear.bias
    assert out.shape == (2, M, N) and out.dtype == torch.float32
    # 2x torch's own bf16 error, plus one bf16 ulp of the largest output for the bias add.
    assert (out - ref).abs().max().item() <= 2 * bf16_err + ref.abs().max().item() * 2**-8
    torch.testing.assert_close(layer.forward_native(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(qmatmul_cpu.available() is not None, reason=f"qmatmul_cpu: {qmatmul_cpu.available()}")
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("cls", [Q4_1Linear, Q8_0Linear])
@torch.inference_mode()
def test_block_format_layer_runs_its_kernel_on_the_dequantized_weights(cls, M, K, N, qmatmul_isa):
    """The layer is the kernel on (M, K) rows of any leading shape, plus the bias; its only error
    against forward_native is the activations' int8 rounding, which the kernel reference states.
    With the x16 layout in force (AVX512-VNNI, N a multiple of 16) that holds at every row count;
    otherwise from PREFILL_ROWS rows on it is the fp32 GEMM on the unpacked weight: forward_native."""
    torch.manual_seed(M * 1000 + N)
    linear = nn.Linear(K, N, bias=True)
    layer = cls(linear.weight, linear.bias)
    assert layer.kernel_ready
    assert layer._x16_in_force() == (qmatmul_isa == "avx512-vnni" and N % 16 == 0)
    x = torch.randn(2, M, K)
    out = layer(x)
    assert out.shape == (2, M, N) and out.dtype == torch.float32
    if layer._x16_in_force() and layer.AMX_ROWS is not None and 2 * M >= layer.AMX_ROWS:
        pytest.skip("this many rows take the bf16 GEMM on this CPU (AMX): see the test below")
    if 2 * M >= layer.PREFILL_ROWS and not layer._x16_in_force():
        torch.testing.assert_close(out, layer.forward_native(x), rtol=1e-5, atol=1e-5)
        return
    w = layer.dequantize().double()
    expected = qmatmul_cpu.quantize_activations_ref(x.view(-1, K)).double() @ w.T + linear.bias.double()
    assert (out.view(-1, N).double() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()
    native = layer.forward_native(x)  # fp32 activations: the int8 rounding is what separates them
    assert (out - native).abs().max().item() <= 0.02 * native.abs().max().item()


@pytest.mark.parametrize("cls", [Q4_1Linear, Q8_0Linear])
@torch.inference_mode()
def test_from_amx_rows_the_x16_layer_runs_the_bf16_gemm(cls, monkeypatch):
    """Where AMX runs oneDNN's bf16 GEMM, a pass of AMX_ROWS rows or more (a prompt's prefill)
    takes the bf16 copy of the dequantized weight; fewer rows keep the x16 integer kernel. (The
    threshold is lowered here; the bf16 GEMM gives the same numbers on any CPU.)"""
    if not qmatmul_cpu.has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI: the x16 kernel does not run")
    torch.manual_seed(7)
    linear = nn.Linear(128, 48, bias=False)
    layer = cls(linear.weight, None)
    assert layer._x16_in_force()
    monkeypatch.setattr(cls, "AMX_ROWS", 16)
    x = torch.randn(16, 128)
    bf16 = torch.nn.functional.linear(x.bfloat16(), layer.dequantize().bfloat16()).float()
    assert torch.equal(layer(x), bf16)
    assert torch.equal(layer(x[:15]), layer._matmul(x[:15]))
    assert not torch.equal(layer(x[:15]), bf16[:15])


@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
@torch.inference_mode()
def test_quantization_error_is_within_half_a_step(cls):
    torch.manual_seed(0)
    w = torch.randn(83, 128)
    layer = cls(w)
    err = (layer.dequantize() - w).abs()  # (N, K)
    if cls is Int8Linear:
        step = layer.scale.float()[:, None]  # (N, 1)
        assert (err <= step / 2 * 1.01).all()  # 1%: the bf16-rounded scale's slack
    else:
        scale, zero = layer.scales_and_zeros.float().transpose(0, 1).unbind(-1)  # each (N, G)
        step = scale.repeat_interleave(INT4_GROUP_SIZE, dim=1)
        slack = (zero.abs() + 8 * scale).repeat_interleave(INT4_GROUP_SIZE, dim=1) * 2**-8  # bf16 zero and scale
        assert (err <= step / 2 + slack).all()


@torch.inference_mode()
def test_int4_finds_the_codes_of_weights_already_on_a_q4_1_grid():
    """GGUF Q4_1 weights are d * q + m per group of 32 (q in 0..15, both ends used): min/max
    quantization of them recovers q exactly, so the bundled model loses nothing at the codes."""
    torch.manual_seed(0)
    N, K = 40, 96
    q = torch.randint(0, 16, (N, K // 32, 32))
    q[..., 0], q[..., 1] = 0, 15
    d, m = torch.rand(N, K // 32, 1) * 0.01, torch.randn(N, K // 32, 1) * 0.05
    layer = Int4Linear((d * q + m).view(N, K))
    assert torch.equal(layer.codes.view(N, K // 32, 32).long(), q)


def _tiny_folder(path, layers: int = 2):
    """A random Llama (2 layers by default) saved as an HF folder; widths multiples of the int4 group."""
    from transformers import LlamaConfig as HFLlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = HFLlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_quantize_model_replaces_every_projection_and_the_head_once(tmp_path):
    model = load_llama(_tiny_folder(tmp_path / "fp32"))
    quantize_model(model, "int4")
    for block in model.layers:
        assert all(isinstance(m, Int4Linear) for m in (block.attention.wqkv, block.attention.wo,
                                                       block.feed_forward.w13, block.feed_forward.w2))
    assert isinstance(model.output, Int8Linear)
    assert model.tok_embeddings.weight.dtype == torch.float32  # lookups stay exact
    head = model.output
    assert quantize_model(model, "int4").output is head  # a second call changes nothing
    quantize_model(model := load_llama(tmp_path / "fp32"), "q4_1")
    for block in model.layers:
        assert all(isinstance(m, Q4_1Linear) for m in (block.attention.wqkv, block.attention.wo,
                                                       block.feed_forward.w13, block.feed_forward.w2))
    assert isinstance(model.output, Q8_0Linear)  # the GGUF's own head format
    with pytest.raises(ValueError, match="'int3'"):
        quantize_model(model, "int3")
    with pytest.raises(ValueError, match="dtype"):
        load_llama(tmp_path / "fp32", dtype=torch.bfloat16, weights="int8")


# Measured on SmolLM2-135M for PROMPT (30 tokens), against fp32: top-1 agreement over the 30
# positions int8 0.933 (28/30), int4 1.0; max |logit diff| relative to the largest fp32 logit
# int8 0.042, int4 0.021 (int4 is the GGUF's own codes; its error is bf16 rounding and the int8
# head); q4_1 0.933 / 0.033 and q8_0 0.967 / 0.041 (the GGUF's codes too; their error is the
# activations' int8 rounding, as in llama.cpp). The bounds leave ~2x room on the error, and one
# or two positions on agreement.
BOUNDS = {"int8": (0.85, 0.10), "int4": (0.93, 0.05), "q4_1": (0.85, 0.07), "q8_0": (0.85, 0.08)}


@pytest.fixture(scope="module")
def bundled_formats(bundled_model_dir):
    dense = load_llama(bundled_model_dir)
    return {"dense": dense, **{w: quantize_model(copy.deepcopy(dense), w) for w in BOUNDS}}


@pytest.mark.model
@pytest.mark.parametrize("weights", list(BOUNDS))
@torch.inference_mode()
def test_quantized_bundled_logits_stay_close_to_fp32(bundled_formats, weights):
    from memlm.models import load_tokenizer
    from memlm.models.loading import bundled_model_dir

    ids = load_tokenizer(bundled_model_dir())(PROMPT, return_tensors="pt").input_ids  # (1, T)
    T = ids.shape[1]
    ref = bundled_formats["dense"](ids, torch.arange(T))[0]  # (T, V)
    out = bundled_formats[weights](ids, torch.arange(T))[0]
    agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"{weights}: top-1 agreement with fp32 {agree:.3f} over {T} positions, max relative logit error {rel:.4f}")
    min_agree, max_rel = BOUNDS[weights]
    assert agree >= min_agree and rel <= max_rel


@pytest.mark.model
def test_the_bundled_head_is_per_row_int8_of_the_fp32_embeddings(bundled_formats):
    model = bundled_formats["int4"]
    assert isinstance(model.output, Int8Linear) and model.output.weight_int8.dtype == torch.int8
    assert model.output.weight_int8.shape == model.tok_embeddings.weight.shape  # (V, D)
    emb = model.tok_embeddings.weight
    assert emb.dtype == torch.float32
    err = (model.output.dequantize() - emb).abs().amax(1)  # (V,)
    assert (err <= model.output.scale.float() / 2 * 1.01).all()  # each row within half its step


@pytest.mark.skipif(qmatmul_cpu.available() is not None, reason=f"qmatmul_cpu: {qmatmul_cpu.available()}")
@torch.inference_mode()
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_the_fused_q4_1_decode_step_computes_the_layer(tmp_path, qmatmul_isa, kv_dtype):
    """q4_1's one-call decode layer (Block.decode_fast) against the module path of the same
    quantized layer: output, and the keys and values written to the cache. The two round the
    activations to int8 from norms computed in a different order, so an int8 code may differ by
    one here and there: the bound is a small relative error, far below what a wrong RoPE or cache
    slot gives (checked by breaking each)."""
    from memlm.model.quantize import q4_1_decode_step

    model = quantize_model(load_llama(_tiny_folder(tmp_path / "fp32")), "q4_1")
    model.kv_dtype = kv_dtype  # the caches the C layers read and write: fp32, or fp16 as served
    assert all(b.decode_fast is q4_1_decode_step for b in model.layers)
    torch.manual_seed(1)
    prompt = torch.randint(0, 101, (1, 20))
    class Shift(torch.nn.Module):  # a module after the attention (RETRO's CCA sits there): runs between the halves
        def forward(self, x, input_pos):
            return x + 0.05 * x.roll(1, -1) + 0.001 * input_pos.float()[:, None]

    for layer, inserted in ((0, False), (1, False), (1, True)):
        block = model.layers[layer]
        block.after_attention = torch.nn.ModuleList([Shift()] if inserted else [])
        caches = []
        for fast in (None, q4_1_decode_step):
            cache = model.new_cache(1, 32)
            for b in model.layers:
                b.decode_fast = None
            model(prompt, torch.arange(20), cache)  # the same prefill into both caches
            block.decode_fast = fast
            torch.manual_seed(2)
            x = torch.randn(1, 1, 64)
            pos = torch.tensor([20])
            rope = (model.rope_cos[pos, None], model.rope_sin[pos, None])
            out = block(x, rope, pos, None, cache, 21)
            caches.append((out, cache.k[layer, 0, :, 20].clone(), cache.v[layer, 0, :, 20].clone()))
        (ref, k_ref, v_ref), (got, k_got, v_got) = caches
        for a, b in ((got, ref), (k_got, k_ref), (v_got, v_ref)):
            assert a.shape == b.shape
            assert (a - b).abs().max().item() <= 0.02 * b.abs().max().item()

    model.layers[1].after_attention = torch.nn.ModuleList()

    # The two halves (parts 1 then 2) are the whole layer (3), bit for bit, and each does something.
    att, ff, x = block.attention, block.feed_forward, torch.randn(64)
    def layer(v, parts, cache=model.new_cache(1, 32)):
        return qmatmul_cpu.q4_1_decode_layer(
            v, att.n_heads, block.attention_norm.eps, block.attention_norm.weight, block.ffn_norm.weight,
            qmatmul_cpu.LayerWeights(*(m.kernel_weights() for m in (att.wqkv, att.wo, ff.w13, ff.w2))),
            model.rope_cos[5].contiguous(),
            model.rope_sin[5].contiguous(), cache.k[att.layer, 0], cache.v[att.layer, 0], 5, parts)
    whole, first = layer(x, 3), layer(x, 1)
    assert torch.equal(layer(first, 2), whole)
    assert not torch.equal(first, x) and not torch.equal(first, whole) and not torch.equal(layer(x, 2), x)

    # Cases it leaves to the module path: a prefill (T > 1) and a swapped attention backend.
    block = model.layers[0]
    cache = model.new_cache(1, 32)
    rope = (model.rope_cos[:2, None], model.rope_sin[:2, None])
    assert q4_1_decode_step(block, torch.randn(1, 2, 64), rope, cache, 2) is None
    block.attention.backend = type("Other", (torch.nn.Module,), {"forward": lambda self, q, k, v, m: q})()
    assert q4_1_decode_step(block, torch.randn(1, 1, 64), rope, cache, 1) is None


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_the_batched_q4_1_decode_step_computes_each_sequence_layer(tmp_path, qmatmul_isa, kv_dtype):
    """The one-call decode layer over a RaggedBatch of decoding sequences (each at its own position
    in its own cache) against the module path of the same quantized layer, per sequence: output
    and the keys and values written, within the fused one-sequence step's bound above. A batch
    with a prompt chunk in it is left to the module path."""
    from memlm.model.llama import RaggedBatch
    from memlm.model.quantize import q4_1_decode_step

    model = quantize_model(load_llama(_tiny_folder(tmp_path / "fp32")), "q4_1")
    model.kv_dtype = kv_dtype  # the caches the C layers read and write: fp32, or fp16 as served
    torch.manual_seed(3)
    starts = [5, 17, 11]
    prompts = [torch.randint(0, 101, (1, n)) for n in starts]
    block = model.layers[1]
    runs = []
    for fast in (None, q4_1_decode_step):
        caches = [model.new_cache(1, 32) for _ in starts]
        for b in model.layers:
            b.decode_fast = None
        for p, c in zip(prompts, caches):
            model(p, torch.arange(p.shape[1]), c)
        block.decode_fast = fast
        batch = RaggedBatch(caches, starts, [1, 1, 1])
        torch.manual_seed(4)
        x = torch.randn(1, 3, 64)
        rope = (model.rope_cos[batch.input_pos, None], model.rope_sin[batch.input_pos, None])
        if fast is not None:
            assert fast(block, x, rope, batch, 0) is not None  # taken: every sequence decodes one token
            caches = [model.new_cache(1, 32) for _ in starts]  # again on fresh caches, through Block.forward
            for p, c in zip(prompts, caches):
                for b in model.layers:
                    b.decode_fast = None
                model(p, torch.arange(p.shape[1]), c)
            block.decode_fast = fast
            batch = RaggedBatch(caches, starts, [1, 1, 1])
        out = block(x, rope, batch.input_pos, None, batch, 0)
        runs.append((out, [c.k[1, 0, :, s].clone() for c, s in zip(caches, starts)],
                     [c.v[1, 0, :, s].clone() for c, s in zip(caches, starts)]))
    (ref, k_ref, v_ref), (got, k_got, v_got) = runs
    assert got.shape == ref.shape == (1, 3, 64)
    for a, b in [(got, ref), *zip(k_got, k_ref), *zip(v_got, v_ref)]:
        assert (a - b).abs().max().item() <= 0.02 * b.abs().max().item()
    mixed = RaggedBatch([model.new_cache(1, 32), model.new_cache(1, 32)], [0, 4], [3, 1])
    rope = (model.rope_cos[mixed.input_pos, None], model.rope_sin[mixed.input_pos, None])
    assert q4_1_decode_step(block, torch.randn(1, 4, 64), rope, mixed, 0) is None


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.float16])
def test_the_one_call_decoder_stack_equals_the_fused_layers_one_by_one(tmp_path, qmatmul_isa, monkeypatch, kv_dtype):
    """Llama.decode_stack for q4_1 (runs of plain layers in one C call each) gives the logits and
    caches of the fused layers called one by one, bit for bit, for one sequence and for a
    RaggedBatch; a prefill steps aside, and a layer with a module after its attention or a
    swapped attention backend runs its own path between the runs."""
    from memlm.model.generate import ragged_step
    from memlm.model.llama import RaggedBatch
    from memlm.model.quantize import q4_1_decode_stack

    model = quantize_model(load_llama(_tiny_folder(tmp_path / "fp32", layers=4)), "q4_1")
    model.kv_dtype = kv_dtype  # the caches the C layers read and write: fp32, or fp16 as served
    assert model.decode_stack is q4_1_decode_stack
    calls = []
    real = qmatmul_cpu.q4_1_decode_stack_batch
    monkeypatch.setattr(qmatmul_cpu, "q4_1_decode_stack_batch", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    torch.manual_seed(5)
    starts = [6, 13, 9]
    prompts = [torch.randint(0, 101, (1, n)) for n in starts]
    token = torch.randint(0, 101, (3,))

    def step(stack):
        """Prefill each prompt, then one decode step alone (sequence 0) and one batched (all)."""
        model.decode_stack = stack
        caches = [model.new_cache(1, 32) for _ in starts]
        for p, c in zip(prompts, caches):
            model(p, torch.arange(p.shape[1]), c)
        alone = model(token[:1, None], torch.tensor([starts[0]]), caches[0])[0, -1]
        batch = RaggedBatch(caches[1:], starts[1:], [1, 1])
        batched = ragged_step(model, token[1:], batch)
        return alone, batched, [c.k.clone() for c in caches], [c.v.clone() for c in caches]

    layered = step(None)
    assert calls == []
    stacked = step(q4_1_decode_stack)
    assert calls == [1, 2]  # the prefills stepped aside; the two decode steps took it
    assert torch.equal(stacked[0], layered[0]) and torch.equal(stacked[1], layered[1])
    for a, b in zip(stacked[2] + stacked[3], layered[2] + layered[3]):
        assert torch.equal(a, b)

    # A layer that is not plain runs its own path between runs of the others, with the same numbers.
    class Shift(torch.nn.Module):  # a module after the attention, as RETRO's cross-attention
        def forward(self, x, input_pos):
            return x + 0.05 * x.roll(1, -1) + 0.001 * input_pos.float()[:, None]

    other = type("Other", (torch.nn.Module,), {"forward": lambda self, q, k, v, m: q})()

    def decode(stack):
        model.decode_stack = stack
        cache = model.new_cache(1, 32)
        model(prompts[0], torch.arange(starts[0]), cache)
        return model(token[:1, None], torch.tensor([starts[0]]), cache)[0, -1], cache.k.clone(), cache.v.clone()

    for layer, change, runs in ((1, "after_attention", [1, 1]), (2, "backend", [1, 1]), (0, "backend", [1, 1])):
        block = model.layers[layer]
        if change == "after_attention":
            block.after_attention = torch.nn.ModuleList([Shift()])
        else:
            block.attention.backend = other
        calls.clear()
        got, want = decode(q4_1_decode_stack), decode(None)
        assert calls == runs  # runs of plain layers: [0] and [2, 3]; [0, 1] and [3]; [1] and [3] (2 keeps its backend)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        block.after_attention = torch.nn.ModuleList()
    for block in model.layers:
        block.attention.backend = other
    cache = model.new_cache(1, 32)
    x, pos = torch.randn(1, 1, 64), torch.tensor([0])
    rope = (model.rope_cos[pos, None], model.rope_sin[pos, None])
    assert q4_1_decode_stack(model, x, rope, pos, cache, 1) is None  # no plain layer left
