"""Optional API-key authentication: `authorization: Bearer <key>` on every call but health checks.

Off unless `server.api_key` is set. Keys are compared in constant time; a call carrying more than one
`authorization` entry is refused (a proxy and the server might each read a different one).
"""
from __future__ import annotations

import hmac

import grpc

_OPEN_PREFIXES = ("/grpc.health.v1.Health/",)  # load balancers probe health without credentials


def bearer_matches(given: "str | bytes", expected: bytes) -> bool:
    """Constant-time comparison of an `authorization` value with b"Bearer <key>"."""
    return hmac.compare_digest(given.encode() if isinstance(given, str) else given, expected)


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str):
        self._expected = f"Bearer {api_key}".encode()

    async def intercept_service(self, continuation, handler_call_details):
        if handler_call_details.method.startswith(_OPEN_PREFIXES):
            return await continuation(handler_call_details)
        given = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        if len(given) > 1:  # which one would a proxy in front have checked? refuse rather than guess
            handler = await continuation(handler_call_details)
            return _deny(handler, f"send exactly one `authorization` metadata entry, got {len(given)}")
        if given and bearer_matches(given[0], self._expected):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        return _deny(handler, "missing or wrong API key: send metadata `authorization: Bearer <key>`")


def _deny(handler, message: str):
    """A handler of the same kind as `handler` that aborts with UNAUTHENTICATED."""

    async def abort(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def abort_stream(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.stream_stream_rpc_method_handler(abort_stream)
