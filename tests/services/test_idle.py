"""Idle sessions (SESSION_IDLE_TTL) through a real server on both backends: their sandbox stops, the
next request that needs it starts it again, and anything still working keeps it running."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from crogia.config import Settings
from tests.conftest import make_settings
from tests.support.scripted_openai import Reply, ScriptedOpenAI
from tests.support.server import RunningServer, run_server

pytestmark = pytest.mark.slow  # each waits for a sandbox to go idle

TTL = 1.0


@pytest.fixture
async def model() -> AsyncIterator[ScriptedOpenAI]:
    async with ScriptedOpenAI() as scripted:
        yield scripted


@pytest.fixture
async def settings(data_dir: Path, backend: str, model: ScriptedOpenAI) -> Settings:
    settings = make_settings(data_dir, backend, session_idle_ttl=TTL, openai_base_url=model.base_url)
    # Containers are removed with the data folder (tests/conftest.py `data_dir`).
    return settings


@pytest.fixture
async def server(settings: Settings) -> AsyncIterator[RunningServer]:
    async with run_server(settings) as running:
        yield running


async def session(server: RunningServer, sid: str) -> dict[str, Any]:
    body: dict[str, Any] = (await server.client.get(f"/api/sessions/{sid}")).json()
    return body


async def shell(server: RunningServer, sid: str, cmd: str, **extra: Any) -> dict[str, Any]:
    response = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": cmd, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def wait_stopped(server: RunningServer, sid: str, within: float = 15) -> float:
    """Seconds until the session shows as stopped."""
    start = time.monotonic()
    while time.monotonic() - start < within:
        if (await session(server, sid))["status"] == "stopped":
            return time.monotonic() - start
        await asyncio.sleep(0.1)
    raise AssertionError(f"session {sid} was never stopped: {await session(server, sid)}")


async def stays_running(server: RunningServer, sid: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert (await session(server, sid))["status"] == "active"
        await asyncio.sleep(0.2)


async def test_idle_session_stops_and_comes_back_on_use(server: RunningServer) -> None:
    sid = str((await server.create_session(task="idle"))["session_id"])
    await shell(server, sid, "echo kept > kept.txt")
    waited = await wait_stopped(server, sid)
    stopped = await session(server, sid)
    health = (await server.client.get("/api/health")).json()

    again = await shell(server, sid, "cat kept.txt")
    resumed = await session(server, sid)
    await server.client.delete(f"/api/sessions/{sid}")

    assert waited >= TTL * 0.8
    assert stopped["container_status"] == "exited" and health["active_sessions"] == 0
    assert again["output"].strip() == "kept" and again["exit_code"] == 0
    assert resumed["status"] == "active" and resumed["container_status"] == "running"


async def test_file_requests_start_it_too_and_concurrent_ones_share_one_start(
    server: RunningServer,
) -> None:
    sid = str((await server.create_session(task="idle"))["session_id"])
    await wait_stopped(server, sid)
    base = f"/api/sessions/{sid}"
    results = await asyncio.gather(
        server.client.post(f"{base}/files/content", json={"path": "a.txt", "content": "A"}),
        server.client.get(f"{base}/files", params={"path": "."}),
        server.client.post(f"{base}/shell", json={"cmd": "echo one"}),
        server.client.post(f"{base}/shell", json={"cmd": "echo two"}),
    )
    container = (await session(server, sid))["container_id"]
    await server.client.delete(f"{base}")
    assert [r.status_code for r in results] == [200, 200, 200, 200]
    assert [r.json()["output"].strip() for r in results[2:]] == ["one", "two"]
    assert container and await server.runtime.provider.managed_ids() == []


async def test_commands_and_processes_keep_it_running(server: RunningServer) -> None:
    sid = str((await server.create_session(task="busy"))["session_id"])
    long = asyncio.ensure_future(shell(server, sid, "sleep 3; echo done", timeout=20))
    await stays_running(server, sid, 2.5)
    assert (await long)["output"].strip() == "done"

    started = await server.client.post(f"/api/sessions/{sid}/processes", json={"cmd": "sleep 600"})
    pid = started.json()["pid"]
    await stays_running(server, sid, 2.5)
    await server.client.post(f"/api/sessions/{sid}/processes/{pid}/stop")
    await wait_stopped(server, sid)
    await server.client.delete(f"/api/sessions/{sid}")


async def test_a_task_waiting_on_its_model_keeps_it_running(
    server: RunningServer, model: ScriptedOpenAI
) -> None:
    model.add(Reply(["thinking "] * 30, delay=0.1))  # three seconds of slow tokens
    sid = str((await server.create_session(task="slow"))["session_id"])
    posted = await server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "think"})
    task_id = posted.json()["task_id"]
    await stays_running(server, sid, 2.5)
    waited = await wait_stopped(server, sid)
    task = (await server.client.get(f"/api/sessions/{sid}/tasks/{task_id}")).json()
    await server.client.delete(f"/api/sessions/{sid}")
    assert task["status"] == "completed" and waited >= TTL * 0.5


async def test_a_stopped_session_stays_stopped_across_a_restart(settings: Settings) -> None:
    async with run_server(settings) as server:
        sid = str((await server.create_session(task="idle"))["session_id"])
        await shell(server, sid, "echo kept > kept.txt")
        await wait_stopped(server, sid)
    async with run_server(settings.model_copy(update={"session_idle_ttl": 0})) as server:
        before = await session(server, sid)
        health = (await server.client.get("/api/health")).json()
        again = await shell(server, sid, "cat kept.txt")
        after = await session(server, sid)
        await server.client.delete(f"/api/sessions/{sid}")
    assert before["status"] == "stopped" and before["container_status"] == "exited"
    assert health["active_sessions"] == 0
    assert again["output"].strip() == "kept"
    assert after["status"] == "active" and after["container_status"] == "running"
