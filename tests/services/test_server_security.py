"""One server started the way the hardening guide says (`--api-key-file`, `--config`,
`--metrics-port`): duplicate credentials, /metrics access, private file modes, the CLI flags."""
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

import memlm
from memlm.errors import Unauthenticated
from memlm.services.process import ServerProcess, free_port


pytestmark = pytest.mark.server
KEY = "k3y-from-a-file"
ROOT = Path(__file__).resolve().parents[2]



@pytest.fixture(scope="module")
def secured(tmp_path_factory, bundled_model_dir):
    tmp = tmp_path_factory.mktemp("secured")
    key_file = tmp / "api-key"
    key_file.write_text(KEY + "\n")
    config = tmp / "memlm.toml"
    config.write_text("[store]\nmax_k = 7\nsnapshot_every_ops = 1\n")
    metrics_port = free_port()
    proc = ServerProcess(
        tmp / "data",
        args=("--api-key-file", str(key_file), "--config", str(config), "--metrics-port", str(metrics_port)),
    )
    proc.metrics_port = metrics_port
    yield proc
    assert proc.terminate() == 0, proc.output


def test_api_key_from_a_file_and_config_file(secured):
    with memlm.Client(secured.address, api_key=KEY, timeout=60) as client:
        client.create_collection("cfg")
        with pytest.raises(memlm.errors.InvalidArgument, match=r"\[1, 7\]"):  # max_k from --config
            client.search("anything", collection="cfg", k=8)
    with memlm.Client(secured.address, api_key="wrong", timeout=30) as wrong:
        with pytest.raises(Unauthenticated):
            wrong.list_collections()


def test_two_authorization_headers_are_refused(secured):
    with grpc.insecure_channel(secured.address) as channel:
        stub = memlm.v1.memlm_pb2_grpc.MemoryStub(channel)
        request = memlm.v1.memlm_pb2.ListCollectionsRequest()
        for metadata in (
            (("authorization", "Bearer wrong"), ("authorization", f"Bearer {KEY}")),
            (("authorization", f"Bearer {KEY}"), ("authorization", f"Bearer {KEY}")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.ListCollections(request, metadata=metadata, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "exactly one" in err.value.details()
        assert stub.ListCollections(request, metadata=(("authorization", f"Bearer {KEY}"),), timeout=30) is not None


def _get(url: str, token: str = ""):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_metrics_only_on_its_path_and_behind_the_key(secured):
    base = f"http://127.0.0.1:{secured.metrics_port}"
    assert _get(f"{base}/metrics")[0] == 401
    assert _get(f"{base}/metrics", "wrong")[0] == 401
    assert _get(f"{base}/anything", KEY)[0] == 404
    assert _get(f"{base}/", KEY)[0] == 404
    status, body = _get(f"{base}/metrics", KEY)
    assert status == 200 and "memlm_rpc_calls_total" in body


def test_data_files_are_private(secured):
    with memlm.Client(secured.address, api_key=KEY, timeout=300) as client:
        client.create_collection("private", kv_memory=True)
        client.ingest([{"id": "a", "text": "The vault code is 4417. " * 20}], collection="private")
        deadline = time.monotonic() + 240  # Ingest answers after LMDB; the KV memory is built after it
        while client.describe_collection("private").memory_lag.get("knn", 1) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.describe_collection("private").memory_lag == {"knn": 0}
    data = secured.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    seen = {"files": 0, "index": 0, "kv": 0}
    for root, dirs, files in os.walk(data):
        for d in dirs:
            mode = stat.S_IMODE(os.stat(Path(root) / d).st_mode)
            assert mode & 0o077 == 0, f"{Path(root) / d} has mode {mode:o}"
        for f in files:
            path = Path(root) / f
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o077 == 0 and mode & 0o111 == 0, f"{path} has mode {mode:o}"
            seen["files"] += 1
            seen["index"] += path.suffix == ".faiss"
            seen["kv"] += "kv" in str(path.relative_to(data))
    assert seen["files"] >= 4 and seen["index"] >= 1 and seen["kv"] >= 1, seen


def test_serve_prints_its_ready_line_once_without_faiss_noise(secured):
    assert len([line for line in secured.lines if "serving on" in line]) == 1, secured.output
    assert "AVX512" not in secured.output


def test_version_and_serve_help():
    version = subprocess.run([sys.executable, "-m", "memlm.cli", "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and version.stdout.strip() == f"memlm {memlm.__version__}"
    help_text = subprocess.run(
        [sys.executable, "-m", "memlm.cli", "serve", "--help"], capture_output=True, text=True, timeout=60,
        env={**os.environ, "COLUMNS": "200"},
    ).stdout
    for flag in ("--api-key-file", "MEMLM_SERVER__API_KEY", "--config", "--metrics-port"):
        assert flag in help_text, help_text


def test_license_is_apache_2():
    import tomllib

    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"
