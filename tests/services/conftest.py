"""The session `server` (one real server for every test that needs no server of its own) is in
tests/conftest.py; tests/test_slim_client.py uses it too."""
import subprocess

import pytest


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


def make_self_signed(folder, name: str = "server"):
    """(key, cert): a fresh self-signed localhost certificate (openssl) in folder."""
    key, cert = folder / f"{name}-key.pem", folder / f"{name}-cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    return key, cert


@pytest.fixture()
def self_signed(tmp_path):
    """make(name) -> (key, cert): a fresh self-signed localhost certificate in tmp_path."""
    return lambda name="server": make_self_signed(tmp_path, name)


@pytest.fixture(scope="session")
def tls_server(tmp_path_factory, bundled_model_dir):
    """(server, cert): one server serving TLS on a self-signed certificate, for the session."""
    from memlm.services.process import ServerProcess

    folder = tmp_path_factory.mktemp("tls")
    key, cert = make_self_signed(folder)
    proc = ServerProcess(folder / "d", env={"MEMLM_SERVER__TLS_CERT": str(cert), "MEMLM_SERVER__TLS_KEY": str(key)})
    yield proc, cert
    assert proc.terminate() == 0, proc.output
