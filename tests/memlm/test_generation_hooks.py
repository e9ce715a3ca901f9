"""The token loop's mode hooks (memlm.modes.base.GenerationHooks): per-token calls, a call at
every completed chunk (RETRO's neighbour fetch), and extra embeddings before the prompt (RMT's
memory tokens). A tiny random Llama with the bundled tokenizer, as memlm's own model and as
transformers': the loop, not the model, is tested."""
from __future__ import annotations

import threading

import pytest
import torch

from memlm.engine import SamplingParams
from memlm.generation import GenerationOutcome, generate_tokens
from memlm.modes.base import GenerationHooks


@pytest.fixture(scope="module", params=["memlm", "transformers"])
def tiny(bundled_model_dir, request, tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from memlm.model import load_llama
    from memlm.models.loading import load_tokenizer, resolve_model_dir

    tokenizer = load_tokenizer(resolve_model_dir(None))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    hf = LlamaForCausalLM(config).eval()
    if request.param == "transformers":
        return hf, tokenizer
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(folder)
    return load_llama(folder), tokenizer


def embed(model, ids):
    """Input embeddings (1, T, dim) of either model."""
    table = model.tok_embeddings if hasattr(model, "tok_embeddings") else model.get_input_embeddings()
    return table(torch.tensor([ids]))


class Recorder(GenerationHooks):
    def __init__(self, chunk_tokens: int = 0, prefix=None):
        self.chunk_tokens, self.prefix = chunk_tokens, prefix
        self.tokens: list[tuple[int, int]] = []
        self.chunks: list[tuple[int, int]] = []  # (len(token_ids), end)

    def prefix_embeds(self, input_ids):
        return self.prefix

    def on_chunk(self, token_ids, end):
        self.chunks.append((len(token_ids), end))

    def on_token(self, token_id, position):
        self.tokens.append((token_id, position))


def run(model, tokenizer, ids, hooks=None, n=12):
    *_, outcome = generate_tokens(model, tokenizer, ids, SamplingParams(max_new_tokens=n), threading.Event(),
                                  eos_ids=(), **({"hooks": hooks} if hooks is not None else {}))
    assert isinstance(outcome, GenerationOutcome)
    return outcome


def test_every_token_and_every_completed_chunk_is_seen_in_order(tiny):
    model, tokenizer = tiny
    ids = list(range(100, 110))  # 10 prompt tokens
    hooks = Recorder(chunk_tokens=4)
    outcome = run(model, tokenizer, ids, hooks, n=12)
    assert [t for t, _ in hooks.tokens] == list(outcome.token_ids)
    assert [p for _, p in hooks.tokens] == list(range(10, 22))  # positions after the prompt
    # the prompt's completed chunks at prefill (8 of its 10 tokens), then each 4 tokens later
    assert hooks.chunks == [(10, 8), (12, 12), (16, 16), (20, 20)]
    assert run(model, tokenizer, ids).token_ids == outcome.token_ids  # hooks that only watch change nothing


def test_prefix_embeddings_go_before_the_prompt(tiny):
    model, tokenizer = tiny
    prefix_ids, ids = list(range(300, 305)), list(range(100, 110))
    with torch.inference_mode():
        prefix = embed(model, prefix_ids)  # (1, 5, dim)
    with_prefix = run(model, tokenizer, ids, Recorder(prefix=prefix))
    assert with_prefix.token_ids == run(model, tokenizer, prefix_ids + ids).token_ids
    assert with_prefix.token_ids != run(model, tokenizer, ids).token_ids
