"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET must be set before a kernel is *decorated* (triton.jit reads it then), i.e.
before memlm.kernels' *_triton modules are imported. pytest imports this conftest before any test
module of this folder, and memlm.kernels itself never imports them (the dispatcher does, lazily),
so setting it here, at the very top, is early enough. The check below catches the one way it can
still go wrong: something earlier in the session importing a *_triton module.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

if importlib.util.find_spec("triton") is None:  # triton is a test extra; without it, skip here
    collect_ignore_glob = ["test_*.py"]


@pytest.fixture(autouse=True, scope="session")
def _kernels_are_interpreted():
    import torch

    if torch.cuda.is_available():
        return  # on a GPU machine the kernels may run compiled; the tests use CPU tensors though
    for name in ("memory_topk_triton", "knn_attention_triton", "merge_states_triton", "chunked_attention_triton",
                 "landmark_attention_triton"):
        mod = sys.modules.get(f"memlm.kernels.{name}")
        if mod is None:
            continue
        kernels = [v for v in vars(mod).values() if type(v).__name__ in ("JITFunction", "InterpretedFunction")]
        if any(type(v).__name__ == "JITFunction" for v in kernels):
            pytest.fail(f"memlm.kernels.{name} was imported before TRITON_INTERPRET=1 was set; "
                        "its kernels cannot run on CPU")

