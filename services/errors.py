"""Mapping memlm errors onto gRPC status codes, in one place for every servicer.

A `MemlmError` becomes its own status code with its message; anything else is a bug: it is
logged with its traceback and answered INTERNAL without leaking internals.
"""
from __future__ import annotations

import functools
import logging

import grpc

from memlm.errors import MemlmError

log = logging.getLogger(__name__)


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, MemlmError):
        await context.abort(getattr(grpc.StatusCode, exc.code, grpc.StatusCode.INTERNAL), str(exc))
    log.exception("%s failed", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(exc).__name__}")


def unary(method):
    """Wrap a unary (or client-streaming) servicer method: memlm errors become statuses."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - translated, never swallowed
            await abort_with(context, exc, method.__name__)

    return wrapper


def streaming(method):
    """Wrap a server-streaming servicer method (an async generator)."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            async for item in method(self, request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await abort_with(context, exc, method.__name__)

    return wrapper
