"""Errors that reach a user. Each maps to one gRPC status code in `memlm.services`.

Raise these from the store and the engine with a message that names the bad value and what was
expected; the servicers translate them, nothing else does.
"""
from __future__ import annotations


class MemlmError(Exception):
    """Base class. `code` is the gRPC status name the servicer answers with."""

    code = "INTERNAL"


class InvalidArgument(MemlmError, ValueError):
    code = "INVALID_ARGUMENT"


class NotFound(MemlmError, KeyError):
    code = "NOT_FOUND"

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class AlreadyExists(MemlmError):
    code = "ALREADY_EXISTS"


class ResourceExhausted(MemlmError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(MemlmError):
    code = "FAILED_PRECONDITION"


class Unimplemented(MemlmError, NotImplementedError):
    code = "UNIMPLEMENTED"


class Cancelled(MemlmError):
    code = "CANCELLED"


class Unauthenticated(MemlmError):
    code = "UNAUTHENTICATED"


class DeadlineExceeded(MemlmError, TimeoutError):
    code = "DEADLINE_EXCEEDED"


class Unavailable(MemlmError, ConnectionError):
    code = "UNAVAILABLE"


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument, NotFound, AlreadyExists, ResourceExhausted, FailedPrecondition,
        Unimplemented, Cancelled, Unauthenticated, DeadlineExceeded, Unavailable,
    )
}


def error_for_code(code: str, message: str) -> MemlmError:
    """The exception a client raises for a gRPC status: the matching class, else a MemlmError
    whose `code` is the status name."""
    cls = _BY_CODE.get(code)
    if cls is not None:
        return cls(message)
    err = MemlmError(message)
    err.code = code
    return err
