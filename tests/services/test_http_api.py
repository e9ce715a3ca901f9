"""The OpenAI-compatible HTTP API, driven by the real `openai` client against one real server
(`memlm serve --http-port 0` with an API key) for the module; gRPC calls to the same server give
the figures the HTTP replies must equal. The last test stops the server with SIGTERM mid-stream."""
import base64
import http.client
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import openai
import pytest

import memlm
from memlm.services.process import ServerProcess

pytestmark = [pytest.mark.server, pytest.mark.model]
KEY = "http-k3y"
MODEL = "SmolLM2-135M-Instruct"
STORY = "Once upon a time, in a land far away, there lived a dragon who"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
FACTS = [
    {"id": "passkey", "text": "The pass key for the vault is 48213. Remember it.", "metadata": {"kind": "secret"}},
    {"id": "weather", "text": "It rained all week in the valley and the rivers rose.", "metadata": {"kind": "news"}},
    {"id": "recipe", "text": "Mix two cups of flour with one cup of water to make dough.", "metadata": {"kind": "food"}},
]
ENV = {
    "MEMLM_SERVER__API_KEY": KEY,
    "MEMLM_MODEL__MAX_CONTEXT_TOKENS": "1024",
    "MEMLM_MODEL__DEFAULT_MAX_NEW_TOKENS": "16",
}


@pytest.fixture(scope="module")
def api(tmp_path_factory, bundled_model_dir):
    proc = ServerProcess(tmp_path_factory.mktemp("http-api"), env=ENV, args=("--http-port", "0"))
    assert proc.http_url.startswith("http://127.0.0.1:"), proc.output
    with memlm.Client(proc.address, api_key=KEY, timeout=120) as grpc_client:
        grpc_client.create_collection("facts")
        grpc_client.ingest(FACTS, collection="facts")
        proc.grpc = grpc_client
        yield proc
    if proc.proc.poll() is None:
        assert proc.terminate() == 0, proc.output


@pytest.fixture(scope="module")
def oai(api):
    with openai.OpenAI(base_url=f"{api.http_url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
        yield client


def _get(url: str, token: str = ""):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read().decode(), resp.headers  # case-insensitive lookups
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), exc.headers


def _counter(api, route: str, status: str) -> float:
    _, body, _ = _get(f"{api.http_url}/metrics", KEY)
    prefix = f'memlm_http_requests_total{{route="{route}",status="{status}"}} '
    return sum(float(line[len(prefix):]) for line in body.splitlines() if line.startswith(prefix))


def test_chat_and_completions_equal_grpc_generate_with_its_usage(api, oai):
    chat = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, temperature=0)
    grpc_chat = api.grpc.generate(messages=QUESTION, memory="none", max_new_tokens=8, temperature=0)
    grpc_chat_text = "".join(grpc_chat)
    assert chat.object == "chat.completion" and chat.model == MODEL and chat.id.startswith("chatcmpl-")
    assert chat.choices[0].message.role == "assistant" and chat.choices[0].message.content
    assert chat.choices[0].message.content == grpc_chat_text
    done = grpc_chat.result
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (done.prompt_tokens, done.completion_tokens)
    assert chat.usage.total_tokens == done.prompt_tokens + done.completion_tokens
    assert chat.choices[0].finish_reason == {"length": "length", "eos": "stop"}[done.finish_reason]

    text = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6)
    grpc_text = api.grpc.generate("The capital of France is", memory="none", max_new_tokens=6)
    assert text.object == "text_completion" and text.choices[0].text == "".join(grpc_text)
    assert (text.usage.prompt_tokens, text.usage.completion_tokens) == (
        grpc_text.result.prompt_tokens, grpc_text.result.completion_tokens)
    assert text.memlm["citations"] == [] and text.memlm["timings"]["total_ms"] > 0


def test_streams_are_openai_chunks_ending_with_usage_and_done(api, oai):
    whole = oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=8, stream=True,
                                              stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # token by token
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finish[0].memlm["citations"] == [] and "time_to_first_token_ms" in finish[0].memlm["timings"]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])

    plain = list(oai.completions.create(model=MODEL, prompt=STORY, max_tokens=5, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in plain) == oai.completions.create(
        model=MODEL, prompt=STORY, max_tokens=5).choices[0].text

    # On the wire: server-sent events, `data: {...}` chunks, then `data: [DONE]`.
    conn = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": MODEL, "prompt": STORY, "max_tokens": 3, "stream": True}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    events = [e for e in resp.read().decode().split("\n\n") if e]
    conn.close()
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: {") for e in events[:-1])
    assert json.loads(events[0][len("data: "):])["object"] == "text_completion"


def test_stop_sequences_and_max_tokens(oai):
    stopped = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, stop=".")
    assert stopped.choices[0].finish_reason == "stop" and "Paris" in stopped.choices[0].text
    assert "." not in stopped.choices[0].text
    listed = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=12, stop=["Par", "x"])
    assert listed.choices[0].finish_reason == "stop" and "Par" not in listed.choices[0].text
    short = oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a long story."}],
                                        max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_seed_makes_sampling_repeatable(oai):
    def sample(seed: int) -> str:
        return oai.completions.create(model=MODEL, prompt=STORY, max_tokens=12, temperature=1.0, top_p=0.95,
                                      seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(s) != first for s in (8, 9)), "different seeds should sample different text"


def test_rag_memory_through_the_extension_field_returns_citations(oai):
    memory = {"memlm": {"collection": "facts", "memory": "rag", "k": 2}}
    question = [{"role": "user", "content": "What is the pass key for the vault?"}]
    reply = oai.chat.completions.create(model=MODEL, messages=question, max_tokens=16, extra_body=memory)
    assert "48213" in reply.choices[0].message.content
    cites = reply.memlm["citations"]
    assert cites[0]["doc_id"] == "passkey" and len(cites) <= 2
    assert {"doc_id", "chunk_id", "score", "text", "metadata"} <= set(cites[0])
    assert cites[0]["metadata"] == {"kind": "secret"} and "48213" in cites[0]["text"]
    assert reply.memlm["timings"]["retrieval_ms"] > 0

    chunks = list(oai.chat.completions.create(model=MODEL, messages=question, max_tokens=16, stream=True,
                                              extra_body=memory))
    final = [c for c in chunks if c.choices and c.choices[0].finish_reason][0]
    assert [c["doc_id"] for c in final.memlm["citations"]] == [c["doc_id"] for c in cites]

    filtered = oai.completions.create(model=MODEL, prompt="What happened?", max_tokens=2, extra_body={
        "memlm": {"collection": "facts", "memory": "rag", "k": 3, "filter": {"kind": "news"}, "search_mode": "dense"}})
    assert [c["doc_id"] for c in filtered.memlm["citations"]] == ["weather"]


def _error(call):
    with pytest.raises(openai.APIStatusError) as info:
        call()
    return info.value


def test_bad_requests_get_openai_errors_naming_the_problem(api, oai):
    chat = lambda **kw: oai.chat.completions.create(**{"model": MODEL, "messages": QUESTION, "max_tokens": 2, **kw})
    cases = [  # (call, error class, status, param, words the message must hold)
        (lambda: chat(n=2), openai.BadRequestError, 400, "n", "n=2"),
        (lambda: chat(temperature=-1), openai.BadRequestError, 400, "temperature", "temperature=-1"),
        (lambda: chat(extra_body={"memlm": {"collection": "facts", "memory": "bogus"}}), openai.BadRequestError, 400,
         None, "unknown memory mode 'bogus'"),
        (lambda: chat(extra_body={"memlm": {"collection": "no-such", "memory": "rag"}}), openai.NotFoundError, 404,
         None, "'no-such'"),
        (lambda: chat(extra_body={"memlm": {"collection": "facts"}}), openai.BadRequestError, 400, "memlm.memory",
         "memlm.memory"),
        (lambda: chat(extra_body={"memlm": {"collection": "facts", "memory": "knn"}}), openai.BadRequestError, 400,
         None, "no knn memory"),  # FAILED_PRECONDITION: 400
        (lambda: chat(tools=[{"type": "function", "function": {"name": "f"}}]), openai.BadRequestError, 400, "tools",
         "tools"),
        (lambda: chat(logprobs=True), openai.BadRequestError, 400, "logprobs", "logprobs"),
        (lambda: chat(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
         openai.BadRequestError, 400, "response_format", "json_schema"),
        (lambda: chat(extra_body={"max_token": 5}), openai.BadRequestError, 400, "max_token", "unknown field"),
        (lambda: chat(max_tokens=100000), openai.BadRequestError, 400, "max_tokens", "max_tokens=100000"),
        (lambda: chat(model="gpt-4o"), openai.NotFoundError, 404, "model", MODEL),
        (lambda: chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]), openai.BadRequestError, 400,
         "messages[0].role", "tool"),
        (lambda: oai.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=2), openai.BadRequestError, 400,
         "prompt", "2 prompts"),
        (lambda: oai.embeddings.create(model=MODEL, input="x"), openai.NotFoundError, 404, "model", "all-MiniLM-L6-v2"),
    ]
    for call, cls, status, param, words in cases:
        err = _error(call)
        assert isinstance(err, cls) and err.status_code == status, (words, err)
        assert set(err.body) == {"message", "type", "param", "code"}, err.body
        assert words in err.body["message"] and err.body["param"] == param, err.body
    # A body over server.max_message_bytes is refused from its Content-Length, before it is read.
    conn = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=30)
    conn.putrequest("POST", "/v1/completions")
    for name, value in (("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"),
                        ("Content-Length", str(65 * 2**20))):
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and "server.max_message_bytes" in json.loads(resp.read())["error"]["message"]
    conn.close()
    # A body that is not JSON at all, and an unknown route: the same error shape.
    conn = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=30)
    for method, path, body, status in (("POST", "/v1/chat/completions", "{not json", 400), ("GET", "/v1/nothing", None, 404)):
        conn.request(method, path, body, {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == status and set(json.loads(resp.read())["error"]) == {"message", "type", "param", "code"}
    conn.close()


def test_api_key_is_required_and_health_is_open(api):
    with openai.OpenAI(base_url=f"{api.http_url}/v1", api_key="wrong", max_retries=0) as bad:
        for call in (bad.models.list, lambda: bad.chat.completions.create(model=MODEL, messages=QUESTION)):
            err = _error(call)
            assert isinstance(err, openai.AuthenticationError) and err.status_code == 401
            assert "API key" in err.body["message"] and err.body["type"] == "authentication_error"
    status, body, headers = _get(f"{api.http_url}/v1/models")  # no Authorization header at all
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthenticated"
    assert headers["www-authenticate"].startswith("Bearer")
    conn = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=30)
    conn.putrequest("GET", "/v1/models")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Authorization", f"Bearer {KEY}")  # two: which would a proxy have checked?
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 401 and "exactly one" in json.loads(resp.read())["error"]["message"]
    conn.close()
    assert _get(f"{api.http_url}/health")[:2] == (200, '{"status":"SERVING"}')
    assert _get(f"{api.http_url}/metrics")[0] == 401
    status, body, headers = _get(f"{api.http_url}/metrics", KEY)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for name in ("memlm_http_requests_total", "memlm_rpc_calls_total", "memlm_collection_documents"):
        assert name in body, name


def test_models_lists_the_served_model_and_its_memory_modes(api, oai):
    models = {m.id: m for m in oai.models.list().data}
    info = api.grpc.model_info()
    served = models[info.name]
    assert served.owned_by == "memlm" and served.memlm["kind"] == "generation"
    assert {"none", "rag", "knn"} <= set(served.memlm["memory_modes"])
    assert served.memlm["context_length"] == info.context_length
    assert models["all-MiniLM-L6-v2"].memlm == {"kind": "embedding", "dimensions": 384}
    assert oai.models.retrieve(info.name).id == info.name


def test_embeddings_are_the_store_embedder_vectors(api, oai):
    texts = [FACTS[0]["text"], FACTS[2]["text"]]
    floats = oai.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and floats.usage.prompt_tokens > 0
    got = np.array([d.embedding for d in floats.data], dtype=np.float32)  # (2, 384)
    assert got.shape == (2, 384) and np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    # The store holds each of these documents as one chunk, embedded by its embedder at ingest: searching with
    # the API's vector finds that chunk at cosine 1 (unit rows: |a - b| = sqrt(2 - 2 cos) < 0.005).
    for text, vector in zip(texts, got):
        hit = api.grpc.search(vector, collection="facts", k=1)[0]
        assert hit.text == text and hit.score > 1 - 1e-5, (hit.text, hit.score)
    # base64 (the openai client's default) carries the same float32 bits.
    conn = http.client.HTTPConnection("127.0.0.1", api.http_port, timeout=60)
    conn.request("POST", "/v1/embeddings", json.dumps({"input": texts[0], "model": "all-MiniLM-L6-v2",
                                                       "encoding_format": "base64"}),
                 {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    raw = json.loads(conn.getresponse().read())["data"][0]["embedding"]
    conn.close()
    assert np.array_equal(np.frombuffer(base64.b64decode(raw), dtype="<f4"), got[0])
    single = oai.embeddings.create(model="all-MiniLM-L6-v2", input=texts[0])  # client default: base64, decoded
    assert np.array_equal(np.asarray(single.data[0].embedding, dtype=np.float32), got[0])


def test_closing_a_stream_cancels_its_generation(api, oai):
    before = _counter(api, "/v1/completions", "499")
    stream = oai.completions.create(model=MODEL, prompt=STORY, max_tokens=1000, stream=True)
    pieces = [next(iter(stream)).choices[0].text for _ in range(3)]
    stream.close()
    assert pieces
    deadline = time.monotonic() + 10  # 1,000 tokens would take a minute: the 499 must come well before
    while _counter(api, "/v1/completions", "499") <= before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _counter(api, "/v1/completions", "499") == before + 1
    # A non-streaming request whose client gives up is cancelled too.
    with openai.OpenAI(base_url=f"{api.http_url}/v1", api_key=KEY, max_retries=0, timeout=1.5) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=MODEL, prompt=STORY, max_tokens=1000)
    deadline = time.monotonic() + 10
    while _counter(api, "/v1/completions", "499") <= before + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _counter(api, "/v1/completions", "499") == before + 2
    started = time.monotonic()
    after = oai.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4)
    assert after.choices[0].text and time.monotonic() - started < 20


def test_http_port_in_use_is_refused_before_loading_the_model(api, tmp_path):
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "memlm.cli", "serve", "--data-dir", str(tmp_path / "b"), "--port", "0",
         "--http-port", str(api.http_port)],
        capture_output=True, text=True, timeout=120,
    )
    lines = [line for line in (second.stdout + second.stderr).splitlines() if line.strip()]
    assert second.returncode == 1 and len(lines) == 1, lines
    assert f"127.0.0.1:{api.http_port}" in lines[0] and "in use" in lines[0] and "--http-port" in lines[0], lines
    assert not (tmp_path / "b" / "store.lmdb").exists() and time.monotonic() - started < 8


def test_sigterm_drains_http_streams_and_answers_503_meanwhile(api, oai):
    """Last in the module: it stops the module's server."""
    # Long enough to still be running once the signal is handled, however fast decoding gets
    # (24 tokens were over within the 0.3 s this test used to wait).
    stream = oai.completions.create(model=MODEL, prompt=STORY, max_tokens=96, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    it = iter(stream)
    pieces = [next(it).choices[0].text]
    result: dict = {}

    def finish():
        chunks = list(it)
        result["text"] = "".join(pieces + [c.choices[0].text for c in chunks if c.choices])
        result["usage"] = chunks[-1].usage

    t = threading.Thread(target=finish)
    t.start()
    api.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while (status := _get(f"{api.http_url}/health")[0]) == 200 and time.monotonic() < deadline:
        time.sleep(0.01)  # until the server has handled the signal
    status, body, _ = _get(f"{api.http_url}/health")
    assert (status, json.loads(body)) == (503, {"status": "NOT_SERVING"})
    assert t.is_alive(), "the stream finished before the drain could be seen"
    err = _error(lambda: oai.models.list())
    assert err.status_code == 503 and "shutting down" in err.body["message"]
    t.join(60)
    assert result["usage"].completion_tokens == 96 and result["text"]
    assert api.proc.wait(60) == 0, api.output
    assert "stopped cleanly" in api.output


def test_https_with_the_grpc_tls_files_and_generations_past_the_grace_are_stopped(tmp_path, self_signed):
    """Own server: TLS files and a 1 s grace. The HTTP API speaks HTTPS with the gRPC port's
    certificate; on SIGTERM a stream still running when the grace ends gets an error event (the
    openai client raises it) rather than a cut connection, and the process exits cleanly."""
    import ssl

    key, cert = self_signed()
    server = ServerProcess(tmp_path / "d", env={"MEMLM_SERVER__TLS_CERT": str(cert), "MEMLM_SERVER__TLS_KEY": str(key),
                                                "MEMLM_SERVER__GRACE_SECONDS": "1"}, args=("--http-port", "0"))
    try:
        assert server.http_url.startswith("https://127.0.0.1:"), server.output
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"{server.http_url}/health", context=context, timeout=30) as resp:
            assert resp.status == 200
        with pytest.raises(OSError):  # plain HTTP on the TLS port
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/health", timeout=10).read()
        with openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="none", max_retries=0, timeout=60,
                           http_client=openai.DefaultHttpxClient(verify=context)) as client:
            stream = client.completions.create(model=MODEL, prompt=STORY, max_tokens=1000, stream=True)
            it = iter(stream)
            assert next(it).choices
            server.proc.send_signal(signal.SIGTERM)
            started = time.monotonic()
            with pytest.raises(openai.APIError, match="grace period is over"):
                for _ in it:
                    pass
            assert time.monotonic() - started < 10  # 1 s grace, then stopped at the next token
        assert server.proc.wait(30) == 0, server.output
    finally:
        server.kill()
