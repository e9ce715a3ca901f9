"""Server start-up and shutdown: the store, the engine, the servicers, health and reflection.

`serve(settings)` is what `memlm serve` runs. Order on start: bind the ports (gRPC, then metrics and
the HTTP API when on: a port in use or a bad TLS pair fails here, in a second), open the store
(recovering the indexes from LMDB if the last run crashed), load the model, start gRPC and the HTTP
API, report SERVING. On SIGTERM or SIGINT: health goes NOT_SERVING (gRPC health and HTTP /health
503, both keep answering), new calls are refused (UNAVAILABLE; HTTP 503), in-flight calls of both
get `grace_seconds` to finish; then the store refuses to commit, so an ingest or delete still
running stops before its commit and is answered UNAVAILABLE "nothing from this call was stored",
and one past its commit finishes its derived work (a KV memory build stops early) and is answered;
then both servers stop (what is left, generations, is cancelled), the engine stops and LMDB is
closed cleanly (index snapshots written). A SIGTERM before the ready line (model loading) ends the
process at once, which recovery at the next start handles like a crash.
"""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import REGISTRY
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import memlm
from memlm.config import Settings
from memlm.engine import EngineClient
from memlm.errors import FailedPrecondition
from memlm.services.auth import ApiKeyInterceptor
from memlm.services.interceptors import CallGuard
from memlm.services.metrics import StoreCollector, start_metrics_server
from memlm.services.generation_servicer import GenerationServicer, model_info_to_pb
from memlm.services.memory_servicer import MemoryServicer
from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc

if TYPE_CHECKING:  # fastapi and uvicorn are imported only when the HTTP API is on
    from memlm.services.http_api import HttpListener

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Memory", "Generation"))


# A store call still running this long after the stop is cancelled (its client then sees UNAVAILABLE
# without knowing whether it committed): a hard cap for a stop check that never comes.
STORE_CALL_CAP_SECONDS = 60.0
RESPONSE_FLUSH_SECONDS = 0.5  # lets a response whose handler just returned reach the wire before the cancel


@dataclass
class Listener:
    """A bound, not yet started gRPC server (and the metrics endpoint): bound first, so a port in
    use or a bad TLS file fails at once, before the store is opened or the model loaded."""

    server: grpc.aio.Server
    port: int
    guard: CallGuard
    metrics: Optional[WSGIServer] = None
    http: Optional["HttpListener"] = None  # the OpenAI-compatible HTTP API (server.http_port)


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    executor: ThreadPoolExecutor
    guard: CallGuard
    store: object
    metrics: Optional[WSGIServer] = None
    collector: Optional[StoreCollector] = None
    http: Optional["HttpListener"] = None

    async def stop(self, grace: Optional[float]) -> None:
        """Drain, then stop. Health answers NOT_SERVING throughout the drain and other new calls
        UNAVAILABLE; admitted calls get `grace` s. Then the store refuses to commit (a store call
        still running raises Unavailable before its commit and its client is told so; one past
        its commit finishes and is answered), and what is left (generations) is cancelled. Gone
        within grace + the time to the next stop check (an embedding batch, a KV memory segment,
        a commit: seconds; the SIGTERM tests allow 5) in practice, STORE_CALL_CAP_SECONDS at most."""
        self.guard.begin_drain()
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING, Watch streams told
        idle = await self.guard.wait_idle(grace if grace is not None else float("inf"))
        if not idle:
            log.info("grace period over with %d call(s) in flight: stopping writes", self.guard.in_flight)
        self.store.stop_writes()  # also when idle: background KV memory builds stop at their next segment
        # Store calls end by themselves now: before their commit with nothing stored, or after it
        # answered. Cancelling one would tell its client "failed" about a write that is stored.
        if not idle and not await self.guard.wait_store_idle(STORE_CALL_CAP_SECONDS):
            log.error("%d store call(s) still running %.0f s after the stop: cancelling them",
                      self.guard.store_in_flight, STORE_CALL_CAP_SECONDS)
        stops = [self.server.stop(RESPONSE_FLUSH_SECONDS)]  # what is left (generations) is cancelled
        if self.http is not None:  # the HTTP API's requests were counted in the same guard: drained alike
            stops.append(self.http.stop(RESPONSE_FLUSH_SECONDS))
        await asyncio.gather(*stops)
        await asyncio.to_thread(self.executor.shutdown, wait=True)  # store calls end at their next stop check
        log.info("all calls ended")
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.shutdown)
            self.metrics.server_close()
        if self.collector is not None:
            REGISTRY.unregister(self.collector)


def _tls_credentials(cert: Path, key: Path) -> grpc.ServerCredentials:
    """Server credentials, checked the way an operator can act on (gRPC alone says only
    "Failed to bind")."""
    try:
        key_pem, cert_pem = key.read_bytes(), cert.read_bytes()
    except OSError as exc:
        raise FailedPrecondition(
            f"cannot read TLS file {exc.filename}: {exc.strerror} (server.tls_cert / server.tls_key)"
        ) from None
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise FailedPrecondition(f"TLS key {key} does not match the certificate {cert}") from None
        raise FailedPrecondition(
            f"TLS certificate {cert} and key {key} are not a usable PEM pair: {exc.reason or exc}"
        ) from None
    return grpc.ssl_server_credentials([(key_pem, cert_pem)])


def _probe_address(host: str, port: int) -> None:
    """Bind the address once with a plain socket, so a taken or foreign address gets one clear line
    (gRPC's own failure also logs a C-core error line to stderr)."""
    if port == 0:
        return
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise FailedPrecondition(f"cannot listen on {host}:{port}: {exc.strerror}; choose another --host") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is not "in use"
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            why = "the address is in use (another memlm serve?)" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise FailedPrecondition(
                f"cannot listen on {host}:{port}: {why}; stop the other server or choose another --port/--host"
            ) from None


def bind(settings: Settings) -> Listener:
    """Create the gRPC server and bind its port (and the metrics port); nothing is served yet."""
    guard = CallGuard()
    interceptors = [guard, *([ApiKeyInterceptor(settings.server.api_key)] if settings.server.api_key else [])]
    opts = [
        ("grpc.max_receive_message_length", settings.server.max_message_bytes),
        ("grpc.max_send_message_length", settings.server.max_message_bytes),
        ("grpc.so_reuseport", 0),  # else a second server binds the same port and the kernel splits clients
    ]
    server = grpc.aio.server(interceptors=interceptors, options=opts)
    address = f"{settings.server.host}:{settings.server.port}"
    if settings.server.tls_cert:
        creds = _tls_credentials(settings.server.tls_cert, settings.server.tls_key)
    _probe_address(settings.server.host, settings.server.port)
    try:
        port = server.add_secure_port(address, creds) if settings.server.tls_cert else server.add_insecure_port(address)
    except RuntimeError:  # lost a race after the probe
        raise FailedPrecondition(
            f"cannot listen on {address}: the address is in use (another memlm serve?) or not one of this "
            "host's; stop the other server or choose another --port/--host"
        ) from None
    metrics = None
    if settings.server.metrics_port is not None:
        try:
            metrics = start_metrics_server(settings.server.host, settings.server.metrics_port, settings.server.api_key)
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot serve metrics on {settings.server.host}:{settings.server.metrics_port}: {exc.strerror}; "
                "choose another --metrics-port"
            ) from None
    http = None
    if settings.server.http_port is not None:
        try:
            from memlm.services.http_api import HttpListener
        except ImportError as exc:
            raise FailedPrecondition(f"--http-port needs the HTTP API's dependencies ({exc.name} is not installed): "
                                     "pip install 'memlm[server]'") from None
        tls = (settings.server.tls_cert, settings.server.tls_key) if settings.server.tls_cert else None
        try:
            http = HttpListener.bind(settings.server.host, settings.server.http_port, tls)
        except BaseException:
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()
            raise
    return Listener(server=server, port=port, guard=guard, metrics=metrics, http=http)


async def start_server(listener: Listener, settings: Settings, store, engine: EngineClient) -> RunningServer:
    """Register the services on a bound listener and start serving."""
    started_at = time.time()
    server = listener.server
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="memlm-store")

    def stats_extra() -> dict:
        return {"version": memlm.__version__, "uptime_s": time.time() - started_at, "model": model_info_to_pb(engine.info())}

    pb_grpc.add_MemoryServicer_to_server(
        MemoryServicer(
            store, executor, max_ingest_call_bytes=settings.store.max_ingest_call_bytes, stats_extra=stats_extra
        ),
        server,
    )
    pb_grpc.add_GenerationServicer_to_server(
        GenerationServicer(engine, default_max_new_tokens=settings.model.default_max_new_tokens), server
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    collector = None
    if listener.metrics is not None or listener.http is not None:  # both serve /metrics
        collector = StoreCollector(store, listener.guard)
        REGISTRY.register(collector)
    await server.start()
    if listener.http is not None:
        from memlm.services.http_api import create_app
        from memlm.services.openai_protocol import Limits

        limits = Limits(default_max_new_tokens=settings.model.default_max_new_tokens,
                        max_new_tokens_limit=settings.model.max_new_tokens_limit)
        app = create_app(engine, store, executor, listener.guard, api_key=settings.server.api_key, limits=limits,
                         max_body_bytes=settings.server.max_message_bytes)
        await listener.http.start(app)
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(
        server=server, health=health_servicer, port=listener.port, executor=executor, guard=listener.guard,
        store=store, metrics=listener.metrics, collector=collector, http=listener.http,
    )


def served_tokenizer(settings: Settings):
    """The served model's tokenizer: the store chunks with it (knn memory is built from its token ids)."""
    from memlm.models.loading import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(settings.model.path, settings.cache_dir))


def open_store(settings: Settings, tokenizer):
    from memlm.index.memory_store import MemoryStore

    return MemoryStore.open(settings.data_dir, settings.store, tokenizer=tokenizer)


def load_engine(settings: Settings, store, tokenizer=None) -> EngineClient:
    from memlm.host import ModelHost

    return ModelHost.load(settings.model, memory=store, cache_dir=settings.cache_dir, mode_settings=settings.modes(), tokenizer=tokenizer)


async def serve(settings: Settings, *, ready_message: bool = True) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully. With `ready_message` the ready line is
    printed on stdout (tests and scripts wait for it), else logged."""
    listener = bind(settings)
    os.umask(0o077)  # every file and folder the server creates (LMDB, index, KV files, LOCK) is owner-only
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.data_dir.chmod(0o700)  # a data dir made before: its contents become owner-only too
    store = engine = running = None
    try:
        tokenizer = served_tokenizer(settings)  # loaded once, for the store and the model host
        store = open_store(settings, tokenizer)
        engine = load_engine(settings, store, tokenizer)
        running = await start_server(listener, settings, store, engine)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        info = engine.info()
        scheme = "grpcs" if settings.server.tls_cert else "grpc"
        http = f" and {running.http.scheme}://{settings.server.host}:{running.http.port}" if running.http else ""
        msg = (
            f"memlm {memlm.__version__} serving on {scheme}://{settings.server.host}:{running.port}{http} "
            f"(data {settings.data_dir}, model {info.name}, auth {'on' if settings.server.api_key else 'off'})"
        )
        if ready_message:
            print(msg, flush=True)
        else:
            log.info(msg)
        await stop.wait()
        log.info("shutting down: draining in-flight calls for up to %.0f s", settings.server.grace_seconds)
        await running.stop(settings.server.grace_seconds)
    finally:
        if running is None:
            await listener.server.stop(None)
            if listener.metrics is not None:
                listener.metrics.server_close()
            if listener.http is not None:
                await listener.http.stop(0.0)
        if engine is not None:
            await engine.close()
        if store is not None:
            store.close()
            log.info("stopped cleanly")
