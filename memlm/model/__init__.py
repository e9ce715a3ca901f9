"""memlm's own Llama-family model, with extension points for the memory modes.

`memlm.model` is the network (`Llama`, its KV cache and hooks, greedy decoding); `memlm.models`
finds and converts weights (the bundled SmolLM2 GGUF -> a cached safetensors folder). Typical use:
`load_llama(bundled_model_dir(), weights="q4_1")` (weight formats: `memlm.model.quantize`).
"""
from memlm.model.generate import decode_one_token, greedy_generate, prefill
from memlm.model.llama import AttentionBackend, KVCache, Llama, LlamaConfig, SDPABackend, load_llama
from memlm.model.quantize import WEIGHT_FORMATS, Int4Linear, Int8Linear, Q4_1Linear, Q8_0Linear, quantize_model

__all__ = ["WEIGHT_FORMATS", "AttentionBackend", "Int4Linear", "Int8Linear", "KVCache", "Q4_1Linear", "Q8_0Linear", "Llama", "LlamaConfig",
           "SDPABackend", "decode_one_token", "greedy_generate", "load_llama", "prefill", "quantize_model"]
