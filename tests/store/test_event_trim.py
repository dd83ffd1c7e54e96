"""Sandbox-driven events (`egress_blocked`, `port_*`) are kept per session only as the newest N.

Each kind is rate-limited where it starts, but a rate is not a total: a long-lived sandbox that
keeps knocking on a refused address makes one event a second for as long as it lives. The store
keeps a session's newest `keep_sandbox_events` of those kinds, never touches the other kinds, and
finds what to delete through a partial index, not by reading the session's other events.
"""

from __future__ import annotations

import json

from sqlalchemy import text

from crogia.bus import EventBus
from crogia.events import SANDBOX_DRIVEN, EgressBlocked, PortClosed, PortOpened, TextDelta
from crogia.store import Database, repo
from tests.store.test_store import add_session


async def stored(db: Database, session_id: str) -> list[tuple[int, str, str]]:
    async with db.session() as s:
        rows = await s.execute(
            text("SELECT seq, type, data FROM events WHERE session_id = :s ORDER BY seq"), {"s": session_id}
        )
        return [(seq, kind, data) for seq, kind, data in rows.all()]


async def test_only_the_newest_sandbox_events_are_kept_and_the_agents_all(db: Database) -> None:
    await add_session(db, "s1")
    await add_session(db, "s2")
    bus = EventBus(db, batch=7, keep_sandbox_events=50)  # small batches: trims fall between them
    bus.start()
    try:
        for i in range(400):
            await bus.publish("s1", EgressBlocked(destination=f"10.0.0.{i % 250}:80"))
            await bus.publish("s1", PortOpened(port=1000 + i) if i % 2 else PortClosed(port=1000 + i))
            if i % 4 == 0:
                await bus.publish("s1", TextDelta(content=str(i), task_id="t"))
        for i in range(30):  # another session's own 30 are under the cap: all stay
            await bus.publish("s2", PortOpened(port=2000 + i))
        await bus.flush()
    finally:
        await bus.close()

    rows = await stored(db, "s1")
    noisy = [(seq, kind) for seq, kind, _ in rows if kind in SANDBOX_DRIVEN]
    agents = [json.loads(data)["content"] for _, kind, data in rows if kind == "text_delta"]
    assert agents == [str(i) for i in range(0, 400, 4)]  # every one, in order
    assert 50 <= len(noisy) <= 55, len(noisy)  # at most a tenth of the cap above it
    published_last = 900  # 400 * 2 sandbox events + 100 deltas: the newest seq is 900
    assert noisy[-1][0] == published_last
    newest = [seq for seq, kind, _ in reversed(rows) if kind in SANDBOX_DRIVEN][: len(noisy)]
    assert sorted(newest) == [seq for seq, _ in noisy]  # what is left is the newest, no hole among them
    assert len(await stored(db, "s2")) == 30


async def test_a_restarted_bus_trims_at_a_sessions_first_sandbox_event(db: Database) -> None:
    """Counts since the last trim live in memory: a restart must not let them start from nothing."""
    await add_session(db)
    first = EventBus(db, keep_sandbox_events=1000)
    first.start()
    try:
        for i in range(300):
            await first.publish("s1", PortOpened(port=i + 1))
        await first.flush()
    finally:
        await first.close()
    assert len(await stored(db, "s1")) == 300

    second = EventBus(db, keep_sandbox_events=100)  # restarted with a smaller cap
    second.start()
    try:
        await second.publish("s1", EgressBlocked(destination="10.1.2.3:443"))
        await second.flush()
    finally:
        await second.close()
    rows = await stored(db, "s1")
    assert len(rows) == 100
    assert rows[-1][:2] == (301, "egress_blocked") and rows[0][0] == 202


async def test_the_trim_reads_only_the_partial_index(db: Database) -> None:
    """The delete finds its rows through `ix_events_sandbox_driven` on both databases (the query
    repeats the index's predicate as literal SQL: a bound parameter would not match it)."""
    await add_session(db)
    async with db.transaction() as s:
        await repo.insert_events(
            s,
            rows=[("s1", n, "text_delta" if n % 3 else "port_opened", None, "{}") for n in range(1, 3001)],
        )
    explain = "EXPLAIN QUERY PLAN " if db.is_sqlite else "EXPLAIN "
    query = text(explain + repo._TRIM_SQL.text)  # the very statement the bus runs, planned not run
    async with db.transaction() as s:
        if not db.is_sqlite:
            await s.execute(text("SET LOCAL enable_seqscan = off"))
            await s.execute(text("ANALYZE events"))
        rows = (await s.execute(query, {"session_id": "s1", "skip": 9})).all()
        plan = " ".join(str(row[-1]) for row in rows)
        gone = await repo.trim_sandbox_events(s, session_id="s1", keep=10)
    assert "ix_events_sandbox_driven" in plan, plan
    assert gone == 1000 - 10
    assert len(await stored(db, "s1")) == 2000 + 10
