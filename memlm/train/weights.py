"""Adapter weights on disk: safetensors for the tensors, a JSON manifest beside them.

    DIR/adapter.safetensors   the adapter's state_dict (fp32)
    DIR/adapter.json          {"format", "mode", "adapter_config", "base_model": {"name",
                              "fingerprint"}, "training": {...}, "file": {"bytes", "sha256"}}

The base model is named by a fingerprint of its weights: sha256 over the bytes of its safetensors
file(s) for a model loaded from a folder (`folder_fingerprint`, ~1 s for SmolLM2's 538 MB, cached
by path, size and mtime), or over its state_dict for an in-memory model (`model_fingerprint`, the
tests' random models). `load_adapter` refuses weights whose manifest names another base. Writes go
to a temporary name and are renamed into place, the manifest last, so a reader never sees a
manifest for weights that are not all there.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import torch

from memlm.model.llama import Llama
from memlm.train.adapter import Adapter, adapter_class

MANIFEST_FORMAT = "memlm-adapter/1"
WEIGHTS_FILE, MANIFEST_FILE = "adapter.safetensors", "adapter.json"


class BaseModelMismatch(ValueError):
    """Adapter weights were trained on another base model than the one they are loaded into."""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def folder_fingerprint(folder: str | Path, cache_dir: Optional[Path] = None) -> str:
    """sha256 of a Hugging Face folder's safetensors files (sorted by name, each file's hash
    folded in). Cached under <cache>/fingerprints.json keyed by path, size and mtime."""
    folder = Path(folder).resolve()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors files to fingerprint")
    from memlm.models.loading import default_cache_dir

    cache = (Path(cache_dir) if cache_dir else default_cache_dir()) / "fingerprints.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    h = hashlib.sha256()
    changed = False
    for f in files:
        st = f.stat()
        key = f"{f}:{st.st_size}:{st.st_mtime_ns}"
        if key not in known:
            known[key] = _sha256_file(f)
            changed = True
        h.update(f.name.encode() + b"\0" + known[key].encode())
    if changed:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(json.dumps(known))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only cache only costs the hashing again
    return "sha256:" + h.hexdigest()


def model_fingerprint(model: Llama, exclude: Optional[Adapter] = None) -> str:
    """sha256 over the base model's state_dict (names, dtypes, shapes, bytes), leaving out the
    parameters of `exclude` (an attached adapter)."""
    skip = {id(p) for p in exclude.parameters()} if exclude is not None else set()
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict(keep_vars=True).items()):
        if id(t) in skip:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def save_adapter(adapter: Adapter, out_dir: str | Path, base_name: str, base_fingerprint: str,
                 training: dict[str, Any]) -> Path:
    """Write DIR/adapter.safetensors and DIR/adapter.json; returns the manifest's path."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().float().contiguous() for k, v in adapter.state_dict().items()}
    tmp = out / (WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp))  # no metadata: safetensors writes it in hash order, the same run would differ
    os.replace(tmp, out / WEIGHTS_FILE)
    manifest = {
        "format": MANIFEST_FORMAT,
        "mode": adapter.mode,
        "adapter_config": adapter.config_dict(),
        "base_model": {"name": base_name, "fingerprint": base_fingerprint},
        "training": training,
        "file": {"name": WEIGHTS_FILE, "bytes": (out / WEIGHTS_FILE).stat().st_size,
                 "sha256": _sha256_file(out / WEIGHTS_FILE),
                 "parameters": sum(t.numel() for t in tensors.values())},
    }
    tmp = out / (MANIFEST_FILE + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST_FILE)
    return out / MANIFEST_FILE


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected an adapter folder written by memlm train)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    return manifest


def load_adapter(folder: str | Path, model: Llama, base_fingerprint: str, attach: bool = True) -> Adapter:
    """The adapter saved in folder, for `model` whose fingerprint is base_fingerprint; attached to
    it unless attach=False. Raises BaseModelMismatch for weights made for another base model."""
    from safetensors.torch import load_file

    manifest = read_manifest(folder)
    base = manifest["base_model"]
    if base["fingerprint"] != base_fingerprint:
        raise BaseModelMismatch(
            f"adapter in {folder} was trained on base model {base['name']!r} ({base['fingerprint'][:19]}...), "
            f"not on the model given ({base_fingerprint[:19]}...): load it into that base model, or retrain"
        )
    adapter = adapter_class(manifest["mode"]).from_config(model.config, manifest["adapter_config"])
    state = load_file(str(Path(folder) / manifest["file"]["name"]))
    adapter.load_state_dict(state, strict=True)
    adapter.to(model.tok_embeddings.weight.device)
    if attach:
        adapter.attach(model)
    return adapter
