import pytest


@pytest.fixture(scope="session")
def bundled_model_dir():
    """The bundled SmolLM2 as a safetensors folder (converted once per machine, then cached)."""
    from memlm.models import bundled_model_dir as resolve

    return resolve()
