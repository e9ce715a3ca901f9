"""The bundled embedder: unit vectors, and the query fast path gives the same vectors as encode()."""
import numpy as np

from memlm.index.embedding import load_embedder


def test_query_path_matches_batch_path():
    e = load_embedder("all-MiniLM-L6-v2")
    texts = ["Where is the lighthouse?", "A much longer query about the harbour wall that was rebuilt after the storm."]
    direct = e.embed(texts)  # <= 4 texts: the direct path
    batched = e.embed(texts * 3)[:2]  # > 4 texts: sentence-transformers' encode()
    assert direct.shape == (2, 384) and direct.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(direct, axis=1), 1.0, rtol=1e-5)
    # Same model, same pooling: equal up to float summation order in padded batches.
    np.testing.assert_allclose(direct, batched, atol=1e-5)
