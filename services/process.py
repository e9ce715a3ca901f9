"""Run `memlm serve` in a child process on a free loopback port and wait until it serves.

Used by the tests, the benchmarks and anyone who wants a throwaway server from Python:

    server = ServerProcess(tmp_dir); memlm.Client(server.address) ...; server.terminate()
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Optional

_READY = re.compile(r"serving on grpcs?://([\d.]+):(\d+)")
_READY_HTTP = re.compile(r" and (https?://[\d.]+:(\d+)) ")  # with --http-port: the HTTP API's base URL


def free_port() -> int:
    """A loopback port free right now (for the metrics endpoint, which has no port 0 report)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, data_dir: Path, *, env: Optional[dict] = None, args: tuple = (), timeout: float = 300.0):
        self.data_dir = Path(data_dir)
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "memlm.cli", "serve", "--data-dir", str(data_dir), "--port", "0", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
        )
        self.lines: list[str] = []
        self.address = ""
        self.http_url = ""  # "http://127.0.0.1:PORT" when serving the HTTP API (--http-port)
        self.http_port = 0
        ready = threading.Event()

        def pump():
            for line in self.proc.stdout:
                self.lines.append(line)
                if not ready.is_set() and (m := _READY.search(line)):
                    self.address = f"{m.group(1)}:{m.group(2)}"
                    if h := _READY_HTTP.search(line):
                        self.http_url, self.http_port = h.group(1), int(h.group(2))
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.2):
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"memlm serve not ready after {timeout} s:\n{self.output}")
        if not self.address:
            raise RuntimeError(f"memlm serve exited with {self.proc.wait()}:\n{self.output}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM (graceful shutdown) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the crash case."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
