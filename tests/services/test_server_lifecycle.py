"""Auth and graceful shutdown, each on a server of its own; TLS on the session's TLS server; a
second server on the session server's port is refused."""
import os
import subprocess
import sys
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


def test_tls(tls_server):
    server, cert = tls_server
    assert "grpcs://" in server.output
    with memlm.Client(server.address, root_certificates=cert.read_bytes(), timeout=30) as client:
        assert client.list_collections() == []
    with memlm.Client(server.address, timeout=5) as plain:
        with pytest.raises(memlm.errors.MemlmError):
            plain.list_collections()


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


def _words(i: int, n: int = 60) -> str:
    return " ".join(f"w{(i * 7 + j) % 997}" for j in range(n))


def _refused_before_commit(outcome: dict) -> bool:
    """Whether the call was answered UNAVAILABLE "nothing stored" (else it must have succeeded)."""
    if "error" not in outcome:
        return False
    assert isinstance(outcome["error"], memlm.errors.Unavailable), outcome["error"]
    assert "nothing from this call was stored" in str(outcome["error"])
    return True


def test_sigterm_during_long_ingest_acknowledges_what_is_stored(tmp_path, bundled_model_dir):
    """SIGTERM while a 1,500-document Ingest embeds: the call either completes (all stored) or is
    refused UNAVAILABLE before its commit (none stored); the process is gone within grace + a bound;
    during the drain new health Checks see NOT_SERVING and other new calls UNAVAILABLE."""
    grace = 2.0
    env = {"MEMLM_SERVER__GRACE_SECONDS": str(grace)}
    server = ServerProcess(tmp_path / "d", env=env)
    docs = [{"id": f"d{i}", "text": _words(i)} for i in range(1500)]
    outcome: dict = {}
    try:
        took, code = _sigterm_during_ingest(server, docs, outcome, grace)
    finally:
        server.kill()  # a no-op when it exited by itself
    assert code == 0, server.output
    assert took < grace + 5, f"exited {took:.1f} s after SIGTERM with grace {grace} s:\n{server.output[-3000:]}"
    expected = 0 if _refused_before_commit(outcome) else len(docs)
    assert expected == 0 or outcome["report"].created == len(docs)
    server = ServerProcess(tmp_path / "d", env=env)
    try:
        with memlm.Client(server.address, timeout=60) as client:
            assert client.describe_collection("c").documents == expected
    finally:
        assert server.terminate() == 0


def _sigterm_during_ingest(server, docs, outcome, grace):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with memlm.Client(server.address, timeout=300) as client:
        client.create_collection("c")

        def ingest():
            try:
                outcome["report"] = client.ingest(docs, collection="c", batch_size=len(docs))
            except memlm.errors.MemlmError as exc:
                outcome["error"] = exc

        t = threading.Thread(target=ingest)
        t.start()
        time.sleep(1.5)  # the call is in: its documents are being chunked and embedded
        assert "report" not in outcome and "error" not in outcome, "the ingest finished too soon to test"
        sent_at = time.monotonic()
        server.proc.send_signal(subprocess.signal.SIGTERM)
        time.sleep(0.3)
        with grpc.insecure_channel(server.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with memlm.Client(server.address, timeout=5) as late:
            with pytest.raises(memlm.errors.Unavailable, match="shutting down"):
                late.list_collections()
        code = server.proc.wait(60)
        took = time.monotonic() - sent_at
        t.join(30)
    return took, code


def test_sigterm_during_long_delete_acknowledges_what_is_deleted(tmp_path, bundled_model_dir):
    """SIGTERM (grace 0) while one Delete removes 3,000 documents: it either completes (all gone)
    or is refused UNAVAILABLE before its commit (none gone); after a restart the store agrees with
    what the client was told, and the process was gone within the stated bound."""
    n = 3_000
    env = {"MEMLM_SERVER__GRACE_SECONDS": "0", "MEMLM_STORE__MAX_IDS_PER_CALL": str(n)}
    server = ServerProcess(tmp_path / "d", env=env)
    outcome: dict = {}
    try:
        with memlm.Client(server.address, timeout=300) as client:
            client.create_collection("c", chunk_tokens=16)
            client.ingest(({"id": f"d{i}", "text": f"w{i} w{i % 7}"} for i in range(n)), collection="c", batch_size=1000)

            def delete():
                try:
                    outcome["deleted"] = client.delete([f"d{i}" for i in range(n)], collection="c")
                except memlm.errors.MemlmError as exc:
                    outcome["error"] = exc

            t = threading.Thread(target=delete)
            t.start()
            time.sleep(0.02)  # the call is in; the delete itself takes ~0.2 s
            sent_at = time.monotonic()
            server.proc.send_signal(subprocess.signal.SIGTERM)
            code = server.proc.wait(60)
            took = time.monotonic() - sent_at
            t.join(30)
    finally:
        server.kill()
    assert code == 0, server.output
    assert took < 5 + 5, f"exited {took:.1f} s after SIGTERM with grace 0:\n{server.output[-3000:]}"
    expected = n if _refused_before_commit(outcome) else 0  # documents left
    assert expected == n or len(outcome["deleted"]) == n
    server = ServerProcess(tmp_path / "d", env=env)
    try:
        with memlm.Client(server.address, timeout=60) as client:
            info = client.describe_collection("c")
            assert (info.documents, info.index_vectors) == (expected, expected), (outcome, info)
    finally:
        assert server.terminate() == 0


def test_sigterm_during_a_kv_memory_build_stops_it_and_the_next_start_finishes_it(tmp_path, bundled_model_dir):
    """An Ingest into a kv_memory collection is acknowledged after its KV memory is built, which can
    take far longer than the grace period: at SIGTERM the build stops at its next segment (derived
    data), the committed call is answered, the process is gone within grace + the stated bound, and
    the next start builds the rest (the knn answer reads the pass key from the first document)."""
    from test_knn_service import FILLER, QUESTION, haystack  # tests/services is on sys.path

    grace = 6.0
    # Segments of ~512 tokens: the build stops at the end of the one running at SIGTERM (a few
    # seconds of the served q4_1 model's prefill on a loaded 2-core machine).
    env = {"MEMLM_SERVER__GRACE_SECONDS": str(grace), "MEMLM_KNN__BUILD_BATCH_TOKENS": "512"}
    docs = [{"id": "vault", "text": haystack("48213")}] + [
        {"id": f"filler{i}", "text": f"Part {i}. " + FILLER * 24} for i in range(11)
    ]  # ~12k tokens: a KV build of 15 s or more on 2 cores
    server = ServerProcess(tmp_path / "d", env=env)
    outcome: dict = {}
    try:
        with memlm.Client(server.address, timeout=300) as client:
            client.create_collection("kv", kv_memory=True, chunk_tokens=512)  # few chunks: embedding is quick
            client.ingest([{"id": "warm-up", "text": "Loads the embedder and the KV path."}], collection="kv")

            def ingest():
                try:
                    outcome["report"] = client.ingest(docs, collection="kv", batch_size=len(docs))
                except memlm.errors.MemlmError as exc:
                    outcome["error"] = exc

            t = threading.Thread(target=ingest)
            t.start()
            time.sleep(0.5)
            sent_at = time.monotonic()
            server.proc.send_signal(subprocess.signal.SIGTERM)
            code = server.proc.wait(120)
            took = time.monotonic() - sent_at
            t.join(30)
    finally:
        server.kill()
    assert code == 0, server.output
    assert took < grace + 5 + 3, f"exited {took:.1f} s after SIGTERM with grace {grace} s:\n{server.output[-3000:]}"
    expected = 0 if _refused_before_commit(outcome) else len(docs)  # refused: the grace ended while it embedded
    assert expected == 0 or outcome["report"].created == len(docs)
    server = ServerProcess(tmp_path / "d", env=env)
    try:
        with memlm.Client(server.address, timeout=300) as client:
            assert client.describe_collection("kv").documents == 1 + expected
            if expected:
                stream = client.generate(QUESTION, collection="kv", memory="knn", max_new_tokens=8)
                assert "48213" in "".join(stream), server.output[-3000:]
    finally:
        assert server.terminate() == 0


def test_second_server_on_a_port_in_use_is_refused_before_loading_the_model(tmp_path, server):
    """The session server holds the port."""
    port = server.address.rsplit(":", 1)[1]
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "memlm.cli", "serve", "--data-dir", str(tmp_path / "b"), "--port", port],
        capture_output=True, text=True, timeout=120,
    )
    took = time.monotonic() - started
    assert second.returncode != 0
    lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], lines
    assert not (tmp_path / "b" / "store.lmdb").exists()  # refused before opening the store
    assert took < 8, f"took {took:.1f} s: the model was loaded before binding"
    with memlm.Client(server.address, timeout=30) as client:
        assert client.model_info().name  # the first server still serves


@pytest.mark.parametrize("case", ["mismatched", "unreadable"])
def test_bad_tls_files_give_one_clear_line(tmp_path, case, self_signed):
    key_a, cert_a = self_signed("a")
    key = self_signed("b")[0] if case == "mismatched" else tmp_path / "missing-key.pem"
    env = {**os.environ, "MEMLM_SERVER__TLS_CERT": str(cert_a), "MEMLM_SERVER__TLS_KEY": str(key)}
    result = subprocess.run(
        [sys.executable, "-m", "memlm.cli", "serve", "--data-dir", str(tmp_path / "d"), "--port", "0"],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode != 0
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert str(key) in lines[0]
    assert ("does not match" if case == "mismatched" else "cannot read") in lines[0], lines[0]
