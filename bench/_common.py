"""Shared pieces of the benchmarks: result rows and files, a real server process, a lean HTTP client.

Every benchmark measures its raw baseline in the same run, prints its rows (ours, baseline, ratio,
target, met) and writes `bench/results/<name>.json`, which `run_all.py` gathers into RESULTS.md.
Servers run as separate processes (`python -m crogia serve`), so the client does not share the
server's event loop, and everything a benchmark creates is removed when it ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # `tests.support` when run as a script

from tests.support.postgres import free_port  # noqa: E402
from tests.support.server import docker_ready  # noqa: E402

from crogia.config import Settings  # noqa: E402
from crogia.sandbox import instance_id  # noqa: E402

IMAGE = "crogia-sandbox:latest"


@dataclass
class Row:
    """One line of the results table."""

    what: str
    ours: float
    unit: str
    target: str
    met: bool | None
    """None: a row for reference, without a target of its own."""
    baseline: float | None = None
    baseline_what: str = ""
    ratio: float | None = None
    """ours / baseline (for rates: baseline / ours would flatter us, so it is ours / baseline too)."""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.ratio is None and self.baseline:
            self.ratio = round(self.ours / self.baseline, 3)


def parse_args(doc: str | None, extra: Sequence[tuple[str, dict[str, Any]]] = ()) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: only proves it runs")
    for flag, options in extra:
        parser.add_argument(flag, **options)
    return parser.parse_args()


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:.2f}"
    return f"{text} {unit}".strip()


def report(name: str, rows: list[Row], *, smoke: bool, **extra: Any) -> dict[str, Any]:
    """Print the rows as a markdown table and write bench/results/<name>.json."""
    print(f"\n{name}{' (smoke)' if smoke else ''}\n")
    print("| what | ours | baseline | ratio | target | met |\n| --- | ---: | ---: | ---: | --- | --- |")
    for row in rows:
        base = f"{fmt(row.baseline, row.unit)} ({row.baseline_what})" if row.baseline is not None else "-"
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "-"
        met = "-" if row.met is None else ("yes" if row.met else "NO")
        print(f"| {row.what} | {fmt(row.ours, row.unit)} | {base} | {ratio} | {row.target} | {met} |")
    result = {
        "benchmark": name,
        "smoke": smoke,
        "rows": [asdict(row) for row in rows],
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return result


def median_ms(seconds: Sequence[float]) -> float:
    return round(statistics.median(seconds) * 1000, 3)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def backends() -> list[str]:
    """bubblewrap always; Docker when the engine answers and the image is there."""
    found = ["bubblewrap"]
    reason = docker_ready()
    if reason is None:
        found.append("docker")
    else:
        print(f"docker skipped: {reason}", file=sys.stderr)
    return found


@contextlib.contextmanager
def data_dir(prefix: str = "cgb-") -> Any:
    # Short: the executor socket's path must stay under 108 bytes.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- a server process ---

UNISOLATED = {"SANDBOX_NETWORK": "bridge", "SANDBOX_UID_RANGE": ""}
"""`server(env=...)` settings that turn the sandbox isolation off (shared network, host-root
sandboxes): the old path, measured beside the isolated one."""


@dataclass
class Server:
    base: Path
    port: int
    proc: asyncio.subprocess.Process
    settings: Settings

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.asynccontextmanager
async def server(
    backend: str, *, loop: str | None = None, pool: int = 0, env: dict[str, str] | None = None
) -> AsyncIterator[Server]:
    """`crogia serve` on a free port with its own data folder; sessions and sandboxes removed after."""
    with data_dir() as base:
        values = {
            "BASE_DIRECTORY": str(base),
            "SANDBOX_BACKEND": backend,
            "SANDBOX_POOL_SIZE": str(pool),
            "SANDBOX_MEMORY_MB": "1024",
            "OPENAI_API_KEY": "bench",
            "LOG_LEVEL": "WARNING",
            **(env or {}),
        }
        port = free_port()
        argv = [sys.executable, "-m", "crogia", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if loop:
            argv += ["--loop", loop]
        log = (base / "server.log").open("ab")
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=base, env={**os.environ, **values}, stdout=log, stderr=log
        )
        log.close()
        settings = Settings(_env_file=None, base_directory=base, sandbox_backend=backend)  # type: ignore[call-arg]
        running = Server(base, port, proc, settings)
        try:
            await _wait_healthy(running)
            yield running
        finally:
            await _shut_down(running)


async def _wait_healthy(server: Server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.returncode is not None:
            raise RuntimeError(f"server exited: {(server.base / 'server.log').read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            async with Http(server.port) as http:
                if (await http.request("GET", "/api/health"))[0] == 200:
                    return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"server did not start: {(server.base / 'server.log').read_text()[-2000:]}")


async def _shut_down(server: Server) -> None:
    if server.proc.returncode is None:
        with contextlib.suppress(OSError, ConnectionError, ValueError):
            async with Http(server.port) as http:
                _, sessions = await http.json("GET", "/api/sessions")
                for session in sessions:
                    await http.request("DELETE", f"/api/sessions/{session['session_id']}")
        server.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(server.proc.wait(), 60)
        except TimeoutError:
            server.proc.kill()
            await server.proc.wait()
    if server.settings.sandbox_backend == "docker":
        await remove_containers(server.settings)


async def remove_containers(settings: Settings) -> None:
    """Every container made for this data folder (sessions and pool), whatever happened."""
    from crogia.sandbox.docker import DockerProvider

    provider = DockerProvider(instance=instance_id(settings))
    try:
        for sandbox_id in await provider.managed_ids():
            await provider.remove(sandbox_id)
    finally:
        await provider.close()


# --- a lean HTTP client ---


class Http:
    """HTTP/1.1 over one keep-alive connection, as a load generator does it: a request costs the
    client tens of microseconds, so the numbers are the server's. Bodies need Content-Length."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Http:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()

    async def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        assert self._reader is not None and self._writer is not None
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self._writer.write(head.encode() + body)
        status = int((await self._reader.readline()).split()[1])
        length = 0
        while (line := await self._reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await self._reader.readexactly(length)

    async def json(self, method: str, path: str, payload: object = None) -> tuple[int, Any]:
        body = b"" if payload is None else json.dumps(payload).encode()
        status, data = await self.request(method, path, body)
        return status, json.loads(data) if data else None


async def create_session(http: Http, **body: object) -> dict[str, Any]:
    status, session = await http.json("POST", "/api/sessions", body)
    if status != 200:
        raise RuntimeError(f"session create failed: {status} {session}")
    result: dict[str, Any] = session
    return result


async def run_quiet(*argv: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )
    return await proc.wait()


async def timed(*argv: str) -> float:
    """Seconds to run a command to its end (output discarded)."""
    started = time.perf_counter()
    code = await run_quiet(*argv)
    if code != 0:
        raise RuntimeError(f"{argv[0]} exited with {code}")
    return time.perf_counter() - started
