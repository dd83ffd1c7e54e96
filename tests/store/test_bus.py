"""The event bus: stored before seen, replay then live with no gap or duplicate, slow clients cut off."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text

from crogia.bus import EventBus, SubscriptionClosed
from crogia.events import TextDelta
from crogia.store import Database, repo
from tests.store.test_store import add_session


async def collect(sub, n: int) -> list[dict]:  # type: ignore[no-untyped-def]
    out = []
    async for _seq, data in sub:
        out.append(json.loads(data))
        if len(out) == n:
            break
    return out


async def test_events_are_stored_before_delivery_and_seq_grows(db: Database) -> None:
    await add_session(db)
    bus = EventBus(db)
    bus.start()
    try:
        sub = await bus.subscribe("s1", after=0)
        for i in range(5):
            await bus.publish("s1", TextDelta(content=str(i), task_id="t"))
        got = await asyncio.wait_for(collect(sub, 5), 5)
        async with db.session() as s:
            stored = await repo.max_event_seq(s, session_id="s1")
    finally:
        await bus.close()
    assert [e["seq"] for e in got] == [1, 2, 3, 4, 5]
    assert [e["content"] for e in got] == ["0", "1", "2", "3", "4"]
    assert (
        got[0]["type"] == "text_delta" and got[0]["session_id"] == "s1" and got[0]["timestamp"].endswith("Z")
    )
    assert stored == 5


async def test_replay_then_live_without_gap_or_duplicate(db: Database) -> None:
    await add_session(db)
    bus = EventBus(db)
    bus.start()
    try:
        for i in range(3000):
            await bus.publish("s1", TextDelta(content=str(i)))
        await bus.flush()

        async def keep_publishing() -> None:
            for i in range(3000, 4000):
                await bus.publish("s1", TextDelta(content=str(i)))
                if i % 100 == 0:
                    await asyncio.sleep(0)

        producer = asyncio.create_task(keep_publishing())
        sub = await bus.subscribe("s1", after=1500)
        got = await asyncio.wait_for(collect(sub, 2500), 20)
        await producer
    finally:
        await bus.close()
    assert [e["seq"] for e in got] == list(range(1501, 4001))


async def test_seq_continues_after_restart(db: Database) -> None:
    await add_session(db)
    bus = EventBus(db)
    bus.start()
    await bus.publish("s1", TextDelta(content="a"))
    await bus.close()
    again = EventBus(db)
    again.start()
    try:
        assert await again.publish("s1", TextDelta(content="b")) == 2
    finally:
        await again.close()


async def test_slow_subscriber_is_closed_with_reason_and_others_unaffected(db: Database) -> None:
    await add_session(db)
    bus = EventBus(db, client_queue=50, batch=10)
    bus.start()
    try:
        slow = await bus.subscribe("s1", after=0)
        fast = await bus.subscribe("s1", after=0)
        reader = asyncio.create_task(collect(fast, 200))
        for i in range(200):
            await bus.publish("s1", TextDelta(content=str(i)))
            if i % 10 == 0:
                await asyncio.sleep(0)
        got = await asyncio.wait_for(reader, 10)
        with pytest.raises(SubscriptionClosed, match="since="):
            await collect(slow, 200)
    finally:
        await bus.close()
    assert len(got) == 200


async def test_event_text_is_the_model_plus_stamps_for_every_kind(db: Database) -> None:
    """The JSON text is spliced from pydantic's serializer; it must equal the plain model dump."""
    from crogia.events import (
        ErrorEvent,
        ProcessExited,
        ProcessStarted,
        TaskCancelled,
        TaskCompleted,
        TaskFailed,
        TaskStarted,
        ToolCall,
        ToolComplete,
    )

    await add_session(db)
    samples = [
        TaskStarted(task="fix ünïcödé 🚀", task_id="t1"),
        TextDelta(content='quote " backslash \\ newline \n tab \t'),
        ToolCall(tool_name="shell", arguments='{"cmd": "ls"}', call_id="c1", task_id="t1"),
        ToolComplete(tool_name="shell", output="x" * 5000, call_id="c1", is_error=True),
        TaskCompleted(task="t", usage={"prompt_tokens": 3, "completion_tokens": 4}),
        TaskFailed(task="t", message="boom"),
        TaskCancelled(task="t"),
        ErrorEvent(message="bad"),
        ProcessStarted(pid=7, cmd="sleep 1", log="/tmp/x.log"),
        ProcessExited(pid=7, exit_code=None, status="stopped"),
        TextDelta(content="lone \ud800 surrogate from a model"),
    ]
    bus = EventBus(db)
    bus.start()
    try:
        sub = await bus.subscribe("s1", after=0)
        for event in samples:
            await bus.publish("s1", event)
        got = await asyncio.wait_for(collect(sub, len(samples)), 5)
        await bus.flush()
        async with db.session() as s:
            stored = await repo.events_between(s, session_id="s1", after=0, upto=100, limit=100)
    finally:
        await bus.close()
    assert [json.loads(data) for _, data in stored] == got
    for seq, (event, sent) in enumerate(zip(samples, got, strict=True), start=1):
        assert list(sent)[:4] == ["type", "session_id", "seq", "timestamp"]
        assert sent["seq"] == seq and sent["session_id"] == "s1"
        stamps = {"session_id", "seq", "timestamp"}
        assert {k: v for k, v in sent.items() if k not in stamps} == event.model_dump(exclude_none=True)


async def test_a_deleted_sessions_late_events_do_not_cost_the_others_theirs(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    """A batch holding events of a session deleted meanwhile fails as a whole; the rest is still stored."""
    await add_session(db, "s1")
    await add_session(db, "s2")
    bus = EventBus(db)  # the writer starts later, so both sessions' events share one batch
    try:
        for i in range(3):
            await bus.publish("s1", TextDelta(content=f"a{i}"))
            await bus.publish("s2", TextDelta(content=f"b{i}"))
        async with db.transaction() as s:
            await repo.delete_session(s, session_id="s2")
        bus.drop_session("s2")
        late = await bus.publish("s2", TextDelta(content="after the delete"))
        bus.start()
        await bus.flush()
        async with db.session() as s:
            stored = await repo.events_between(s, session_id="s1", after=0, upto=100, limit=100)
            gone = await repo.max_event_seq(s, session_id="s2")
    finally:
        await bus.close()
    assert [json.loads(data)["content"] for _, data in stored] == ["a0", "a1", "a2"]
    assert late == 0 and gone == 0
    assert "could not be stored" not in caplog.text  # expected losses are not warnings


async def test_a_batch_is_stored_again_after_the_database_was_locked(
    data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds SQLite's write lock past busy_timeout: the batch is stored later, not lost."""
    import sqlite3
    import threading

    path = data_dir / "locked.db"
    db = Database(f"sqlite+aiosqlite:///{path}")
    await db.migrate()
    await add_session(db)
    await impatient(db)
    bus = EventBus(db)
    bus.start()
    locked, release = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")
        locked.set()
        release.wait(30)
        other.execute("ROLLBACK")
        other.close()

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        await asyncio.to_thread(locked.wait, 10)
        sub = await bus.subscribe("s1", after=0)
        for i in range(3):
            await bus.publish("s1", TextDelta(content=str(i)))
        await until(lambda: bus.store_failures >= 2)  # locked past busy_timeout, twice
        release.set()
        got = await asyncio.wait_for(collect(sub, 3), 10)
    finally:
        release.set()
        await asyncio.to_thread(holder.join)
        await bus.close()
        await db.close()
    assert [e["content"] for e in got] == ["0", "1", "2"]
    assert "retrying" in caplog.text and "cannot be stored" not in caplog.text
    assert bus.store_failures == 0 and bus.store_error is None


async def test_no_event_is_lost_while_the_store_is_down_for_long(data_dir: Path) -> None:
    """Past DOWN_AFTER the store counts as down (health, 503 for tasks); every event waits, in order."""
    db = Database(f"sqlite+aiosqlite:///{data_dir / 'down.db'}")
    await db.migrate()
    await add_session(db)
    bus = EventBus(db)
    bus.down_after = 0.3
    bus.start()
    try:
        await bus.publish("s1", TextDelta(content="0"))
        await bus.flush()
        sub = await bus.subscribe("s1", after=0)
        async with db.engine.begin() as conn:  # SQLite: "no such table", an OperationalError
            await conn.execute(text("ALTER TABLE events RENAME TO events_away"))
        for i in range(1, 6):
            await bus.publish("s1", TextDelta(content=str(i)))
        await until(lambda: bus.store_error is not None)
        assert sub.pending() == 0  # nothing is handed out before it is stored
        async with db.engine.begin() as conn:
            await conn.execute(text("ALTER TABLE events_away RENAME TO events"))
        got = await asyncio.wait_for(collect(sub, 6), 10)
        await until(lambda: bus.store_error is None)
        async with db.session() as s:
            stored = await repo.events_between(s, session_id="s1", after=0, upto=100, limit=100)
    finally:
        await bus.close()
        await db.close()
    assert [e["content"] for e in got] == [str(i) for i in range(6)]
    assert [seq for seq, _ in stored] == list(range(1, 7))  # no gap


async def impatient(db: Database) -> None:
    """SQLite connections that wait 0.2 s for a lock instead of 5 s (the test waits less)."""

    def pragma(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA busy_timeout=200")
        cursor.close()

    event.listen(db.engine.sync_engine, "connect", pragma)
    await db.engine.dispose()


async def until(condition: Callable[[], bool], within: float = 20) -> None:
    """Wait for `condition` to hold, checking every 10 ms; AssertionError after `within` seconds."""
    for _ in range(int(within * 100)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the condition never held")
