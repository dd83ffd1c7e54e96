"""Load: 50 sessions run scripted agent tasks at once (text, a tool call in the sandbox, more text)
while 100 WebSocket clients watch. Every client sees every event of its session in order, with no
gap and no duplicate, and its tasks' `task_completed`; nothing fails. Wall time and event delivery
latency (event timestamp to receipt) are printed."""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets

from tests.support.scripted_openai import Call, Reply, ScriptedOpenAI
from tests.support.subprocess_server import ServerProcess

pytestmark = pytest.mark.slow

SESSIONS = 50
CLIENTS_PER_SESSION = 2
TASKS_PER_SESSION = 2
TIME_LIMIT = 120.0
"""Seconds for the whole run, set-up included: a bound, not the expectation."""


def answer(request: dict[str, Any]) -> Reply:
    """Every session's model: text and a tool call, then (after the tool result) a final text."""
    messages = request["messages"]
    task = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    n = int(re.findall(r"\d+", task)[-1])
    if messages[-1]["role"] == "tool":
        return Reply(["All ", "done ", f"with {n}."], delay=0.005)
    if n % 2:
        call = Call("write_file", {"path": f"out/{n}.txt", "content": f"load {n}\n"})
    else:
        call = Call("run_shell", {"cmd": f"echo load-{n}"})
    return Reply(["Working ", "on ", f"{n}. "], tool_calls=[call], delay=0.005)


@pytest.fixture
async def model() -> AsyncIterator[ScriptedOpenAI]:
    async with ScriptedOpenAI(responder=answer) as scripted:
        yield scripted


def epoch(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


class Watcher:
    """One WebSocket client of a session: reads from `since=0` until its tasks have completed."""

    def __init__(self, url: str, tasks: int) -> None:
        self.url = url
        self.tasks = tasks
        self.events: list[dict[str, Any]] = []
        self.latency: list[float] = []
        self.connected = asyncio.Event()
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async with websockets.connect(self.url, open_timeout=60) as ws:
            assert json.loads(await ws.recv())["type"] == "connection_established"
            self.connected.set()
            completed = 0
            while completed < self.tasks:
                event = json.loads(await ws.recv())
                self.latency.append(time.time() - epoch(event["timestamp"]))
                self.events.append(event)
                completed += event["type"] == "task_completed"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def test_fifty_sessions_and_a_hundred_clients_at_once(
    data_dir: Path, backend: str, model: ScriptedOpenAI
) -> None:
    env = {
        "BASE_DIRECTORY": str(data_dir),
        "SANDBOX_BACKEND": backend,
        "OPENAI_API_KEY": "test",
        "OPENAI_BASE_URL": model.base_url,
        "MODEL_RETRIES": "0",
        "LOG_LEVEL": "WARNING",
        "SANDBOX_MEMORY_MB": "256",
    }
    server = ServerProcess(data_dir, env)
    await server.start()
    # Idle connections are dropped before the server (5 s) would, so a POST never races a close.
    limits = httpx.Limits(max_connections=20, keepalive_expiry=2.0)
    sids: list[str] = []
    try:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120, limits=limits) as client:
            started = time.monotonic()
            created = await asyncio.gather(*(client.post("/api/sessions", json={}) for _ in range(SESSIONS)))
            assert [c.status_code for c in created] == [200] * SESSIONS, [c.text for c in created]
            sids = [c.json()["session_id"] for c in created]
            set_up = time.monotonic() - started

            watchers = {
                sid: [
                    Watcher(f"{server.ws_url}/ws/{sid}?since=0", TASKS_PER_SESSION)
                    for _ in range(CLIENTS_PER_SESSION)
                ]
                for sid in sids
            }
            everyone = [w for group in watchers.values() for w in group]
            await asyncio.wait_for(asyncio.gather(*(w.connected.wait() for w in everyone)), 60)

            assert server.proc is not None
            cpu = cpu_seconds(server.proc.pid)
            started = time.monotonic()
            posts = [
                client.post(f"/api/sessions/{sid}/tasks", json={"task": f"load {i * TASKS_PER_SESSION + k}"})
                for k in range(TASKS_PER_SESSION)
                for i, sid in enumerate(sids)
            ]
            posted = await asyncio.gather(*posts)
            assert [p.status_code for p in posted] == [200] * len(posts)
            try:
                await asyncio.wait_for(asyncio.gather(*(w.task for w in everyone)), TIME_LIMIT - set_up)
            except TimeoutError:
                tasks = await asyncio.gather(*(client.get(f"/api/sessions/{sid}/tasks") for sid in sids))
                unfinished = [t for answer_ in tasks for t in answer_.json() if t["status"] != "completed"]
                waiting = [(w.url, [e["type"] for e in w.events][-5:]) for w in everyone if not w.task.done()]
                raise AssertionError(
                    f"unfinished tasks: {unfinished}\nwatchers waiting: {waiting[:4]}\n"
                    f"server log: {server.log.read_text()[-3000:]}"
                ) from None
            wall = time.monotonic() - started
            cpu = cpu_seconds(server.proc.pid) - cpu

            tasks = await asyncio.gather(*(client.get(f"/api/sessions/{sid}/tasks") for sid in sids))
    finally:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120) as client:
            deleted = await asyncio.gather(*(client.delete(f"/api/sessions/{sid}") for sid in sids))
        await server.stop()
    log = server.log.read_text()
    assert "Traceback" not in log and "unhandled" not in log, log[-3000:]
    assert [d.status_code for d in deleted] == [200] * len(sids), [d.text for d in deleted]

    statuses = [t["status"] for answer_ in tasks for t in answer_.json()]
    assert statuses == ["completed"] * SESSIONS * TASKS_PER_SESSION
    for sid, group in watchers.items():
        for watcher in group:
            events = watcher.events
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))  # no gap, no duplicate
            assert all(e["session_id"] == sid for e in events)
            assert not [e for e in events if e["type"] in ("error", "task_failed", "task_cancelled")]
            assert [e["type"] for e in events].count("task_completed") == TASKS_PER_SESSION
            done = [e for e in events if e["type"] == "tool_complete"]
            assert len(done) == TASKS_PER_SESSION and not [e for e in done if e.get("is_error")]
            shell = [e["output"] for e in done if e["tool_name"] == "run_shell"]
            assert shell and all("load-" in out for out in shell)
        assert group[0].events == group[1].events
    latency = [x for w in everyone for x in w.latency]
    print(
        f"load[{backend}]: {SESSIONS} sessions (set up in {set_up:.1f} s), {len(everyone)} clients, "
        f"{len(statuses)} tasks, {len(latency)} events delivered in {wall:.1f} s; latency "
        f"p50 {percentile(latency, 0.5) * 1000:.0f} ms, p99 {percentile(latency, 0.99) * 1000:.0f} ms, "
        f"max {max(latency) * 1000:.0f} ms; server CPU {cpu:.1f} s"
    )
