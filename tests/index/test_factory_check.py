"""The factory check: size limits read from the string, and the behaviour probe in a child process
(a FAISS abort kills the child, not this process)."""
from __future__ import annotations

import os

import pytest

from memlm.config import StoreSettings
from memlm.errors import InvalidArgument
from memlm.index import factory_check as fc


def test_size_parameters_are_read_from_the_string():
    assert fc.size_parameters("Flat") == {"ivf_lists": 0, "graph_degree": 0, "pq_bits": 0}
    assert fc.size_parameters("IVF4096,PQ16x4fs") == {"ivf_lists": 4096, "graph_degree": 0, "pq_bits": 4}
    assert fc.size_parameters("OPQ16,IVF256_HNSW32,PQ16") == {"ivf_lists": 256, "graph_degree": 32, "pq_bits": 8}
    assert fc.size_parameters("IMI2x10,Flat")["ivf_lists"] == 2**20
    assert fc.size_parameters("RQ4x12")["pq_bits"] == 12


@pytest.mark.parametrize("factory,setting", [
    ("IVF4000000,Flat", "store.max_ivf_lists"), ("IMI2x10,Flat", "store.max_ivf_lists"),
    ("HNSW1000", "store.max_graph_degree"), ("PQ16x12", "store.max_pq_bits"),
])
def test_limits_refuse_before_faiss_allocates(factory, setting):
    with pytest.raises(InvalidArgument, match=setting):
        fc.check_factory(384, factory, StoreSettings())


@pytest.mark.parametrize("factory", sorted(fc.TRUSTED_FACTORIES))
def test_the_factories_that_skip_the_probe_pass_it(factory):
    assert fc._probe_in_child(384, factory, fc.PROBE_TIMEOUT_S) == (None, True)


def test_an_abort_in_faiss_is_a_verdict_not_a_crash():
    verdict, cacheable = fc._probe_in_child(16, "HNSW0", fc.PROBE_TIMEOUT_S)
    assert cacheable and "FAISS crashed the process (SIGABRT)" in verdict and "adding 8 vectors" in verdict
    assert os.getpid()  # still here


def test_a_probe_that_runs_too_long_is_refused_but_not_remembered():
    verdict, cacheable = fc._probe_in_child(64, "IVF4096,Flat", timeout=0.05)
    assert "did not finish within" in verdict and not cacheable


def test_verdicts_are_cached_per_dim_and_factory(monkeypatch):
    calls = []
    monkeypatch.setattr(fc, "_verdicts", {})
    monkeypatch.setattr(fc, "_probe_in_child", lambda d, f, t: calls.append((d, f)) or (None, True))
    assert fc.factory_problem(8, "HNSW8") is None and fc.factory_problem(8, "HNSW8") is None
    assert fc.factory_problem(16, "HNSW8") is None and fc.factory_problem(8, "Flat") is None
    assert calls == [(8, "HNSW8"), (16, "HNSW8")]
