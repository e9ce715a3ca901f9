from concurrent.futures import Future

import pytest


@pytest.fixture(scope="session")
def run_now():
    """A `ModeRuntime.run_on_model` that runs the work at once on the calling thread (the tests
    are the only user of the model)."""
    def run_on_model(fn) -> Future:
        f: Future = Future()
        f.set_result(fn())
        return f

    return run_on_model
