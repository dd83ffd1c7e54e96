"""The event store away for long, through a real server: health says so, new tasks get 503, and
every event published meanwhile is stored once it is back, with no gap in `seq`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import text

from crogia.events import TextDelta
from crogia.store import repo
from tests.conftest import make_settings
from tests.support.server import RunningServer, run_server


async def until(condition: Callable[[], bool], within: float = 20) -> None:
    for _ in range(int(within * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")


async def move_events(server: RunningServer, src: str, dst: str) -> None:
    async with server.runtime.db.engine.begin() as conn:  # SQLite: "no such table", a transient error
        await conn.execute(text(f"ALTER TABLE {src} RENAME TO {dst}"))


async def test_health_and_new_tasks_say_the_store_is_down_and_no_event_is_lost(data_dir: Path) -> None:
    async with run_server(make_settings(data_dir, "bubblewrap")) as server:
        bus = server.runtime.bus
        bus.down_after = 0.2
        sid = str((await server.create_session(task="down"))["session_id"])
        await bus.publish(sid, TextDelta(content="before"))  # the session's seq is known from here on
        await bus.flush()
        await move_events(server, "events", "events_away")
        for i in range(3):
            await bus.publish(sid, TextDelta(content=str(i)))
        await until(lambda: bus.store_error is not None)
        health = (await server.client.get("/api/health")).json()
        task = await server.client.post(f"/api/sessions/{sid}/tasks", json={"task": "now?"})
        await move_events(server, "events_away", "events")
        await bus.flush()
        after = (await server.client.get("/api/health")).json()
        async with server.runtime.db.session() as db:
            stored = await repo.events_between(db, session_id=sid, after=0, upto=1000, limit=1000)
        published = bus.last_seq(sid)
    assert health["status"] == "degraded" and "no such table" in health["store_error"]
    assert task.status_code == 503 and "event store" in task.json()["detail"]
    assert after["status"] == "healthy" and after.get("store_error") is None
    seqs = [seq for seq, _ in stored]
    assert seqs == list(range(1, published + 1)) and sum('"text_delta"' in d for _, d in stored) == 4
