"""OpenMP thread pools of the threads that are not the model worker.

Every thread that runs a parallel torch op (or one of memlm's C kernels, or FAISS) gets an OpenMP
team of its own from the runtime torch loaded (GNU libgomp on Linux), and keeps its idle workers
for as long as the thread lives. Once libgomp manages more threads than the process has CPUs, every
team waits at its barriers with a throttled spin (100 iterations instead of 300,000, then a futex
sleep): a decode step's hundreds of parallel regions then pay a futex wake-up each. Measured on 2
cores (AMD EPYC Zen 4, 2026-12-06, the bundled model in q4_1, 128 greedy tokens): 213 tok/s on a
thread alone, 89 tok/s while the main thread, which had loaded the model, still held its team, and
75 tok/s after one ingest batch had run MiniLM on the embedder's thread; the model host's own
decode was ~95 tok/s for the same reason (the model loaded on the main thread).

So a thread that runs torch work besides the model worker gives its team back when the work is
done (`release_thread_pool`: OpenMP 5.0's `omp_pause_resource_all(omp_pause_soft)`, which frees
the calling thread's pool); its next parallel region starts a new team (tens of microseconds). Only
the model worker keeps its team. A runtime without the call (or none loaded) makes this a no-op.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import os
from typing import Optional

log = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1
_RUNTIMES = ("libgomp.so.1", "libomp.so", "libiomp5.so", "libomp.dylib", "libiomp5.dylib")


@functools.cache
def _pause_call() -> Optional[ctypes._CFuncPtr]:
    """`omp_pause_resource_all` of the OpenMP runtime torch has loaded (never loading another)."""
    import torch  # noqa: F401 - loads its OpenMP runtime

    mode = getattr(os, "RTLD_NOLOAD", 0) | getattr(os, "RTLD_LAZY", 1)
    for name in _RUNTIMES:
        try:
            lib = ctypes.CDLL(name, mode=mode)
        except OSError:
            continue
        fn = getattr(lib, "omp_pause_resource_all", None)
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
            return fn
    log.debug("no OpenMP runtime with omp_pause_resource_all loaded: thread pools are kept")
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP worker threads (call it outside any parallel region, after
    the thread's torch work). True when the runtime released them."""
    fn = _pause_call()
    return fn is not None and fn(OMP_PAUSE_SOFT) == 0
