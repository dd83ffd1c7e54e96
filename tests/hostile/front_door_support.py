"""A real server process for the front-door and caps tests, and what they measure of it."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support.postgres import free_port


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def rss_mb(self) -> float:
        """Resident memory of the server process, from /proc."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def open_sockets(self) -> int:
        fd_dir = Path(f"/proc/{self.proc.pid}/fd")
        count = 0
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):  # closed meanwhile
                count += os.readlink(fd).startswith("socket:")
        return count

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def health(self, timeout: float = 5.0) -> tuple[int, float]:
        """(status, seconds) of GET /api/health on a connection of its own."""
        started = time.monotonic()
        with httpx.Client(timeout=timeout) as client:
            status = client.get(f"{self.base_url}/api/health").status_code
        return status, time.monotonic() - started


@contextmanager
def running_server(
    data_dir: Path, env: dict[str, str], *, nofile_soft: int | None = None
) -> Iterator[Server]:
    """`python -m crogia serve` on a free port (bubblewrap sandboxes), stopped with SIGTERM after."""
    port = free_port()
    log = data_dir / f"server-{port}.log"
    full_env = {
        **os.environ,
        "BASE_DIRECTORY": str(data_dir / "data"),
        "SANDBOX_BACKEND": "bubblewrap",
        "OPENAI_API_KEY": "test",
        "LOG_LEVEL": "INFO",
        **env,
    }
    limit: Callable[[], None] | None = None
    if nofile_soft is not None:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]

        def limit() -> None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile_soft, hard))

    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crogia", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=data_dir,
            env=full_env,
            stdout=out,
            stderr=out,
            preexec_fn=limit,
        )
    server = Server(proc, port, log)
    try:
        _wait_ready(server)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"server exited: {server.log_text()[-2000:]}")
        try:
            if server.health(timeout=2)[0] == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"server did not start: {server.log_text()[-2000:]}")


def closed_by_server(sock: socket.socket, timeout: float) -> tuple[bool, bytes]:
    """Read until the server closes (True) or `timeout` passes (False); returns what it sent."""
    sock.settimeout(0.2)
    received = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return True, received
        if not chunk:
            return True, received
        received += chunk
    return False, received


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
