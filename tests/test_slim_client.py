"""`pip install memlm` is the client: its import paths, its CLI commands and the LangChain retriever
work without torch, transformers, sentence-transformers, faiss, lmdb or triton, and `memlm serve`
says in one line what to install. Checked three ways: the package's declared dependencies, a
subprocess whose imports of the server-only packages fail, and (when the package index can be
reached) a fresh virtual environment with only the client dependencies, against a real server.
"""
import json
import os
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_ONLY = ("torch", "transformers", "sentence_transformers", "faiss", "lmdb", "triton")
CLIENT_MODULES = (
    "memlm", "memlm.client", "memlm.async_client", "memlm.wire", "memlm.engine", "memlm.index.types", "memlm.index.filters",
    "memlm.errors", "memlm.integrations.langchain", "memlm.integrations.llama_index", "memlm.cli", "memlm.file_documents",
)
# Installed in the process before anything else: every import of a server-only package fails.
BLOCKER = textwrap.dedent(f"""
    import importlib.abc, sys
    class _ServerOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {SERVER_ONLY!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: a client-only install)", name=name)
    sys.meta_path.insert(0, _ServerOnly())
""")


def run_blocked(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def cli_blocked(*args: str) -> subprocess.CompletedProcess:
    return run_blocked(f"import runpy; sys.argv = ['memlm', *{list(args)!r}]; runpy.run_module('memlm.cli', run_name='__main__')")


def test_declared_dependencies_split_client_and_server(tmp_path):
    """The wheel's metadata, as pip reads it: the core is the client; the server extra holds the
    model and index stack; the test extra pulls the server extra (scripts/setup.sh installs it)."""
    subprocess.run(
        [sys.executable, "-c", f"from setuptools import build_meta; build_meta.prepare_metadata_for_build_wheel({str(tmp_path)!r})"],
        cwd=ROOT, check=True, capture_output=True,
    )
    (metadata,) = tmp_path.glob("*.dist-info/METADATA")
    requires = [line.split(":", 1)[1].strip() for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist:")]

    def names(extra=None):
        picked = [r for r in requires if (f'extra == "{extra}"' in r if extra else "extra ==" not in r)]
        return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in picked}

    core = names()
    assert core <= {"numpy", "grpcio", "protobuf", "typer", "rich", "tqdm"}, core
    assert {"grpcio", "protobuf", "numpy"} <= core
    assert {"torch", "transformers", "sentence-transformers", "faiss-cpu", "lmdb", "pydantic-settings"} <= names("server")
    assert any(r.startswith("memlm[") and "server" in r.split("]")[0] for r in requires if 'extra == "test"' in r)


def test_client_import_paths_avoid_server_only_packages():
    proc = run_blocked(f"""
        for name in {CLIENT_MODULES!r}:
            __import__(name)
        import memlm
        memlm.Client  # the lazy attribute
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {SERVER_ONLY!r})
        assert not loaded, loaded
        print("imported", len({CLIENT_MODULES!r}))
    """)
    assert proc.returncode == 0, proc.stderr
    assert f"imported {len(CLIENT_MODULES)}" in proc.stdout


def test_serve_without_server_dependencies_says_what_to_install(tmp_path):
    proc = cli_blocked("serve", "--data-dir", str(tmp_path / "d"), "--port", "0")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "pip install 'memlm[server]'" in lines[0] and "torch" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "d").exists()


@pytest.mark.server
def test_client_commands_and_retriever_against_a_server_without_server_packages(server, tmp_path):
    (tmp_path / "kites.txt").write_text("Kites fly because the wind pushes against their tilted surface.\n")
    addr = ("--address", server.address)
    proc = cli_blocked("ingest", str(tmp_path / "kites.txt"), "-c", "slim", "--json", *addr)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["created"] == 1
    proc = cli_blocked("search", "wind", "-c", "slim", "--json", *addr)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["doc_id"] == "kites.txt"
    proc = run_blocked(f"""
        import memlm
        from memlm.integrations.langchain import MemlmRetriever
        with memlm.Client({server.address!r}, timeout=60) as client:
            print(MemlmRetriever(client=client, collection="slim", k=1).invoke("Why do kites fly?")[0].id)
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["kites.txt"]


def _pip(python: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_REQUIRE_VIRTUALENV", "VIRTUAL_ENV"))}
    return subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.server
def test_fresh_client_only_venv(server, tmp_path):
    """`pip install --no-deps .` plus the client's own dependencies and langchain-core, in a venv
    of its own: a few MB, no torch, and ingest, search and the retriever work against the server."""
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    built = _pip(python, "install", "-q", "--no-deps", str(ROOT))
    deps = _pip(python, "install", "-q", "grpcio", "protobuf", "numpy", "typer", "rich", "tqdm", "langchain-core") if built.returncode == 0 else built
    if deps.returncode != 0:
        text = built.stderr + deps.stderr
        if any(s in text for s in ("No matching distribution", "Could not find a version", "NewConnectionError", "Network is unreachable", "Temporary failure in name resolution")):
            pytest.skip(f"offline: pip could not fetch the client dependencies ({text.strip().splitlines()[-1]})")
        pytest.fail(f"pip install failed:\n{text}")
    listed = {p["name"].lower() for p in json.loads(_pip(python, "list", "--format", "json").stdout)}
    assert not listed & {"torch", "transformers", "sentence-transformers", "faiss-cpu", "lmdb", "triton"}, listed

    memlm_cli = env_dir / "bin" / "memlm"
    # cwd: not the repository root, whose memlm/ folder would shadow the installed package
    run = {"capture_output": True, "text": True, "timeout": 120, "cwd": tmp_path}
    serve = subprocess.run([str(memlm_cli), "serve", "--data-dir", str(tmp_path / "d")], **run)
    assert serve.returncode == 1 and "pip install 'memlm[server]'" in serve.stderr and "Traceback" not in serve.stderr

    (tmp_path / "owl.txt").write_text("Barn owls find mice in the dark by sound alone.\n")
    ingest = subprocess.run([str(memlm_cli), "ingest", str(tmp_path / "owl.txt"), "-c", "fresh", "--address", server.address], **run)
    assert ingest.returncode == 0 and "1 documents created" in ingest.stdout, ingest.stderr
    found = subprocess.run([str(python), "-c", textwrap.dedent(f"""
        import asyncio, memlm
        from memlm.integrations.langchain import MemlmRetriever
        client = memlm.Client({server.address!r}, timeout=60)
        retriever = MemlmRetriever(client=client, collection="fresh", k=1)
        print(retriever.invoke("How do owls hunt?")[0].id, asyncio.run(retriever.ainvoke("owls"))[0].id)
    """)], **run)
    assert found.returncode == 0, found.stderr
    assert found.stdout.split() == ["owl.txt", "owl.txt"]
    site = next((env_dir / "lib").glob("python3*/site-packages"))
    memlm_bytes = sum(p.stat().st_size for p in (site / "memlm").rglob("*") if p.is_file()) if (site / "memlm").exists() else 0
    total = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    print(f"fresh client venv: site-packages {total / 1e6:.1f} MB, memlm itself {memlm_bytes / 1e6:.2f} MB")
