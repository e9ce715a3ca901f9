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
