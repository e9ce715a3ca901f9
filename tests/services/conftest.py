import socket
import subprocess

import pytest

from memlm.services.process import ServerProcess

# Small limits so the limit paths are cheap to reach; a short context keeps the over-long-prompt
# case fast on 2 cores.
SERVER_ENV = {
    "MEMLM_STORE__MAX_DOCUMENT_BYTES": "20000",
    "MEMLM_STORE__MAX_K": "50",
    "MEMLM_MODEL__MAX_CONTEXT_TOKENS": "1024",
    "MEMLM_MODEL__DEFAULT_MAX_NEW_TOKENS": "16",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory, bundled_model_dir):
    env = {**SERVER_ENV, "MEMLM_SERVER__METRICS_PORT": str(free_port())}
    proc = ServerProcess(tmp_path_factory.mktemp("server-data"), env=env)
    proc.metrics_port = int(env["MEMLM_SERVER__METRICS_PORT"])
    yield proc
    code = proc.terminate()
    assert code == 0, f"server did not shut down cleanly (exit {code}):\n{proc.output}"


@pytest.fixture()
def client(server):
    import memlm

    with memlm.Client(server.address, timeout=120) as c:
        yield c


@pytest.fixture()
def collection(client, request):
    """A fresh collection named after the test."""
    name = request.node.name.replace("[", "-").replace("]", "").replace("/", "-")[:60]
    client.create_collection(name)
    yield name
    client.drop_collection(name)


@pytest.fixture()
def self_signed(tmp_path):
    """make(name) -> (key, cert): a fresh self-signed localhost certificate (openssl) in tmp_path."""

    def make(name: str = "server"):
        key, cert = tmp_path / f"{name}-key.pem", tmp_path / f"{name}-cert.pem"
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
            check=True, capture_output=True,
        )
        return key, cert

    return make
