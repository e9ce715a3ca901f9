"""Errors that reach a user. Each maps to one gRPC status code in `memlm.services`.

Raise these from the store and the engine with a message that names the bad value and what was
expected; the servicers translate them, nothing else does.
"""
from __future__ import annotations

from typing import Sequence


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


# --- quoting user input in messages ---------------------------------------------------------
# A status message travels in gRPC trailing metadata, which clients cap (8-16 KiB): a message
# that quotes a 15k-character name or 1,500 ids would be dropped as "Stream removed". Messages
# quote input through these, and `bounded` is the last-resort cap where statuses are sent.

MAX_QUOTED_CHARS = 80  # of one quoted value
MAX_QUOTED_ITEMS = 5  # of a quoted list
MAX_MESSAGE_CHARS = 2000  # of a whole status message


def quoted(value: object, max_chars: int = MAX_QUOTED_CHARS) -> str:
    """`repr(value)`, cut to `max_chars` with its full length stated: 'nnnn...' (15000 characters)."""
    text = repr(value)
    if len(text) <= max_chars:
        return text
    size = f"{len(value)} characters" if isinstance(value, (str, bytes)) else f"{len(text)} characters as text"
    return f"{text[:max_chars]}... ({size})"


def quoted_items(items: Sequence[object], max_items: int = MAX_QUOTED_ITEMS) -> str:
    """The first `max_items` of a list, each `quoted`, then how many more: ['a', 'b', ... and 1495 more]."""
    items = list(items)
    shown = ", ".join(quoted(v) for v in items[:max_items])
    more = len(items) - max_items
    return f"[{shown}, ... and {more} more]" if more > 0 else f"[{shown}]"


def bounded(message: str, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    """A message cut to `max_chars` (stating how much was cut), for where a status is sent."""
    if len(message) <= max_chars:
        return message
    return f"{message[: max_chars - 40]}... (message cut from {len(message)} characters)"
