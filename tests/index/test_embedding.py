"""The bundled embedder: unit vectors; queries (caller's thread) and document batches (the
low-priority worker) give the same vectors, and those match sentence-transformers' encode()."""
import os
import sys
import threading

import numpy as np
import pytest

from memlm.index.embedding import BULK_NICE, load_embedder


def test_query_path_matches_batch_path():
    e = load_embedder("all-MiniLM-L6-v2")
    texts = ["Where is the lighthouse?", "A much longer query about the harbour wall that was rebuilt after the storm."]
    direct = e.embed_queries(texts)
    batched = e.embed(texts * 3)[:2]  # padded in a batch with others, on the bulk worker
    reference = e._model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)  # noqa: SLF001
    assert direct.shape == (2, 384) and direct.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(direct, axis=1), 1.0, rtol=1e-5)
    # Same model, same pooling: equal up to float summation order in padded batches.
    np.testing.assert_allclose(direct, batched, atol=1e-5)
    np.testing.assert_allclose(direct, reference, atol=1e-5)
    assert e.embed([]).shape == e.embed_queries([]).shape == (0, 384)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_document_batches_run_on_a_low_priority_thread():
    e = load_embedder("all-MiniLM-L6-v2")
    e.embed(["warm the worker up"])
    worker = next(t for t in threading.enumerate() if t.name == "memlm-embed-bulk")
    assert os.getpriority(os.PRIO_PROCESS, worker.native_id) == min(19, os.nice(0) + BULK_NICE)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == os.nice(0)  # callers untouched
