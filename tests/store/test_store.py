"""The store on SQLite and PostgreSQL: migrations, sessions, conversation, processes, events."""

from __future__ import annotations

import asyncio
from datetime import UTC

import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from crogia.store import Database, repo
from crogia.store.db import alembic_config
from crogia.store.tables import SessionRow, TaskRow


async def add_session(db: Database, session_id: str = "s1", tenant: str = "alice") -> None:
    async with db.transaction() as s:
        s.add(SessionRow(id=session_id, tenant=tenant, label="demo", sandbox_backend="bubblewrap"))


async def test_migrations_are_idempotent(db: Database) -> None:
    await db.migrate()
    async with db.session() as s:
        version = await s.scalar(text("SELECT version_num FROM alembic_version"))
    # The newest revision: every migration ran (their chain is the lead's to keep linear).
    assert version == ScriptDirectory.from_config(alembic_config()).get_current_head()


async def test_session_roundtrip_keeps_utc_and_tenant(db: Database) -> None:
    await add_session(db)
    async with db.session() as s:
        row = await repo.get_session(s, session_id="s1", tenant="alice")
        other = await repo.get_session(s, session_id="s1", tenant="bob")
        listed = await repo.list_sessions(s, tenant="bob")
    assert row is not None and row.label == "demo"
    assert row.created.tzinfo is UTC
    assert other is None and list(listed) == []


async def test_conversation_appends_in_order(db: Database) -> None:
    await add_session(db)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello ünïcode"}]
    async with db.transaction() as s:
        await repo.append_messages(s, session_id="s1", task_id="t1", start=0, messages=messages[:1])
    async with db.transaction() as s:
        await repo.append_messages(s, session_id="s1", task_id="t1", start=1, messages=messages[1:])
    async with db.session() as s:
        assert await repo.conversation(s, session_id="s1") == messages


async def test_process_finish_only_once(db: Database) -> None:
    await add_session(db)
    async with db.transaction() as s:
        row = await repo.add_process(s, session_id="s1", pid=42, cmd="sleep 9", log="/run/crogia/logs/42.log")
    async with db.transaction() as s:
        first = await repo.finish_process(s, process_id=row.id, status="stopped", exit_code=143)
    async with db.transaction() as s:
        second = await repo.finish_process(s, process_id=row.id, status="exited", exit_code=0)
    async with db.session() as s:
        stored = await repo.get_process(s, session_id="s1", pid=42)
    assert (first, second) == (True, False)
    assert stored is not None and (stored.status, stored.exit_code) == ("stopped", 143)


async def test_delete_session_removes_children(db: Database) -> None:
    await add_session(db)
    async with db.transaction() as s:
        s.add(TaskRow(id="t1", session_id="s1", task="x", status="queued", usage={}))
        await repo.insert_events(s, rows=[("s1", 1, "x", None, "{}")])
    async with db.transaction() as s:
        await repo.delete_session(s, session_id="s1")
    async with db.session() as s:
        assert await repo.max_event_seq(s, session_id="s1") == 0
        assert list(await repo.list_tasks(s, session_id="s1")) == []


@pytest.mark.parametrize("count", [1, 2500])
async def test_events_between_pages(db: Database, count: int) -> None:
    await add_session(db)
    rows = [("s1", i, "t", None, str(i)) for i in range(1, count + 1)]
    async with db.transaction() as s:
        await repo.insert_events(s, rows=rows)
    async with db.session() as s:
        page = await repo.events_between(s, session_id="s1", after=0, upto=count, limit=1000)
        assert await repo.max_event_seq(s, session_id="s1") == count
    assert [seq for seq, _ in page] == list(range(1, min(count, 1000) + 1))


async def test_write_transactions_take_turns_and_refuse_nesting(db: Database) -> None:
    """On SQLite, writers queue on one lock (no busy-handler starvation); nesting would deadlock."""
    await add_session(db)

    async def touch(label: str) -> None:
        async with db.transaction() as s:
            await repo.touch_session(s, session_id="s1", last_task=label)
            await asyncio.sleep(0.01)  # a slow step while holding SQLite's write lock

    await asyncio.gather(*(touch(f"t{i}") for i in range(50)))
    async with db.session() as s:
        row = await repo.get_session(s, session_id="s1")
    assert row is not None  # none failed with "database is locked"
    if db.is_sqlite:
        assert row.last_task == "t49"  # they took their turns in order
        with pytest.raises(RuntimeError, match="re-entrant"):
            async with db.transaction(), db.transaction():
                pass
