"""Language-model loading: the bundled SmolLM2 (converted once from GGUF) or any local HF folder."""
from memlm.models.loading import BUNDLED_MODEL_NAME, bundled_model_dir, load_causal_lm, load_tokenizer, resolve_model_dir

__all__ = ["BUNDLED_MODEL_NAME", "bundled_model_dir", "load_causal_lm", "load_tokenizer", "resolve_model_dir"]
