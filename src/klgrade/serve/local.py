"""Run `klgrade serve` as a child process on loopback (tests and the load benchmark use it)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import httpx

STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LocalServer:
    url: str
    pid: int


@contextmanager
def local_server(*serve_args: str) -> Iterator[LocalServer]:
    """Start `klgrade serve SERVE_ARGS` on a free loopback port; yields its URL and process id once healthy."""
    port = free_port()
    log_file = tempfile.TemporaryFile()  # a pipe nobody reads would fill up and stall the server
    process = subprocess.Popen([sys.executable, "-m", "klgrade", "serve", "--port", str(port), *serve_args],
                               stdout=log_file, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if process.poll() is not None:
                log_file.seek(0)
                raise RuntimeError(f"klgrade serve exited: {log_file.read().decode(errors='replace')[-2000:]}")
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("klgrade serve did not become healthy in time")
            time.sleep(0.5)
        yield LocalServer(url, process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)
        log_file.close()
