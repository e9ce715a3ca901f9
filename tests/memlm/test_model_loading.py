"""Which class serves a model folder (`memlm.models.loading.load_model`), the facts the host reads
of either (`model_facts`), and the one token loop on both: tiny random models saved as Hugging
Face folders, so nothing here needs the bundled model."""
from __future__ import annotations

import threading

import pytest
import torch

from memlm import generation
from memlm.engine import SamplingParams
from memlm.model import Llama
from memlm.models.loading import load_model, model_facts


@pytest.fixture(scope="module")
def tokenizer(bundled_model_dir):
    from memlm.models.loading import load_tokenizer

    return load_tokenizer(bundled_model_dir)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, eos_token_id=2)
    folder = tmp_path_factory.mktemp("llama")
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=[2, 7])
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=128)).save_pretrained(folder)
    return folder


def test_a_llama_folder_loads_as_memlm_model_and_others_as_transformers(tiny_llama, tiny_gpt2):
    owned = load_model(tiny_llama)
    assert isinstance(owned, Llama)
    facts = model_facts(owned)
    assert (facts.layers, facts.heads, facts.kv_heads, facts.head_dim, facts.context_length) == (2, 4, 2, 8, 256)
    assert facts.owned and facts.eos_ids == {2, 7}  # config.json's and generation_config.json's
    hf = load_model(tiny_llama, model_impl="transformers")
    assert not isinstance(hf, Llama)
    assert model_facts(hf) == facts.__class__(**{**facts.__dict__, "owned": False})  # the same facts either way
    gpt2 = load_model(tiny_gpt2)
    assert type(gpt2).__name__ == "GPT2LMHeadModel"
    f = model_facts(gpt2)
    assert (f.layers, f.heads, f.head_dim, f.context_length, f.architecture, f.owned) == (2, 4, 8, 128, "GPT2LMHeadModel", False)
    with pytest.raises(ValueError, match="cannot run on memlm.model.*GPT2LMHeadModel"):
        load_model(tiny_gpt2, model_impl="memlm")
    with pytest.raises(ValueError, match="model_impl='onnx'"):
        load_model(tiny_llama, model_impl="onnx")


def test_the_kv_cache_dtype_is_fp16_with_q4_1_unless_set(tiny_llama):
    """model.kv_cache_dtype "auto": the owned model's caches in fp16 with q4_1 weights (what the C
    decode layers read), else in the model's dtype; "float32" / "float16" override either way."""
    from pydantic import ValidationError

    from memlm.config import ModelSettings
    from memlm.kernels import qmatmul_cpu

    dense = load_model(tiny_llama)
    assert dense.kv_dtype is None and dense.new_cache(1, 8).k.dtype == torch.float32
    assert load_model(tiny_llama, kv_cache_dtype="float16").new_cache(1, 8).k.dtype == torch.float16
    with pytest.raises(ValidationError, match="kv_cache_dtype"):
        ModelSettings(kv_cache_dtype="bfloat16")
    if qmatmul_cpu.available() is not None:
        pytest.skip(f"q4_1 serves dense here: {qmatmul_cpu.available()}")
    q4 = load_model(tiny_llama, weights="q4_1")
    assert q4.kv_dtype == torch.float16 and q4.new_cache(1, 8).k.dtype == torch.float16
    assert load_model(tiny_llama, weights="q4_1", kv_cache_dtype="float32").new_cache(1, 8).k.dtype == torch.float32


def _run(model, tokenizer, ids, **sampling):
    *_, outcome = generation.generate_tokens(model, tokenizer, ids, SamplingParams(**sampling), threading.Event(), eos_ids=())
    return outcome.token_ids


@pytest.mark.parametrize("sampling", [dict(max_new_tokens=20), dict(max_new_tokens=20, temperature=1.0, top_p=0.9, seed=3)],
                         ids=["greedy", "sampled"])
def test_the_owned_loop_equals_the_transformers_loop(tiny_llama, tokenizer, monkeypatch, sampling):
    """The same tokens through OwnedSequence (fixed cache, chunked prefill) and HFSequence; a
    7-token prefill chunk makes the 30-token prompt take five pieces."""
    owned, hf = load_model(tiny_llama), load_model(tiny_llama, model_impl="transformers")
    ids = list(range(200, 230))
    want = _run(hf, tokenizer, ids, **sampling)
    assert len(want) == 20
    assert _run(owned, tokenizer, ids, **sampling) == want
    monkeypatch.setattr(generation, "PREFILL_CHUNK_TOKENS", 7)
    assert _run(owned, tokenizer, ids, **sampling) == want
    assert _run(hf, tokenizer, ids, **sampling) == want


def test_a_gpt2_folder_generates_through_the_same_loop(tiny_gpt2, tokenizer):
    model = load_model(tiny_gpt2)
    assert len(_run(model, tokenizer, list(range(100, 110)), max_new_tokens=5)) == 5
