import pytest


@pytest.fixture(scope="session")
def bundled_model_dir():
    """The bundled SmolLM2 as a safetensors folder (converted once per machine, then cached)."""
    from memlm.models import bundled_model_dir as resolve

    return resolve()


@pytest.fixture()
def faiss_one_thread():
    """FAISS k-means with OpenMP threads on a shared, loaded 2-core machine ran 5x slower than with
    one (spinning threads); results do not depend on it. Tests that train PQ use this."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)
