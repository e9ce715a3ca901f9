"""What the server does to every call before a servicer sees it: decode the request bytes itself,
and refuse new calls while draining for shutdown.

Decoding: gRPC's own deserialization failure answers UNKNOWN (INTERNAL on a stream) and logs a
traceback per message. `CallGuard` takes the request bytes raw and parses them with the method's
own deserializer, so a malformed message (bad UTF-8 in a string, nesting past protobuf's depth
limit, truncated bytes) answers INVALID_ARGUMENT with protobuf's reason and logs one line.

Draining: after `begin_drain()` new calls answer UNAVAILABLE, except health checks, which keep
answering (NOT_SERVING) until the server stops, so load balancers see the drain. Calls admitted
before are counted; `wait_idle` waits for them to end, `wait_store_idle` for the Memory service's
(store) calls among them, which end by themselves once the store stops writes. The HTTP API
(services/http_api.py) counts its requests in the same guard (`counted`), so one drain covers both.
"""
from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from typing import Any, AsyncIterator, Callable, Optional

import grpc
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

_ALWAYS_OPEN = ("/grpc.health.v1.Health/",)  # answered during the drain too
_STORE_CALLS = "/memlm.v1.Memory/"
DRAINING_MESSAGE = "server is shutting down: not accepting new calls; retry on another replica or after restart"


async def _wait(event: asyncio.Event, timeout: float) -> bool:
    try:
        await asyncio.wait_for(event.wait(), timeout)
        return True
    except asyncio.TimeoutError:
        return False


class CallGuard(grpc.aio.ServerInterceptor):
    def __init__(self) -> None:
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._store_in_flight = 0
        self._store_idle = asyncio.Event()
        self._store_idle.set()

    # ---------------------------------------------------------------- draining

    def begin_drain(self) -> None:
        """From now on, new calls (health checks aside) answer UNAVAILABLE."""
        self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    @contextlib.contextmanager
    def counted(self, store: bool = False):
        """Count a call served outside gRPC (an HTTP API request) as in flight while the block runs."""
        self._enter(store)
        try:
            yield
        finally:
            self._exit(store)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def store_in_flight(self) -> int:
        return self._store_in_flight

    async def wait_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the admitted calls to end; True when none is left."""
        return await _wait(self._idle, timeout)

    async def wait_store_idle(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the admitted Memory-service calls to end."""
        return await _wait(self._store_idle, timeout)

    def _enter(self, store: bool) -> None:
        self._in_flight += 1
        self._idle.clear()
        if store:
            self._store_in_flight += 1
            self._store_idle.clear()

    def _exit(self, store: bool) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()
        if store:
            self._store_in_flight -= 1
            if self._store_in_flight == 0:
                self._store_idle.set()


    # ---------------------------------------------------------------- the interceptor

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        counted = not method.startswith(_ALWAYS_OPEN)
        return _guarded(handler, method, self if counted else None)


async def _refuse_if_draining(guard: Optional[CallGuard], context) -> None:
    if guard is not None and guard._draining:
        await context.abort(grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)


async def _decode(deserialize: Optional[Callable[[bytes], Any]], raw: bytes, method: str, context, what: str):
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except DecodeError as exc:
        message = f"{method}: {what} could not be decoded ({exc}); send a valid serialized request message"
        log.warning("%s", message)  # one line: a malformed message is the caller's problem, not a bug
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def _guarded(handler: grpc.RpcMethodHandler, method: str, guard: Optional[CallGuard]) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that takes raw bytes, decodes them itself, refuses
    calls during the drain (when `guard` counts this method) and counts the calls it runs."""
    deserialize = handler.request_deserializer
    store = method.startswith(_STORE_CALLS)

    def decoded_stream(raw_iterator: AsyncIterator[bytes], context) -> AsyncIterator[Any]:
        async def messages():
            i = 0
            async for raw in raw_iterator:
                yield await _decode(deserialize, raw, method, context, f"request message {i}")
                i += 1

        return messages()

    def wrap(behavior, decode_one: bool):
        streaming_out = inspect.isasyncgenfunction(behavior)

        async def prepare(request, context):
            await _refuse_if_draining(guard, context)
            if decode_one:
                return await _decode(deserialize, request, method, context, "the request message")
            return decoded_stream(request, context)

        if streaming_out:

            async def run_stream(request, context):
                request = await prepare(request, context)
                if guard is not None:
                    guard._enter(store)
                try:
                    async for item in behavior(request, context):
                        yield item
                finally:
                    if guard is not None:
                        guard._exit(store)

            return run_stream

        async def run(request, context):
            request = await prepare(request, context)
            if guard is not None:
                guard._enter(store)
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                if guard is not None:
                    guard._exit(store)

        return run

    serialize = handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, True), None, serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True), None, serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False), None, serialize)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, False), None, serialize)
