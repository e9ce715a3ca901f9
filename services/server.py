"""Server start-up and shutdown: the store, the engine, the servicers, health and reflection.

`serve(settings)` is what `memlm serve` runs. Order on start: open the store (recovering the
indexes from LMDB if the last run crashed), load the model, bind, report SERVING. On SIGTERM or
SIGINT: health goes NOT_SERVING, new calls are refused, in-flight calls get `grace_seconds` to
finish, then the engine stops and LMDB is closed cleanly (index snapshots written).
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import memlm
from memlm.config import Settings
from memlm.engine import EngineClient
from memlm.services.auth import ApiKeyInterceptor
from memlm.services.generation_servicer import GenerationServicer, model_info_to_pb
from memlm.services.memory_servicer import MemoryServicer
from memlm.v1 import memlm_pb2 as pb
from memlm.v1 import memlm_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(pb.DESCRIPTOR.services_by_name[name].full_name for name in ("Memory", "Generation"))


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    executor: ThreadPoolExecutor

    async def stop(self, grace: Optional[float]) -> None:
        await self.health.enter_graceful_shutdown()  # every service NOT_SERVING
        await self.server.stop(grace)
        self.executor.shutdown(wait=True)


async def start_server(settings: Settings, store, engine: EngineClient) -> RunningServer:
    """Bind and start the gRPC server over an opened store and a loaded engine."""
    started_at = time.time()
    executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="memlm-store")
    interceptors = [ApiKeyInterceptor(settings.server.api_key)] if settings.server.api_key else []
    opts = [
        ("grpc.max_receive_message_length", settings.server.max_message_bytes),
        ("grpc.max_send_message_length", settings.server.max_message_bytes),
    ]
    server = grpc.aio.server(interceptors=interceptors, options=opts)

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

    address = f"{settings.server.host}:{settings.server.port}"
    if settings.server.tls_cert:
        creds = grpc.ssl_server_credentials(
            [(settings.server.tls_key.read_bytes(), settings.server.tls_cert.read_bytes())]
        )
        port = server.add_secure_port(address, creds)
    else:
        port = server.add_insecure_port(address)
    await server.start()
    if settings.server.metrics_port is not None:
        from prometheus_client import start_http_server

        start_http_server(settings.server.metrics_port, addr=settings.server.host)
    for name in (*SERVICE_NAMES, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return RunningServer(server=server, health=health_servicer, port=port, executor=executor)


def served_tokenizer(settings: Settings):
    """The served model's tokenizer: the store chunks with it (knn memory is built from its token ids)."""
    from memlm.models.loading import load_tokenizer, resolve_model_dir

    return load_tokenizer(resolve_model_dir(settings.model.path, settings.cache_dir))


def open_store(settings: Settings, tokenizer):
    from memlm.index.memory_store import MemoryStore

    return MemoryStore.open(settings.data_dir, settings.store, tokenizer=tokenizer)


def load_engine(settings: Settings, store, tokenizer=None) -> EngineClient:
    from memlm.host import ModelHost

    return ModelHost.load(settings.model, memory=store, cache_dir=settings.cache_dir, knn=settings.knn, tokenizer=tokenizer)


async def serve(settings: Settings, *, ready_message: bool = True) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = served_tokenizer(settings)  # loaded once, for the store and the model host
    store = open_store(settings, tokenizer)
    engine = None
    try:
        engine = load_engine(settings, store, tokenizer)
        running = await start_server(settings, store, engine)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        info = engine.info()
        scheme = "grpcs" if settings.server.tls_cert else "grpc"
        msg = (
            f"memlm {memlm.__version__} serving on {scheme}://{settings.server.host}:{running.port} "
            f"(data {settings.data_dir}, model {info.name}, auth {'on' if settings.server.api_key else 'off'})"
        )
        log.info(msg)
        if ready_message:
            print(msg, flush=True)  # tests and scripts wait for this line
        await stop.wait()
        log.info("shutting down: draining in-flight calls for up to %.0f s", settings.server.grace_seconds)
        await running.stop(settings.server.grace_seconds)
    finally:
        if engine is not None:
            await engine.close()
        store.close()
        log.info("stopped cleanly")
