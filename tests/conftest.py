import pytest

# The session server's small limits make the limit paths cheap to reach; a short context keeps
# the over-long-prompt case fast on 2 cores.
SERVER_ENV = {
    "MEMLM_STORE__MAX_DOCUMENT_BYTES": "20000",
    "MEMLM_STORE__MAX_K": "50",
    "MEMLM_MODEL__MAX_CONTEXT_TOKENS": "1024",
    "MEMLM_MODEL__DEFAULT_MAX_NEW_TOKENS": "16",
}


@pytest.fixture(scope="session")
def bundled_model_dir():
    """The bundled SmolLM2 as a safetensors folder (converted once per machine, then cached)."""
    from memlm.models import bundled_model_dir as resolve

    return resolve()


@pytest.fixture(params=["avx2", "avx512-vnni"])
def qmatmul_isa(request):
    """Each instruction set of the Q4_1 / Q8_0 CPU kernels in force for the test in turn (VNNI
    skipped, with the reason, on a CPU without it); the CPU's best again afterwards."""
    from memlm.kernels import qmatmul_cpu

    why = qmatmul_cpu.available()
    if why is not None:
        pytest.skip(f"qmatmul_cpu kernel unavailable: {why}")
    if request.param == "avx512-vnni" and not qmatmul_cpu.has_vnni():
        pytest.skip("this CPU has no AVX512-VNNI")
    assert qmatmul_cpu.set_isa(request.param) == request.param
    yield request.param
    qmatmul_cpu.set_isa("avx512-vnni")


@pytest.fixture()
def faiss_one_thread():
    """FAISS k-means with OpenMP threads on a shared, loaded 2-core machine ran 5x slower than with
    one (spinning threads); results do not depend on it. Tests that train PQ use this."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="session")
def server(tmp_path_factory, bundled_model_dir):
    """One real `memlm serve` for the whole session (tests/services, tests/test_slim_client.py):
    a server start is ~10 s on 2 cores. Tests that need a server of their own start one."""
    from memlm.services.process import ServerProcess, free_port

    env = {**SERVER_ENV, "MEMLM_SERVER__METRICS_PORT": str(free_port())}
    proc = ServerProcess(tmp_path_factory.mktemp("server-data"), env=env)
    proc.metrics_port = int(env["MEMLM_SERVER__METRICS_PORT"])
    yield proc
    code = proc.terminate()
    assert code == 0, f"server did not shut down cleanly (exit {code}):\n{proc.output}"
