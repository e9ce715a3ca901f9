"""Auth, TLS and graceful shutdown, each on a server of its own."""
import subprocess
import threading
import time

import grpc
import pytest

import memlm
from memlm.errors import Unauthenticated
from memlm.services.process import ServerProcess

STORY = "Once upon a time, in a land far away, there lived a dragon who"  # the model continues this at length
pytestmark = pytest.mark.server


def test_api_key_auth(tmp_path, bundled_model_dir):
    server = ServerProcess(tmp_path / "d", args=("--api-key", "s3cret"))
    try:
        with memlm.Client(server.address, timeout=30) as anonymous:
            with pytest.raises(Unauthenticated, match="authorization"):
                anonymous.list_collections()
        with memlm.Client(server.address, api_key="wrong", timeout=30) as wrong:
            with pytest.raises(Unauthenticated):
                wrong.list_collections()
            with pytest.raises(Unauthenticated):
                list(wrong.generate("hi", memory="none", max_new_tokens=1))
        with memlm.Client(server.address, api_key="s3cret", timeout=60) as client:
            client.create_collection("private")
            assert [c.name for c in client.list_collections()] == ["private"]
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(server.address) as channel:  # health stays open for probes
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        assert server.terminate() == 0


def test_tls(tmp_path, bundled_model_dir):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    server = ServerProcess(tmp_path / "d", env={"MEMLM_SERVER__TLS_CERT": str(cert), "MEMLM_SERVER__TLS_KEY": str(key)})
    try:
        assert "grpcs://" in server.output
        with memlm.Client(server.address, root_certificates=cert.read_bytes(), timeout=30) as client:
            assert client.list_collections() == []
        with memlm.Client(server.address, timeout=5) as plain:
            with pytest.raises(memlm.errors.MemlmError):
                plain.list_collections()
    finally:
        assert server.terminate() == 0


def test_sigterm_drains_in_flight_generation(tmp_path, bundled_model_dir):
    server = ServerProcess(tmp_path / "d")
    result: dict = {}
    with memlm.Client(server.address, timeout=120) as client:
        client.create_collection("c")
        client.ingest([{"id": "a", "text": "kept across the restart"}], collection="c")
        stream = client.generate(STORY, memory="none", max_new_tokens=24)
        first = next(iter(stream))

        def finish():
            result["text"] = first + "".join(stream)
            result["done"] = stream.result

        t = threading.Thread(target=finish)
        t.start()
        time.sleep(0.2)
        code = server.terminate()
        t.join(30)
    assert code == 0
    assert result["done"].completion_tokens >= 1 and result["text"] == result["done"].text
    assert "stopped cleanly" in server.output
    server = ServerProcess(tmp_path / "d")
    try:
        with memlm.Client(server.address, timeout=60) as client:
            assert [d.id for d in client.get(["a"], collection="c")] == ["a"]
    finally:
        assert server.terminate() == 0
