from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import pytest

# Three unrelated texts: a search for one of them finds its own document first.
RETRO_TOPICS = (
    "lighthouse keepers trim the lamp wick every evening before the fog rolls in over the bay",
    "the bakery opens at five and sells rye bread, seed rolls and a dark honey cake on Sundays",
    "glaciers carve valleys slowly, dragging boulders that are left behind when the ice retreats",
)


@dataclass(frozen=True)
class TinyRetro:
    """What the retro mode and stored-states tests share: the adapter's shape and the documents."""

    config: Any  # RetroConfig: 16-token chunks, 2 neighbours of 16 + 16 tokens, CCA at layers 1 and 3
    topics: tuple[str, ...] = RETRO_TOPICS

    @property
    def chunk_tokens(self) -> int:  # m
        return self.config.chunk_tokens

    def store_settings(self):
        """StoreSettings chunking documents at m tokens (RETRO's grid)."""
        from memlm.config import StoreSettings

        return StoreSettings(min_chunk_tokens=8, default_chunk_tokens=self.chunk_tokens)

    def documents(self) -> list:
        """doc0, doc1, doc2: each topic three times (several chunks), metadata {"n": i}."""
        from memlm.index.types import Document

        return [Document(f"doc{i}", (t + ". ") * 3, {"n": i}) for i, t in enumerate(self.topics)]


@pytest.fixture(scope="session")
def run_now():
    """A `ModeRuntime.run_on_model` that runs the work at once on the calling thread (the tests
    are the only user of the model)."""
    def run_on_model(fn) -> Future:
        f: Future = Future()
        f.set_result(fn())
        return f

    return run_on_model


@pytest.fixture(scope="session")
def tiny_retro() -> TinyRetro:
    from memlm.modes.retro.model import RetroConfig

    m = 16
    return TinyRetro(RetroConfig(chunk_tokens=m, neighbours=2, neighbour_tokens=m, continuation_tokens=m, layers=(1, 3),
                                 encoder_layers=1, encoder_dim=32, heads=2, encoder_ffn=64))


@pytest.fixture(scope="session")
def tiny_retro_llama():
    """The factory `_tiny_retro_llama` (root, tokenizer, RetroConfig) -> (model, folder, weights)."""
    return _tiny_retro_llama


def _tiny_retro_llama(root, tokenizer, retro_config, gate: float = 0.5):
    """A tiny random Llama (the bundled tokenizer's vocabulary) saved as a model folder under root,
    and a RETRO adapter for it saved as `memlm train` saves one, every gate at `gate` (as if
    trained: the neighbours change the logits): (model, model folder, weights folder)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from memlm.model import load_llama
    from memlm.modes.retro.adapter import RetroAdapter
    from memlm.train.weights import folder_fingerprint, save_adapter

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=512)).eval()
    folder = root / "tiny-llama"
    hf.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    model = load_llama(folder)
    adapter = RetroAdapter(model.config, retro_config, seed=1)
    with torch.no_grad():
        for m in adapter.cca.values():
            m.gate.fill_(gate)
    weights = root / "retro-weights"
    save_adapter(adapter, weights, folder.name, folder_fingerprint(folder), {"steps": 0})
    return model, folder, weights
