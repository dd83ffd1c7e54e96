"""Interactive terminals: keystroke echo round trip and output throughput, against a raw local PTY.

* echo: the client sends one key (`shell_input` "x" over `WS /ws/shells/{id}`) and waits for the
  shell's echo of it (then a backspace, not timed). raw: the same with this process writing the
  key to a local pty running the same `bash -i` and reading the echo. Targets: p50 <= 5 ms and
  p99 <= 20 ms over the WebSocket, on every backend.
* throughput: `yes | head -c 50M` typed into the terminal; bytes of output reaching the client
  per second (JSON `shell_output` frames, the original client's format; then again on a socket
  that asks for binary frames), until a marker after it (the pty turns each "y\n" into "y\r\n",
  which bounds even the raw pty here). Then, for reference, 50 MB without newlines (`tr`).
  raw: the same command in a local pty, read by this process. Target >= 20 MB/s; the server's
  peak RSS growth during the flood is reported (its scrollback is bounded at 256 KiB a terminal).

Writes bench/results/terminal.json. Usage: `python bench/bench_terminal.py [--smoke]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import websockets

from _common import Http, Row, backends, create_session, parse_args, percentile, report, server

P50_MS, P99_MS, RATE_MB = 5.0, 20.0, 20.0
FLOOD = "yes | head -c {size}; echo; echo END-$((6*7))"
PLAIN = "head -c {size} /dev/zero | tr '\\0' y; echo; echo END-$((6*7))"
"""Output without newlines: the pty's own newline translation (ONLCR), which bounds `yes`, is not
in the way, so this shows what the path from the pty to the client carries."""


class Pty:
    """A local `bash -i` on a pty, driven by this process (the raw baseline)."""

    def __init__(self) -> None:
        self.master, slave = os.openpty()
        env = {**os.environ, "TERM": "xterm-256color", "PS1": "$ "}
        self.proc = subprocess.Popen(
            ["bash", "--norc", "--noprofile", "-i"], stdin=slave, stdout=slave, stderr=slave,
            start_new_session=True, env=env,
        )  # fmt: skip
        os.close(slave)
        self.read_until(b"$ ")

    def read_until(self, marker: bytes) -> int:
        seen, total = b"", 0
        while marker not in seen:
            data = os.read(self.master, 1 << 16)
            total += len(data)
            seen = seen[-len(marker) :] + data
        return total

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self.master)


def raw_echo(keys: int) -> list[float]:
    term, times = Pty(), []
    try:
        for _ in range(keys):
            started = time.perf_counter()
            os.write(term.master, b"x")
            term.read_until(b"x")
            times.append(time.perf_counter() - started)
            os.write(term.master, b"\x7f")
            term.read_until(b"\x08")
    finally:
        term.close()
    return times


def raw_flood(size: int, flood: str = FLOOD) -> float:
    term = Pty()
    try:
        os.write(term.master, flood.format(size=size).encode() + b"\r")
        started = time.perf_counter()
        total = term.read_until(b"END-42")
        return total / (time.perf_counter() - started)
    finally:
        term.close()


class Socket:
    def __init__(self, ws: Any) -> None:
        self.ws, self.tail = ws, ""

    async def until(self, marker: str) -> int:
        """Read output until `marker`; the number of characters (binary frames: bytes) read."""
        total = 0
        while marker not in self.tail:
            frame = await self.ws.recv()
            if isinstance(frame, bytes):  # `?binary=1`: raw output
                data = frame.decode("latin-1")
            else:
                msg = json.loads(frame)
                if msg["type"] != "shell_output":
                    continue
                data = msg["data"]
            total += len(data)
            self.tail = self.tail[-len(marker) :] + data
        self.tail = self.tail[self.tail.index(marker) + len(marker) :]
        return total

    async def type(self, data: str) -> None:
        await self.ws.send(json.dumps({"type": "shell_input", "data": data}))


@contextlib.asynccontextmanager
async def terminal(backend: str) -> AsyncIterator[tuple[Socket, int, str]]:
    async with server(backend) as srv, Http(srv.port) as http:
        sid = (await create_session(http))["session_id"]
        _, shell = await http.json("POST", f"/api/sessions/{sid}/shells", {})
        url = f"{srv.ws_url}/ws/shells/{shell['shell_id']}"
        async with websockets.connect(url, max_size=None) as ws:
            sock = Socket(ws)
            await sock.type("PS1='$ '; echo READY-$((6*7))\r")
            await sock.until("READY-42")
            yield sock, srv.pid, url


async def again(url: str, pid: int, size: int, *, flood: str = FLOOD, binary: bool) -> tuple[float, float]:
    """A flood on a new socket (it replaces the one before), asking for binary frames or not."""
    async with websockets.connect(url + ("?binary=1" if binary else ""), max_size=None) as ws:
        sock = Socket(ws)
        await sock.type("echo AGAIN-$((6*7))\r")
        await sock.until("AGAIN-42")  # after the scrollback replayed
        return await ws_flood(sock, pid, size, flood)


async def ws_echo(sock: Socket, keys: int) -> list[float]:
    times = []
    for _ in range(keys):
        started = time.perf_counter()
        await sock.type("x")
        await sock.until("x")
        times.append(time.perf_counter() - started)
        await sock.type("\x7f")
        await sock.until("\x08")
    return times


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def ws_flood(sock: Socket, pid: int, size: int, flood: str = FLOOD) -> tuple[float, float]:
    """(bytes/s reaching the client, peak server RSS growth in MB)."""
    before, peak = rss_mb(pid), 0.0

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_mb(pid) - before)
            await asyncio.sleep(0.05)

    sampler = asyncio.create_task(sample())
    try:
        await sock.type(flood.format(size=size) + "\r")
        started = time.perf_counter()
        total = await sock.until("END-42")
        return total / (time.perf_counter() - started), peak
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)


def ms(values: list[float], q: float) -> float:
    return round(percentile(values, q) * 1000, 3)


async def main() -> None:
    args = parse_args(__doc__)
    keys, size = (30, 1 << 20) if args.smoke else (300, 50 << 20)
    raw = raw_echo(keys)
    raw_rate, raw_plain = raw_flood(size), raw_flood(size, PLAIN)
    rows, extra = [], {}
    only = os.environ.get("BENCH_BACKENDS")  # e.g. `bubblewrap`: one backend instead of every one found
    for backend in only.split(",") if only else backends():
        async with terminal(backend) as (sock, pid, url):
            ours = await ws_echo(sock, keys)
            rate, grown = await ws_flood(sock, pid, size)
            binary_rate, binary_grown = await again(url, pid, size, binary=True)
            plain_rate, _ = await again(url, pid, size, flood=PLAIN, binary=False)
        for q, target in ((50, P50_MS), (99, P99_MS)):
            mine, base = ms(ours, q), ms(raw, q)
            ratio = round(mine / max(base, 1e-3), 2)
            rows.append(Row(f"terminal key echo p{q} over WS ({backend})", mine, "ms", f"<= {target:g} ms",
                            mine <= target, base, "local pty, same bash", ratio))  # fmt: skip
        mb, raw_mb = rate / 1e6, raw_rate / 1e6
        rows.append(Row(f"terminal output `yes` to the client ({backend})", round(mb, 1), "MB/s",
                        f">= {RATE_MB:g} MB/s", mb >= RATE_MB, round(raw_mb, 1), "local pty read",
                        round(mb / raw_mb, 3)))  # fmt: skip
        binary_mb = binary_rate / 1e6
        rows.append(Row(f"terminal output `yes`, `?binary=1` frames ({backend})", round(binary_mb, 1), "MB/s",
                        f">= {RATE_MB:g} MB/s", binary_mb >= RATE_MB, round(raw_mb, 1), "local pty read",
                        round(binary_mb / raw_mb, 3)))  # fmt: skip
        plain_mb, raw_plain_mb = plain_rate / 1e6, raw_plain / 1e6
        rows.append(Row(f"terminal output without newlines (`tr`) ({backend})", round(plain_mb, 1),
                        "MB/s", "(reference)", None, round(raw_plain_mb, 1), "local pty read",
                        round(plain_mb / raw_plain_mb, 3)))  # fmt: skip
        extra[f"server_rss_growth_mb_{backend}"] = round(grown, 1)
        extra[f"server_rss_growth_mb_binary_{backend}"] = round(binary_grown, 1)
        extra[f"echo_mean_ms_{backend}"] = round(statistics.mean(ours) * 1000, 3)
    report("terminal", rows, smoke=args.smoke, flood_bytes=size, keys=keys, **extra)


if __name__ == "__main__":
    asyncio.run(main())
