"""Background processes through a real server: stopping one records `stopped`, whatever order the
daemon's exit notice and its reply to `terminate` arrive in."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import make_settings
from tests.support.server import RunningServer, run_server


@pytest.fixture
async def server(data_dir: Path, backend: str) -> AsyncIterator[RunningServer]:
    async with run_server(make_settings(data_dir, backend, sandbox_pool_size=0)) as running:
        yield running


async def test_a_stopped_process_is_stopped_even_when_its_exit_notice_is_recorded_first(
    server: RunningServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = server.runtime
    sid = str((await server.create_session(task="stop"))["session_id"])
    live = await runtime.sessions.live(sid, tenant=None)
    terminate = live.sandbox.terminate

    async def exit_recorded_first(pid: int, *, grace: float) -> int | None:
        code = await terminate(pid, grace=grace)
        await runtime.processes.close()  # the exit notice (sent before the reply) is recorded by now
        return code

    monkeypatch.setattr(live.sandbox, "terminate", exit_recorded_first)
    base = f"/api/sessions/{sid}/processes"
    pid = (await server.client.post(base, json={"cmd": "sleep 300"})).json()["pid"]
    stopped = await server.client.post(f"{base}/{pid}/stop")
    assert stopped.status_code == 200, stopped.text
    listed = {p["pid"]: p for p in (await server.client.get(base)).json()}
    assert listed[pid]["status"] == "stopped"
    await runtime.bus.flush()
    sub = await runtime.bus.subscribe(sid)
    ends = []
    async for _seq, data in sub:
        if '"process_exited"' in data:
            ends.append(data)
        if sub.last_seq >= runtime.bus.last_seq(sid):
            break
    assert len(ends) == 1 and '"status":"stopped"' in ends[0]


async def test_a_session_keeps_no_lock_once_its_processes_are_done(server: RunningServer) -> None:
    """The per-session lock (start, exit, stop take turns) lives only while someone holds it: a
    server that has seen a million sessions' processes holds none of their locks."""
    runtime = server.runtime
    sid = str((await server.create_session())["session_id"])
    base = f"/api/sessions/{sid}/processes"
    sub = await runtime.bus.subscribe(sid)
    started = await server.client.post(base, json={"cmd": "true"})
    assert started.status_code == 200, started.text
    try:
        async with asyncio.timeout(30):
            async for _seq, data in sub:
                if '"process_exited"' in data:
                    break
    finally:
        sub.close("test done")
    await runtime.processes.close()  # every exit recorded
    gc.collect()
    assert sid not in runtime.processes._locks
