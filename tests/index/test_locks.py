"""`ReadWriteLock`: readers share it, a writer holds it alone, a waiting writer goes before new
readers. Orderings are asserted from events, never from how long something took."""
from __future__ import annotations

import threading
import time

import pytest

from memlm.index.locks import ReadWriteLock

WAIT = 10.0  # generous upper bound for a thread to reach a point it must reach (never hit when passing)


def wait_until(pred, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.001)


def test_readers_hold_it_together():
    lock = ReadWriteLock()
    both_in = threading.Barrier(3, timeout=WAIT)  # two readers + this thread

    def reader():
        with lock.shared():
            both_in.wait()  # breaks (BrokenBarrierError) unless both readers are inside at once

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    both_in.wait()
    for t in threads:
        t.join(WAIT)


def test_writer_waits_for_readers_and_readers_for_writer():
    lock = ReadWriteLock()
    events: list[str] = []
    reader_in, release_reader = threading.Event(), threading.Event()

    def reader():
        with lock.shared():
            events.append("reader in")
            reader_in.set()
            release_reader.wait(WAIT)
            events.append("reader out")

    def writer():
        with lock:
            events.append("writer in")

    r = threading.Thread(target=reader)
    r.start()
    reader_in.wait(WAIT)
    w = threading.Thread(target=writer)
    w.start()
    wait_until(lambda: lock.writers_waiting == 1, "the writer to wait")
    assert "writer in" not in events
    release_reader.set()
    r.join(WAIT), w.join(WAIT)
    assert events == ["reader in", "reader out", "writer in"]

    # And the other way round: a reader waits while a writer holds it.
    events.clear()
    with lock:
        def reader2():
            with lock.shared():
                events.append("reader in")

        r2 = threading.Thread(target=reader2)
        r2.start()
        wait_until(lambda: lock.readers_waiting == 1, "the reader to wait")
        events.append("writer out")
    r2.join(WAIT)
    assert events == ["writer out", "reader in"]


def test_a_waiting_writer_goes_before_new_readers():
    lock = ReadWriteLock()
    events: list[str] = []
    first_in, release_first = threading.Event(), threading.Event()

    def first_reader():
        with lock.shared():
            first_in.set()
            release_first.wait(WAIT)

    def writer():
        with lock:
            events.append("writer")

    def late_reader():
        with lock.shared():
            events.append("late reader")

    r1 = threading.Thread(target=first_reader)
    r1.start()
    first_in.wait(WAIT)
    w = threading.Thread(target=writer)
    w.start()
    wait_until(lambda: lock.writers_waiting == 1, "the writer to wait")
    r2 = threading.Thread(target=late_reader)
    r2.start()
    wait_until(lambda: lock.readers_waiting == 1, "the late reader to wait")
    release_first.set()
    for t in (r1, w, r2):
        t.join(WAIT)
    assert events == ["writer", "late reader"]  # the stream of readers does not starve the writer


def test_exclusive_side_is_reentrant_and_may_read():
    lock = ReadWriteLock()
    with lock:
        with lock:
            with lock.shared():
                pass
    # Fully released: another thread can write.
    t = threading.Thread(target=lambda: lock.__enter__() or lock.__exit__(None, None, None))
    t.start()
    t.join(WAIT)
    assert not t.is_alive()


def test_release_without_holding_raises():
    lock = ReadWriteLock()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
