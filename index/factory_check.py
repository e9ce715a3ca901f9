"""Whether the store can maintain a FAISS index of a given factory string, decided before any
collection uses it: at CreateCollection, and at open before recovery lets FAISS touch the type.

FAISS accepts strings it cannot serve: "HNSW0" aborts the process (an assertion, SIGABRT) on the
first add, "NSG32" refuses graphs under ~100 vectors and any second add, "IVF0,Flat" fails every
search. Two checks catch these:

- sizes, read from the string before FAISS allocates anything ("IVF4000000,Flat" costs ~610 MB
  at construction): inverted lists (`store.max_ivf_lists`), graph degree of HNSW / NSG
  (`store.max_graph_degree`), code bits of PQ-like encoders (`store.max_pq_bits`). Only at
  creation; collections that already exist keep working whatever the limits say now.
- behaviour: a throw-away `VectorIndex` of that type is driven through what the store does to
  one (add to an empty index, search, remove, add to a non-empty one, train, filtered search,
  a tombstone rebuild, save and load, add after loading) on synthetic unit vectors, in a
  short-lived child process, so that a FAISS abort or a runaway allocation kills the child and
  not the server. Any failure, crash or time-out refuses the string, naming the step and what
  FAISS said. Verdicts are cached per (dim, factory) for the life of the process; time-outs
  are not cached (they may be load, not the type).

To keep the probe cheap an IVF coarse quantizer is filled with random centroids instead of being
trained by k-means, and training uses max(512, 2 * 2**bits) vectors rather than FAISS's 39 per
centroid. Cost: one Python start and FAISS import per new (dim, factory) and process: 0.4-1.2 s for Flat,
SQ8, HNSW32, IVF1024,Flat, PQ16, IVF256,PQ16 at dim 384; 5 s (680 MB) for IVF65536,Flat; ~11 s
for OPQ16,IVF256,PQ16 (OPQ's own 50 training rounds). "Flat", the store's default, is not probed:
tests/index/test_factory_check.py probes it and checks the verdict.

Run as `python -m memlm.index.factory_check DIM FACTORY` it is that child: it prints one `step ...`
line before each step and a last line `ok` or `refused <reason>`.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from memlm.errors import InvalidArgument

if TYPE_CHECKING:
    from memlm.config import StoreSettings

PROBE_TIMEOUT_S = 120.0  # a probe of a sane type takes ~1-2 s; this only bounds a runaway one
_ADDRESS_SPACE_BYTES = 16 * 2**30  # the child's RLIMIT_AS: a huge allocation fails there, not the host

TRUSTED_FACTORIES = frozenset({"Flat"})  # exact search: nothing for FAISS to get wrong; not probed
_verdicts: dict[tuple[int, str], Optional[str]] = {}  # (dim, factory) -> None (fine) or why not
_verdicts_lock = threading.Lock()

_IVF_RE = re.compile(r"IVF(\d+)")
_IMI_RE = re.compile(r"IMI2x(\d+)")
_GRAPH_RE = re.compile(r"(HNSW|NSG)(\d+)")
# PQ16x8, RQ4x6, LSQ4x6 (last number: bits per code); PRQ2x4x6, PLSQ2x4x6 (three numbers)
_CODE_RE = re.compile(r"(PLSQ|PRQ|LSQ|RQ|PQ)(\d+)((?:x\d+)*)")


def size_parameters(factory: str) -> dict[str, int]:
    """The size-blowing parameters a factory string names: ivf_lists, graph_degree, pq_bits
    (each the largest in the string, 0 when absent; PQ-like encoders default to 8 bits)."""
    lists = [int(n) for n in _IVF_RE.findall(factory)] + [2 ** (2 * int(b)) for b in _IMI_RE.findall(factory)]
    degree = [int(n) for _, n in _GRAPH_RE.findall(factory)]
    bits = []
    for kind, _m, xs in _CODE_RE.findall(factory):
        parts = [int(x) for x in xs.split("x")[1:]]
        wanted = 2 if kind in ("PRQ", "PLSQ") else 1
        bits.append(parts[-1] if len(parts) >= wanted else 8)
    return {"ivf_lists": max(lists, default=0), "graph_degree": max(degree, default=0), "pq_bits": max(bits, default=0)}


def check_limits(factory: str, *, max_ivf_lists: int, max_graph_degree: int, max_pq_bits: int) -> None:
    """InvalidArgument when the string asks for more than the store's size limits allow."""
    p = size_parameters(factory)
    for key, limit, setting, what in (
        ("ivf_lists", max_ivf_lists, "store.max_ivf_lists", "IVF inverted lists"),
        ("graph_degree", max_graph_degree, "store.max_graph_degree", "graph neighbours per vector (HNSW M / NSG R)"),
        ("pq_bits", max_pq_bits, "store.max_pq_bits", "bits per code of a PQ-like encoder"),
    ):
        if p[key] > limit:
            raise InvalidArgument(
                f"index factory {factory!r} asks for {p[key]} {what}; the limit is {limit} ({setting})"
            )


def factory_problem(dim: int, factory: str, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
    """None when the store can maintain a `factory` index of `dim`-dimensional vectors, else a
    sentence saying why not. Runs the probe in a child process once per (dim, factory)."""
    key = (int(dim), str(factory))
    if factory in TRUSTED_FACTORIES:
        return None
    with _verdicts_lock:  # one probe at a time: each is a whole Python process
        if key in _verdicts:
            return _verdicts[key]
        verdict, cacheable = _probe_in_child(dim, factory, timeout)
        if cacheable:
            _verdicts[key] = verdict
        return verdict


def check_factory(dim: int, factory: str, settings: "StoreSettings") -> None:
    """What CreateCollection asks: the size limits, then the behaviour probe. InvalidArgument
    naming the reason when either refuses the string."""
    from memlm.index.vector_index import VectorIndex

    if not isinstance(factory, str) or not factory.strip():
        raise InvalidArgument(f"index factory must be a non-empty FAISS factory string, got {factory!r}")
    check_limits(
        factory, max_ivf_lists=settings.max_ivf_lists, max_graph_degree=settings.max_graph_degree,
        max_pq_bits=settings.max_pq_bits,
    )
    VectorIndex(dim, factory)  # the string's syntax, in-process: InvalidArgument naming a bad one
    problem = factory_problem(dim, factory)
    if problem is not None:
        raise InvalidArgument(
            f"index factory {factory!r} cannot be used for a collection of dim {dim}: {problem} "
            "(e.g. 'Flat', 'HNSW32', 'IVF256,Flat', 'IVF256,PQ16', 'PQ16')"
        )


def _probe_in_child(dim: int, factory: str, timeout: float) -> tuple[Optional[str], bool]:
    # The child sees the modules this process sees, from a folder where nothing shadows them.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "memlm.index.factory_check", str(int(dim)), factory],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir(),
        )
    except subprocess.TimeoutExpired as e:
        step = _last_step(e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or ""))
        return f"checking it did not finish within {timeout:.0f} s (while {step})", False
    lines = proc.stdout.splitlines()
    last = lines[-1] if lines else ""
    if proc.returncode == 0 and last == "ok":
        return None, True
    if proc.returncode == 0 and last.startswith("refused "):
        return last[len("refused "):], True
    step = _last_step(proc.stdout)
    if proc.returncode < 0:
        how = f"FAISS crashed the process ({signal.Signals(-proc.returncode).name})"
    else:
        how = f"the check exited with status {proc.returncode}"
    said = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    last = said[-1] if said else ""
    if m := re.search(r"Faiss assertion '.*?' failed", last):  # the condition, without the C++ signature
        last = m.group(0)
    detail = f": {last[:300]}" if last else ""
    return f"{how} while {step}{detail}", True


def _last_step(stdout: str) -> str:
    steps = [ln[len("step "):] for ln in stdout.splitlines() if ln.startswith("step ")]
    return steps[-1] if steps else "starting"


# ---------------------------------------------------------------- the child


def _faiss_message(e: BaseException) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    if "Error: " in last:  # "Error in <signature> at <file>:<line>: Error: 'cond' failed: why"
        last = last[last.index("Error: ") + len("Error: "):]
    return last[:300]


def exercise(dim: int, factory: str, say: Callable[[str], None] = lambda _s: None) -> None:
    """Drive a VectorIndex of `factory` through every operation the store performs; raise
    (RuntimeError from FAISS, AssertionError from the checks here) at the first that fails.
    Calls `say(step)` before each step. Run it in a child process: FAISS may abort instead."""
    import numpy as np

    from memlm.index.vector_index import VectorIndex, _ivf_of

    rng = np.random.default_rng(0)

    def unit(n: int) -> np.ndarray:  # (n, dim) unit rows
        x = rng.standard_normal((n, dim)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    bits = size_parameters(factory)["pq_bits"]
    n_train = max(512, 2 * 2**bits)
    say("building the index")
    index = VectorIndex(dim, factory, exact_filter_below=1, min_train=n_train)  # filters go through FAISS
    ivf = _ivf_of(index._main)
    if ivf is not None and ivf.quantizer.is_trained and ivf.quantizer.ntotal == 0:
        say(f"filling the coarse quantizer with {ivf.nlist} centroids")
        assert ivf.nlist > 0, f"an IVF index needs at least one inverted list, got {ivf.nlist}"
        ivf.quantizer.add(unit(ivf.nlist))  # stands in for k-means: IndexIVF.train then skips it

    vectors = unit(n_train + 65)  # one more than n_train: one of the first 8 is removed before training
    live: set[int] = set()

    def add(lo: int, hi: int, what: str) -> None:
        say(what)
        index.add(np.arange(lo, hi, dtype=np.int64), vectors[lo:hi])
        live.update(range(lo, hi))

    def search(what: str, allowed: Optional[np.ndarray] = None) -> None:
        say(what)
        probes = np.array(sorted(live)[:4] if allowed is None else sorted(set(allowed.tolist()) & live)[:4])
        _s, ids = index.search(vectors[probes], 5, allowed)
        for row in ids:
            found = set(row[row >= 0].tolist())
            assert found, "a search for stored vectors found nothing"
            assert found <= live, f"a search returned ids that are not in the index: {sorted(found - live)[:5]}"
            if allowed is not None:
                assert found <= set(allowed.tolist()), "a filtered search returned ids outside the filter"

    def remove(ids: list[int], what: str) -> None:
        say(what)
        index.remove(np.asarray(ids, dtype=np.int64))
        live.difference_update(ids)

    add(0, 8, "adding 8 vectors to an empty index")
    search("searching 8 vectors")
    remove([1], "removing a vector")
    search("searching after a removal")
    add(8, n_train + 1, f"adding {n_train - 7} vectors to a non-empty index (training it if it needs training)")
    assert index.is_trained, "the index is still untrained after its training size was reached"
    search("searching the trained index")
    search("searching with a filter", np.arange(0, n_train, 2, dtype=np.int64))
    remove(list(range(8, n_train // 2)), "removing half of the vectors (a rebuild where removal is by tombstone)")
    search("searching after removing half")
    with tempfile.TemporaryDirectory() as tmp:
        say("saving and loading the index")
        path = Path(tmp) / "probe.faiss"
        index.save(path)
        index = VectorIndex.load(path)
    search("searching the loaded index")
    add(n_train + 1, n_train + 65, "adding vectors to the loaded index")
    search("searching after adding to the loaded index")
    assert index.ntotal == len(live), f"the index holds {index.ntotal} vectors, expected {len(live)}"


def _main(argv: list[str]) -> int:
    import resource

    # Set here rather than by preexec_fn, which is unsafe in the server's threaded process.
    resource.setrlimit(resource.RLIMIT_AS, (_ADDRESS_SPACE_BYTES, _ADDRESS_SPACE_BYTES))
    dim, factory = int(argv[0]), argv[1]
    current = ["starting"]

    def say(step: str) -> None:
        current[0] = step
        print("step " + step, flush=True)

    try:
        exercise(dim, factory, say)
    except Exception as e:  # noqa: BLE001 - every failure is the verdict
        print(f"refused it fails when {current[0]}: {_faiss_message(e)}", flush=True)
        return 0
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
