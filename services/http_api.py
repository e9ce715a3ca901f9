"""The OpenAI-compatible HTTP API (FastAPI on uvicorn), served beside gRPC in the same process and
event loop, over the same `EngineClient` and store. Thin, as the gRPC servicers: bodies are
translated by services/openai_protocol.py, generation is `EngineClient.generate`.

Routes: POST /v1/chat/completions, POST /v1/completions (both streaming as server-sent events or
not), POST /v1/embeddings, GET /v1/models[/{id}], GET /health, GET /metrics. With
`server.api_key` set every route but /health needs `Authorization: Bearer <key>`.

Life cycle (services/server.py drives it): `HttpListener.bind` binds the port before the model
loads, so a port in use fails at once; `start` serves. Requests are counted in the gRPC server's
`CallGuard`, so one drain covers both protocols: from SIGTERM on, /health answers 503 and new /v1
requests 503 (the listener keeps answering, as gRPC health does, so load balancers see the drain),
admitted requests get the same `grace_seconds`; then `stop` ends the generations still running at
their next token (503, or an error event in a stream), closes the listener and cancels what is
left after RESPONSE_FLUSH_SECONDS. A client that disconnects cancels its generation (the engine iterator is closed),
streaming or not; such a request is counted with status 499 in `memlm_http_requests_total`.
"""
from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
import socket
import time
from concurrent.futures import Executor
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from memlm import modes as registry
from memlm.engine import EngineClient, GenerationRequest, GenerationResult
from memlm.errors import FailedPrecondition, MemlmError, Unauthenticated, Unavailable, bounded
from memlm.index.embedding import EMBEDDERS, embedder_dim
from memlm.index.types import CollectionConfig
from memlm.services import openai_protocol as oa
from memlm.services.auth import bearer_matches
from memlm.services.interceptors import DRAINING_MESSAGE, CallGuard

log = logging.getLogger(__name__)

HTTP_REQUESTS = Counter("memlm_http_requests_total", "HTTP API requests, by route and status (499: the client "
                        "disconnected first)", ["route", "status"])
HTTP_SECONDS = Histogram(
    "memlm_http_request_duration_seconds", "HTTP API request wall time, streams to their last byte, by route", ["route"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
CLIENT_CLOSED = 499  # nginx's "client closed request": the client went away before the reply ended
_OPEN_PATHS = ("/health",)  # answered without a key (load balancers probe it)
_UNCOUNTED_PATHS = ("/health", "/metrics")  # answered during the drain, never waited for (as gRPC health, the metrics port)


# --- the app ----------------------------------------------------------------------------------

def create_app(engine: EngineClient, store, executor: Executor, guard: CallGuard, *, api_key: Optional[str],
               limits: oa.Limits, max_body_bytes: int) -> "HttpApp":
    """The API over `engine` and `store`; `guard` is the gRPC server's (drain and in-flight count)."""
    closing = _Closing()
    app = FastAPI(title="memlm OpenAI-compatible API", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())

    # ---- errors: OpenAI's body {"error": {message, type, param, code}} with a mapped status

    @app.exception_handler(MemlmError)
    async def memlm_error(request: Request, exc: MemlmError) -> JSONResponse:
        status, body, headers = oa.error_reply(exc, bounded(str(exc)))
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request body"}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        what = f"field {param!r}: " if param else ""
        message = bounded(f"invalid request body: {what}{first.get('msg')}{more}")
        return JSONResponse(oa.error_body(message, "invalid_request_error", "invalid_argument", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"no route {request.method} {request.url.path}; see README, \"OpenAI-compatible HTTP API\""
                   if exc.status_code == 404 else f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(oa.error_body(message, "invalid_request_error", str(exc.detail).lower().replace(" ", "_")),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
        message = f"internal error in {request.method} {request.url.path}: {type(exc).__name__}"
        return JSONResponse(oa.error_body(message, "server_error", "internal"), status_code=500)

    # ---- generation

    async def generate(request: Request, req: GenerationRequest, reply: oa.Reply, stream: bool,
                       with_usage: bool) -> Response:
        events = engine.generate(req)
        if not stream:
            result = await _until_disconnected(request, _last(events, closing))
            if result is None:
                return Response(status_code=CLIENT_CLOSED)  # nobody reads it; counted as 499
            return JSONResponse(reply.completion(result))
        try:
            first = await anext(events)  # a bad request raises here, before any byte is sent: a 4xx reply
        except BaseException:
            await events.aclose()
            raise
        return StreamingResponse(_sse(events, first, reply, with_usage, closing), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def new_reply(chat: bool) -> oa.Reply:
        prefix = "chatcmpl" if chat else "cmpl"
        return oa.Reply(chat=chat, id=f"{prefix}-{secrets.token_hex(12)}", created=int(time.time()),
                        model=engine.info().name)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: oa.ChatCompletionBody, request: Request) -> Response:
        oa.check_model(body.model, engine.info())
        reply = new_reply(chat=True)
        req = oa.chat_request(body, limits, reply.id)
        return await generate(request, req, reply, bool(body.stream), _with_usage(body))

    @app.post("/v1/completions")
    async def completions(body: oa.CompletionBody, request: Request) -> Response:
        oa.check_model(body.model, engine.info())
        reply = new_reply(chat=False)
        req = oa.completion_request(body, limits, reply.id)
        return await generate(request, req, reply, bool(body.stream), _with_usage(body))

    # ---- embeddings and models

    @app.post("/v1/embeddings")
    async def embeddings(body: oa.EmbeddingBody) -> JSONResponse:
        model = body.model or CollectionConfig.embedding_model  # the default embedder of new collections
        if model not in EMBEDDERS:
            raise oa.ModelNotFound(f"embedding model {model!r} is not served here; expected one of: "
                                   f"{', '.join(EMBEDDERS)} (GET /v1/models)")
        if body.dimensions is not None and body.dimensions != embedder_dim(model):
            raise oa.ParamError("dimensions", f"dimensions={body.dimensions} is not supported: {model} makes "
                                f"{embedder_dim(model)}-d vectors; send {embedder_dim(model)} or leave it out")
        texts = oa.embedding_inputs(body)
        loop = asyncio.get_running_loop()
        vectors, tokens = await loop.run_in_executor(executor, store.embed_texts, texts, model)  # (n, dim)
        return JSONResponse(oa.embedding_list(vectors, body.encoding_format, model, tokens))

    def model_objects() -> list[dict[str, Any]]:
        info = engine.info()
        served = {"id": info.name, "object": "model", "created": started, "owned_by": "memlm",
                  "memlm": {"kind": "generation", "context_length": info.context_length, "vocab_size": info.vocab_size,
                            "layers": info.layers, "memory_modes": list(info.supported_memory_modes),
                            "all_memory_modes": list(registry.MODES)}}
        embedders = [{"id": name, "object": "model", "created": started, "owned_by": "memlm",
                      "memlm": {"kind": "embedding", "dimensions": spec.dim}} for name, spec in EMBEDDERS.items()]
        return [served, *embedders]

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": model_objects()})

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        for obj in model_objects():
            if obj["id"] == model_id:
                return JSONResponse(obj)
        raise oa.ModelNotFound(f"model {model_id!r} is not served here; GET /v1/models lists those that are")

    # ---- health and metrics

    @app.get("/health")
    async def health() -> JSONResponse:
        if guard.draining:
            return JSONResponse({"status": "NOT_SERVING"}, status_code=503)
        return JSONResponse({"status": "SERVING"})

    @app.get("/metrics")
    async def metrics() -> Response:
        body = await asyncio.to_thread(generate_latest, REGISTRY)  # the store collector reads LMDB stats
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return HttpApp(app, guard, closing, api_key, max_body_bytes)


def _with_usage(body: oa._GenerationBody) -> bool:
    return bool(body.stream and body.stream_options is not None and body.stream_options.include_usage)


class _Closing:
    """Set when the grace period is over: generations still running end at their next token with
    UNAVAILABLE (503, or an error event in a stream) instead of a connection cut mid-reply."""

    def __init__(self) -> None:
        self.set = False

    def check(self) -> None:
        if self.set:
            raise Unavailable("the server is shutting down and its grace period is over: the generation was stopped; "
                              "retry on another replica or after restart")


async def _last(events: AsyncIterator, closing: _Closing) -> GenerationResult:
    """The GenerationResult that ends `events`; closes it."""
    async with aclosing(events):
        async for event in events:
            closing.check()
            if isinstance(event, GenerationResult):
                return _checked(event)
    raise Unavailable("the generation ended without a result; retry")


def _checked(result: GenerationResult) -> GenerationResult:
    if result.finish_reason == "cancelled":  # the engine stopped it (shutting down), not the client
        raise Unavailable("the generation was cancelled: the server is shutting down; retry")
    return result


async def _sse(events: AsyncIterator, first, reply: oa.Reply, with_usage: bool, closing: _Closing) -> AsyncIterator[str]:
    """The stream's events. A client disconnect cancels this generator at its await (Starlette's
    disconnect listener), and `aclosing` closes the engine's iterator: generation stops at the next
    token. An error after the first event ends the generation and is sent as an `error` event (the
    openai client raises it), without the closing `[DONE]`."""
    failure: Optional[dict] = None
    async with aclosing(events):
        try:
            head = reply.first_chunk(with_usage)
            if head is not None:
                yield head
            event = first
            while not isinstance(event, GenerationResult):
                if event.text:
                    yield reply.delta_chunk(event.text, with_usage)
                event = await anext(events)
                closing.check()
            for chunk in reply.final_chunks(_checked(event), with_usage):
                yield chunk
        except MemlmError as exc:
            failure = oa.error_reply(exc, bounded(str(exc)))[1]
        except Exception as exc:  # noqa: BLE001 - a bug: logged, and the client told without internals
            log.exception("stream %s failed", reply.id, exc_info=exc)
            failure = oa.error_body(f"internal error in stream {reply.id}: {type(exc).__name__}", "server_error",
                                    "internal")
    yield oa.SSE_DONE if failure is None else oa.sse(failure)  # the engine's iterator is closed by now


async def _until_disconnected(request: Request, work):
    """Run `work` (a coroutine) unless the client disconnects first: then cancel it (closing the
    engine's iterator) and return None."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while await request.receive() != {"type": "http.disconnect"}:
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return None
    return task.result()


class HttpApp:
    """The ASGI app served: FastAPI's routes behind what every request goes through first, in
    gRPC's order (services/server.py: CallGuard, then the API key): refused 503 during the drain
    (/health, /metrics aside), then the API key (all but /health), then a body-size cap
    (server.max_message_bytes, as gRPC's message cap), then counted in the guard for as long as the
    response runs (a stream to its last byte); every request is counted and timed by route."""

    def __init__(self, app: FastAPI, guard: CallGuard, closing: _Closing, api_key: Optional[str],
                 max_body_bytes: int) -> None:
        self.app, self.guard, self._closing = app, guard, closing
        self._expected = f"Bearer {api_key}".encode() if api_key else None
        self._max_body = max_body_bytes

    def stop_generations(self) -> None:
        """The grace period is over: running generations end at their next token with UNAVAILABLE."""
        self._closing.set = True

    def _refusal(self, scope) -> Optional[MemlmError]:
        """Why this request is answered without reaching a route, or None."""
        path = scope["path"]
        if self.guard.draining and path not in _UNCOUNTED_PATHS:
            return Unavailable(DRAINING_MESSAGE)
        if self._expected is not None and path not in _OPEN_PATHS:
            given = [v for k, v in scope["headers"] if k == b"authorization"]
            if len(given) > 1:  # which one would a proxy in front have checked? refuse rather than guess
                return Unauthenticated(f"send exactly one Authorization header, got {len(given)}")
            if not given or not bearer_matches(given[0], self._expected):
                return Unauthenticated("missing or wrong API key: send the header `Authorization: Bearer <key>` "
                                       "(the openai client: api_key=...)")
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self._max_body:
            return _TooLarge(f"the request body is {int(length)} bytes; the limit is {self._max_body} "
                             "(server.max_message_bytes)")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in _ROUTES else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        state = {"status": None, "ended": False}

        async def observed_send(message) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        started = time.perf_counter()
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                status, body, headers = oa.error_reply(refusal, str(refusal))
                await JSONResponse(body, status_code=status, headers=headers)(scope, receive, observed_send)
            elif path in _UNCOUNTED_PATHS:
                await self.app(scope, receive, observed_send)
            else:
                with self.guard.counted():
                    await self.app(scope, _capped(receive, self._max_body), observed_send)
        except Exception:
            if not state["ended"]:
                raise
            # else a bug answered 500 by the app's handler, which logged it: uvicorn need not log it again
        finally:
            status = state["status"] if state["ended"] or state["status"] is None else CLIENT_CLOSED
            HTTP_REQUESTS.labels(route, str(status if status is not None else CLIENT_CLOSED)).inc()
            HTTP_SECONDS.labels(route).observe(time.perf_counter() - started)


class _TooLarge(MemlmError):
    code = "RESOURCE_EXHAUSTED"
    http_status = 413


def _capped(receive, limit: int):
    """`receive` that refuses a body (sent without Content-Length) growing past `limit` bytes."""
    seen = 0

    async def capped():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _TooLarge(f"the request body is over {limit} bytes (server.max_message_bytes)")
        return message

    return capped


_ROUTES = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"})


# --- the listener -----------------------------------------------------------------------------

class HttpListener:
    """The HTTP API's port, bound (not yet listening) before the store opens and the model loads."""

    def __init__(self, sock: socket.socket, host: str, tls: Optional[tuple[Path, Path]]) -> None:
        self.sock, self.host, self.tls = sock, host, tls
        self.port = sock.getsockname()[1]
        self._server = None
        self._app: Optional[HttpApp] = None
        self._task: Optional[asyncio.Task] = None

    @classmethod
    def bind(cls, host: str, port: int, tls: Optional[tuple[Path, Path]] = None) -> "HttpListener":
        """Bind host:port; FailedPrecondition naming the port when it is taken or not this host's.
        `tls`: (cert, key), the gRPC port's files: the HTTP API then speaks HTTPS."""
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
        except socket.gaierror as exc:
            raise FailedPrecondition(f"cannot serve HTTP on {host}:{port}: {exc.strerror}; choose another --host") from None
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use" (no SO_REUSEPORT)
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            sock.close()
            why = "the address is in use (another memlm serve?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise FailedPrecondition(f"cannot serve HTTP on {host}:{port}: {why}; choose another --http-port") from None
        return cls(sock, host, tls)

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    async def start(self, app: HttpApp) -> None:
        """Serve `app` on the bound socket from a task of the running loop."""
        self._app = app
        import uvicorn

        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # its start/stop lines repeat memlm's own

        class Embedded(uvicorn.Server):
            # memlm's serve() owns SIGTERM/SIGINT and calls stop(); uvicorn must not take them over.
            @contextlib.contextmanager
            def capture_signals(self):
                yield

        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", http="h11", ws="none",
            timeout_graceful_shutdown=None, server_header=False,
            ssl_certfile=str(self.tls[0]) if self.tls else None, ssl_keyfile=str(self.tls[1]) if self.tls else None,
        )
        self._server = Embedded(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[self.sock]), name="memlm-http")
        while not self._server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise FailedPrecondition(f"the HTTP API on port {self.port} stopped at start-up")
            await asyncio.sleep(0.01)

    async def stop(self, flush_seconds: float) -> None:
        """Close the listener. Generations still running end at their next token (503 / an error
        event); what is still running `flush_seconds` later is cancelled (the connection cut, a
        generation's iterator closed)."""
        if self._server is None:
            self.sock.close()
            return
        self._app.stop_generations()
        self._server.config.timeout_graceful_shutdown = flush_seconds
        self._server.should_exit = True
        await self._task

    def close(self) -> None:
        """Release the port of a listener that never started."""
        if self._server is None:
            self.sock.close()
