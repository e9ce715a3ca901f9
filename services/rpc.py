"""What every RPC handler shares: memlm errors become gRPC statuses, and each call is counted
and timed in Prometheus metrics (served on /metrics when `server.metrics_port` is set).

A `MemlmError` becomes its own status code with its message; anything else is a bug: it is logged
with its traceback and answered INTERNAL without leaking internals.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time

import grpc
from prometheus_client import Counter, Histogram

from memlm.errors import MemlmError, bounded

log = logging.getLogger(__name__)

RPC_CALLS = Counter("memlm_rpc_calls_total", "RPCs handled, by method and status code", ["method", "code"])
RPC_SECONDS = Histogram(
    "memlm_rpc_duration_seconds", "RPC wall time, by method", ["method"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, MemlmError):
        await context.abort(getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL), bounded(str(exc)))
    log.exception("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")


def _code(exc: BaseException | None) -> str:
    if exc is None:
        return "OK"
    if isinstance(exc, MemlmError):
        return exc.code
    if isinstance(exc, asyncio.CancelledError):  # the client cancelled or its deadline passed
        return "CANCELLED"
    return "INTERNAL"


@contextlib.asynccontextmanager
async def _handled(context: grpc.aio.ServicerContext, method: str):
    """Translate errors raised inside into statuses, and count and time the call."""
    started, failure = time.perf_counter(), None
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except Exception as exc:  # noqa: BLE001 - translated, never swallowed
        failure = exc
        await abort_with(context, exc, method)
    except BaseException as exc:  # cancellation: let it propagate, but count it
        failure = exc
        raise
    finally:
        RPC_CALLS.labels(method, _code(failure)).inc()
        RPC_SECONDS.labels(method).observe(time.perf_counter() - started)


def unary(method):
    """Wrap a unary (or client-streaming) servicer method."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _handled(context, method.__name__):
            return await method(self, request, context)

    return wrapper


def streaming(method):
    """Wrap a server-streaming servicer method (an async generator)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        async with _handled(context, method.__name__):
            async for item in method(self, request, context):
                yield item

    return wrapper
