"""The session state machine through a real server, on both backends: deleting wins every race,
a stopped sandbox comes up once however many requests want it, and only listed transitions exist."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from crogia.services.lifecycle import MOVES
from crogia.services.live import LiveSession
from tests.conftest import make_settings
from tests.support.server import RunningServer, run_server

CYCLES = 6
RACERS = 6


@pytest.fixture
async def server(data_dir: Path, backend: str) -> AsyncIterator[RunningServer]:
    async with run_server(make_settings(data_dir, backend, sandbox_pool_size=0)) as running:
        yield running


async def shell(server: RunningServer, sid: str) -> int:
    try:
        response = await server.client.post(f"/api/sessions/{sid}/shell", json={"cmd": "echo hi"})
    except httpx.HTTPError as exc:  # a dropped connection is no answer at all: count it as wrong
        raise AssertionError(f"shell request failed: {exc!r}") from exc
    return response.status_code


async def race_delete(server: RunningServer, sid: str) -> list[int]:
    """Delete `sid` while shell requests for it keep arriving: before, during and after the delete."""
    deleted = asyncio.Event()

    async def keep_asking() -> list[int]:
        codes = []
        while not deleted.is_set():
            codes.append(await shell(server, sid))
        codes.append(await shell(server, sid))  # one more once the delete has answered
        return codes

    racers = [asyncio.create_task(keep_asking()) for _ in range(RACERS)]
    await asyncio.sleep(0)  # (lets the first requests go out; the delete is what they race)
    response = await server.client.delete(f"/api/sessions/{sid}")
    deleted.set()
    codes = [code for each in await asyncio.gather(*racers) for code in each]
    assert response.status_code == 200
    return codes


async def assert_gone(server: RunningServer, sid: str) -> None:
    assert (await server.client.get(f"/api/sessions/{sid}")).status_code == 404
    assert await shell(server, sid) == 404
    runtime = server.runtime
    assert runtime.sessions.peek(sid) is None and runtime.sessions.deleted(sid)
    managed = await runtime.provider.managed_ids()
    assert managed == [], f"sandboxes left running after the delete of {sid}: {managed}"


async def test_delete_wins_every_race_with_requests(server: RunningServer) -> None:
    for _ in range(CYCLES):
        sid = str((await server.create_session(task="race"))["session_id"])
        codes = await race_delete(server, sid)
        assert set(codes) <= {200, 404}, codes
        await assert_gone(server, sid)
    assert server.runtime.sessions.live_count() == 0


async def test_delete_of_a_stopped_session_wins_the_race_to_start_it(server: RunningServer) -> None:
    for _ in range(CYCLES // 2):
        sid = str((await server.create_session(task="asleep"))["session_id"])
        live = server.runtime.sessions.peek(sid)
        assert live is not None and await server.runtime.sessions.sleep(live, idle_for=0)
        codes = await race_delete(server, sid)
        assert set(codes) <= {200, 404}, codes
        await assert_gone(server, sid)


async def test_after_a_restart_a_stopped_session_is_dormant_and_delete_still_wins(
    data_dir: Path, backend: str
) -> None:
    settings = make_settings(data_dir, backend, sandbox_pool_size=0)
    async with run_server(settings) as first:
        sid = str((await first.create_session(task="dormant"))["session_id"])
        live = first.runtime.sessions.peek(sid)
        assert live is not None and await first.runtime.sessions.sleep(live, idle_for=0)
    async with run_server(settings) as second:
        again = second.runtime.sessions.peek(sid)
        assert again is not None and again.state == "dormant"
        assert (await second.client.get(f"/api/sessions/{sid}")).json()["container_status"] == "exited"
        codes = await race_delete(second, sid)
        assert set(codes) <= {200, 404}, codes
        await assert_gone(second, sid)


async def test_a_stopped_sandbox_comes_up_once_for_many_requests(server: RunningServer) -> None:
    sid = str((await server.create_session(task="wake"))["session_id"])
    sessions = server.runtime.sessions
    live = sessions.peek(sid)
    assert live is not None and await sessions.sleep(live, idle_for=0)
    assert (
        live.state == "asleep"
        and (await server.client.get(f"/api/sessions/{sid}")).json()["status"] == "stopped"
    )
    started: list[str] = []

    async def count(up: LiveSession) -> None:
        started.append(up.id)

    sessions.on_sandbox.append(count)
    codes = await asyncio.gather(*(shell(server, sid) for _ in range(RACERS)))
    assert codes == [200] * RACERS and started == [sid] and live.state == "running"
    assert (await server.client.get(f"/api/sessions/{sid}")).json()["status"] == "active"


async def test_stop_hooks_run_for_idleness_and_for_deletion(server: RunningServer) -> None:
    sessions = server.runtime.sessions
    heard: list[tuple[str, str, str]] = []

    async def hook(live: LiveSession, reason: str) -> None:
        heard.append((live.id, reason, live.state))  # before the sandbox stops: still usable

    sessions.on_stop.append(hook)
    sid = str((await server.create_session(task="hooks"))["session_id"])
    live = sessions.peek(sid)
    assert live is not None and await sessions.sleep(live, idle_for=0)
    assert (await server.client.delete(f"/api/sessions/{sid}")).status_code == 200
    assert heard == [(sid, "idle", "running"), (sid, "deleted", "deleting")]


def test_only_the_listed_transitions_exist() -> None:
    assert MOVES["gone"] == frozenset() and MOVES["deleting"] == {"gone"}
    assert all("deleting" in targets for state, targets in MOVES.items() if state not in ("deleting", "gone"))
    assert all("creating" not in targets and "dormant" not in targets for targets in MOVES.values())
