"""Language-model loading: the bundled SmolLM2 (converted once from GGUF) or any local HF folder,
served on memlm's own Llama where it can be (`load_model`), else on transformers."""
from memlm.models.loading import (
    BUNDLED_MODEL_NAME, ModelFacts, bundled_model_dir, load_causal_lm, load_model, load_tokenizer, model_facts,
    resolve_model_dir,
)

__all__ = ["BUNDLED_MODEL_NAME", "ModelFacts", "bundled_model_dir", "load_causal_lm", "load_model", "load_tokenizer",
           "model_facts", "resolve_model_dir"]
