"""`ReadWriteLock`: many readers or one writer, for a collection's in-memory indexes.

Searches only read the FAISS, metadata and lexical indexes (FAISS CPU indexes are safe to search
from several threads; the other two are plain Python structures nothing mutates on read), so they
share the lock and run side by side; ingest, delete, drop and snapshots hold it alone. Writers are
preferred: once one waits, new readers queue behind it, so a stream of searches cannot starve a
commit, and a search waits for at most the commit in front of it.

Used as a context manager (`with lock:`) it is the exclusive side and re-entrant for the thread
holding it, so it replaces the `threading.RLock` writers took before without changing them; a
thread holding it exclusively may also take the shared side. The shared side (`with
lock.shared():`) is not re-entrant: a reader that asks again while a writer waits would deadlock.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator, Optional


class ReadWriteLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: Optional[int] = None  # thread ident holding the exclusive side
        self._depth = 0  # re-entries of the exclusive side by that thread
        self._writers_waiting = 0
        self._readers_waiting = 0

    @property
    def writers_waiting(self) -> int:
        """Threads blocked on the exclusive side (for tests and metrics; a snapshot)."""
        return self._writers_waiting

    @property
    def readers_waiting(self) -> int:
        """Threads blocked on the shared side (a snapshot)."""
        return self._readers_waiting

    def acquire(self) -> None:
        """Take the exclusive side (blocks while readers or another writer hold the lock)."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:
                self._depth += 1
                return
            self._writers_waiting += 1
            try:
                self._cond.wait_for(lambda: self._writer is None and self._readers == 0)
            finally:
                self._writers_waiting -= 1
            self._writer, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._writer != threading.get_ident():
                raise RuntimeError("release of a ReadWriteLock this thread does not hold exclusively")
            self._depth -= 1
            if self._depth == 0:
                self._writer = None
                self._cond.notify_all()

    def __enter__(self) -> "ReadWriteLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @contextmanager
    def shared(self) -> Iterator[None]:
        """Hold the shared (reader) side for the `with` block."""
        me = threading.get_ident()
        with self._cond:
            if self._writer == me:  # reading under one's own write: already exclusive
                self._depth += 1
                nested = True
            else:
                self._readers_waiting += 1
                try:
                    self._cond.wait_for(lambda: self._writer is None and self._writers_waiting == 0)
                finally:
                    self._readers_waiting -= 1
                self._readers += 1
                nested = False
        try:
            yield
        finally:
            if nested:
                self.release()
            else:
                with self._cond:
                    self._readers -= 1
                    if self._readers == 0:
                        self._cond.notify_all()
