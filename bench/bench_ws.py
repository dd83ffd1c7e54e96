"""WebSocket event delivery: events/s to one client, and 100 clients on one session, same-run baselines.

Servers run in a child process (this script with `--serve raw|ours`); clients run here, on uvloop.

* events/s to one client. ours: the real app; the child publishes N `text_delta` events on the bus
  as fast as it can (stored in SQLite in batches, then fanned out) to a session with one WebSocket
  client. raw: a bare Starlette WebSocket endpoint on the same uvicorn sending N pre-serialized
  events of the same shape. Rate = N / (client's last receive - first publish). Target >= 40,000/s.
* 100 clients on one session. The child publishes events at a steady rate (a fast model's token
  stream) to 100 connected clients; each event carries its publish time (`time.monotonic()`, the
  same clock across processes), and each client records receive - publish. naive: the usual
  broadcast loop (`for ws in clients: await ws.send_json(event)` per event). Target: every client
  gets every event, in order, and p99 delivery <= 50 ms.

Writes bench/results/ws.json. Usage: `python bench/bench_ws.py [--smoke]`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvloop
import websockets

from _common import ROOT, Row, data_dir, parse_args, percentile, report
from crogia.cli import DEFAULT_LOOP, WS_IMPL

RATE_TARGET = 40_000.0
P99_TARGET_MS = 50.0


# --- the child: a server plus a publisher driven by lines on stdin ---


def event_text(seq: int, sid: str, sent: float) -> dict[str, Any]:
    return {
        "type": "text_delta",
        "session_id": sid,
        "seq": seq,
        "timestamp": "2026-01-01T00:00:00.000Z",
        "content": f"{sent:.6f} token",
        "task_id": "bench-task",
    }


async def serve_ours(port: int, base: Path) -> None:
    import uvicorn

    from crogia.app import create_app
    from crogia.config import Settings
    from crogia.events import TextDelta

    settings = Settings(
        _env_file=None, base_directory=base, sandbox_backend="bubblewrap", log_level="WARNING"
    )  # type: ignore[call-arg]
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws_max_size=4 << 20,
        ws=os.environ.get("BENCH_WS", WS_IMPL),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.02)
    runtime = app.state.runtime
    row = await runtime.sessions.create(tenant="default", label="bench ws", image=None, env={}, metadata={})
    sid = row.id  # a plain string, as the task service has it (an ORM attribute costs ~1 us a read)

    async def publish(count: int, rate: float) -> None:
        started = time.monotonic()
        for i in range(count):
            if rate:
                delay = started + i / rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            await runtime.bus.publish(sid, TextDelta(content=f"{time.monotonic():.6f} token", task_id="t"))

    await _command_loop(sid, lambda: runtime.bus.subscriber_count(sid), publish)
    await runtime.sessions.delete(sid, tenant=None)
    server.should_exit = True
    await task


async def serve_raw(port: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket, WebSocketDisconnect

    clients: list[WebSocket] = []

    async def endpoint(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(json.dumps({"type": "connection_established"}))
        clients.append(websocket)
        with contextlib.suppress(WebSocketDisconnect):
            while True:
                await websocket.receive_text()
        clients.remove(websocket)

    app = Starlette(routes=[WebSocketRoute("/ws/{sid}", endpoint)])
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        ws_max_size=4 << 20,
        ws=os.environ.get("BENCH_WS", WS_IMPL),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:  # noqa: ASYNC110 - uvicorn offers no event for it
        await asyncio.sleep(0.02)

    async def publish(count: int, rate: float) -> None:
        started = time.monotonic()
        if not rate:  # raw send: pre-serialized frames to the one client, as fast as it goes
            texts = [json.dumps(event_text(i + 1, "raw", started)) for i in range(count)]
            for text in texts:
                await clients[0].send_text(text)
            return
        for i in range(count):  # naive broadcast: serialize and await each client in turn
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            event = event_text(i + 1, "raw", time.monotonic())
            for websocket in list(clients):
                await websocket.send_json(event)

    await _command_loop("raw", lambda: len(clients), publish)
    server.should_exit = True
    await task


async def _command_loop(sid: str, subscribers: Any, publish: Any) -> None:
    """stdin lines: `publish COUNT RATE CLIENTS` (waits for CLIENTS subscribers) or `quit`."""
    print(json.dumps({"sid": sid}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "quit":
            return
        count, rate, clients = int(line[1]), float(line[2]), int(line[3])
        while subscribers() < clients:  # noqa: ASYNC110 - polled: the bus has no event for it
            await asyncio.sleep(0.01)
        await publish(count, rate)
        print(json.dumps({"published": count}), flush=True)


# --- the parent: clients and measurements ---


@dataclass
class Child:
    proc: asyncio.subprocess.Process
    port: int
    sid: str

    async def publish(self, count: int, rate: float, clients: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"publish {count} {rate} {clients}\n".encode())
        await self.proc.stdin.drain()

    async def published(self) -> None:
        assert self.proc.stdout is not None
        json.loads(await self.proc.stdout.readline())


@contextlib.asynccontextmanager
async def child(kind: str) -> AsyncIterator[Child]:
    from tests.support.postgres import free_port

    with data_dir() as base:
        port = free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--serve", kind, "--port", str(port), "--base", str(base),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            hello = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
            yield Child(proc, port, hello["sid"])
        finally:
            if proc.stdin is not None:
                proc.stdin.write(b"quit\n")
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def receive(url: str, count: int, ready: asyncio.Event | None = None) -> dict[str, Any]:
    """Read `count` events; their seqs, the publish time of the first, receive times and latencies."""
    seqs: list[int] = []
    latencies: list[float] = []
    first_sent = 0.0
    async with websockets.connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # connection_established
        if ready is not None:
            ready.set()
        while len(seqs) < count:
            event = json.loads(await ws.recv())
            now = time.monotonic()
            sent = float(event["content"].split()[0])
            first_sent = first_sent or sent
            seqs.append(event["seq"])
            latencies.append(now - sent)
    return {"seqs": seqs, "latencies": latencies, "first_sent": first_sent, "last_received": now}


async def one_client_rate(kind: str, count: int, repeats: int) -> float:
    rates = []
    async with child(kind) as srv:
        for _ in range(repeats):
            url = f"ws://127.0.0.1:{srv.port}/ws/{srv.sid}"
            ready = asyncio.Event()
            reader = asyncio.create_task(receive(url, count, ready))
            await ready.wait()
            await srv.publish(count, 0, 1)
            got = await reader
            await srv.published()
            rates.append(count / (got["last_received"] - got["first_sent"]))
            await asyncio.sleep(0.3)  # the server notices the closed socket before the next round
    return statistics.median(rates)


async def many_clients(kind: str, clients: int, events: int, rate: float) -> dict[str, Any]:
    async with child(kind) as srv:
        url = f"ws://127.0.0.1:{srv.port}/ws/{srv.sid}"
        readies = [asyncio.Event() for _ in range(clients)]
        readers = [asyncio.create_task(receive(url, events, ready)) for ready in readies]
        for ready in readies:
            await ready.wait()
        await srv.publish(events, rate, clients)
        results = await asyncio.wait_for(asyncio.gather(*readers), 120)
        await srv.published()
    latencies = [lat for got in results for lat in got["latencies"]]
    complete = sum(
        1 for got in results if got["seqs"] == sorted(set(got["seqs"])) and len(got["seqs"]) == events
    )
    return {
        "clients": clients,
        "events": events,
        "rate": rate,
        "complete_clients": complete,
        "lost": clients * events - len(latencies),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
        "max_ms": round(max(latencies) * 1000, 2),
    }


async def measure(smoke: bool) -> list[Row]:
    count, repeats = (2_000, 1) if smoke else (15_000, 5)
    clients, events, rate = (10, 50, 100.0) if smoke else (100, 500, 100.0)
    raw_rate = await one_client_rate("raw", count, repeats)
    our_rate = await one_client_rate("ours", count, repeats)
    naive = await many_clients("raw", clients, events, rate)
    ours = await many_clients("ours", clients, events, rate)
    print(f"rate: ours {our_rate:,.0f}/s raw {raw_rate:,.0f}/s\nnaive {naive}\nours {ours}", file=sys.stderr)
    return [
        Row(
            "events/s to one WebSocket client",
            round(our_rate),
            "/s",
            f">= {RATE_TARGET:,.0f}/s",
            our_rate >= RATE_TARGET,
            baseline=round(raw_rate),
            baseline_what="raw websocket send",
            extra={"events": count, "repeats": repeats},
        ),
        Row(
            f"{clients} WebSocket clients, p99 delivery ({rate:g} events/s)",
            ours["p99_ms"],
            "ms",
            f"<= {P99_TARGET_MS:g} ms, none lost",
            ours["p99_ms"] <= P99_TARGET_MS and ours["lost"] == 0 and ours["complete_clients"] == clients,
            baseline=naive["p99_ms"],
            baseline_what="naive broadcast",
            extra={"ours": ours, "naive": naive},
        ),
    ]


def main() -> None:
    args = parse_args(
        __doc__,
        [
            ("--serve", {"choices": ["raw", "ours"], "help": "(internal) run the server side"}),
            ("--port", {"type": int, "default": 0}),
            ("--base", {"type": Path, "default": None}),
        ],
    )
    runner = uvloop.run if DEFAULT_LOOP == "uvloop" else asyncio.run
    if args.serve == "ours":
        runner(serve_ours(args.port, args.base))
    elif args.serve == "raw":
        runner(serve_raw(args.port))
    else:
        rows = uvloop.run(measure(args.smoke))
        report("ws", rows, smoke=args.smoke, server_loop=DEFAULT_LOOP, client_loop="uvloop", pid=os.getpid())


if __name__ == "__main__":
    main()
