from concurrent.futures import Future

import pytest


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
