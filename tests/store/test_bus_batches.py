"""The bus's fast paths keep their promises: batched takes stay in order, timestamps stay exact."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

from crogia.bus import EventBus
from crogia.events import TextDelta
from crogia.store import Database
from tests.store.test_store import add_session


async def test_take_ready_hands_over_queued_events_in_order_once(db: Database) -> None:
    await add_session(db)
    bus = EventBus(db)
    bus.start()
    try:
        sub = await bus.subscribe("s1", after=0)
        for i in range(50):
            await bus.publish("s1", TextDelta(content=str(i), task_id="t"))
        await bus.flush()
        first = await asyncio.wait_for(anext(sub), 5)
        rest = sub.take_ready(limit=30)
        more = sub.take_ready()
        assert sub.take_ready() == [] and sub.pending() == 0
        for i in range(50, 53):
            await bus.publish("s1", TextDelta(content=str(i), task_id="t"))
        await bus.flush()
        late = await asyncio.wait_for(anext(sub), 5)
    finally:
        await bus.close()
    seqs = [first[0]] + [json.loads(data)["seq"] for data in rest + more] + [late[0]]
    assert seqs == list(range(1, 52)) and len(rest) == 30
    assert [json.loads(data)["content"] for data in rest[:3]] == ["1", "2", "3"]


async def test_take_ready_gives_nothing_while_stored_events_are_replayed(db: Database) -> None:
    await add_session(db)
    bus = EventBus(db)
    bus.start()
    try:
        for i in range(5):
            await bus.publish("s1", TextDelta(content=str(i), task_id="t"))
        await bus.flush()
        sub = await bus.subscribe("s1", after=0)
        await bus.publish("s1", TextDelta(content="live", task_id="t"))
        await bus.flush()
        assert sub.take_ready() == []  # seq 6 must wait for 1-5 from the store
        got = [await asyncio.wait_for(anext(sub), 5) for _ in range(6)]
    finally:
        await bus.close()
    assert [seq for seq, _ in got] == [1, 2, 3, 4, 5, 6]


async def test_timestamps_are_the_current_millisecond_in_utc(db: Database) -> None:
    await add_session(db)
    bus = EventBus(db)
    bus.start()
    try:
        sub = await bus.subscribe("s1", after=0)
        before = datetime.now(UTC)
        for _ in range(3):
            await bus.publish("s1", TextDelta(content="x", task_id="t"))
            await asyncio.sleep(0.002)
        after = datetime.now(UTC)
        got = [json.loads((await asyncio.wait_for(anext(sub), 5))[1]) for _ in range(3)]
    finally:
        await bus.close()
    stamps = [datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")) for event in got]
    assert all(stamp.tzinfo is not None for stamp in stamps)
    assert before.replace(microsecond=before.microsecond // 1000 * 1000) <= stamps[0] <= stamps[-1] <= after
    assert stamps[0] < stamps[-1]  # a new millisecond gets a new text
