"""Repository functions: the only place that writes SQL. Keyword-only on purpose."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from crogia.store.tables import (
    SANDBOX_DRIVEN_SQL,
    ContextViewRow,
    EventRow,
    MessageRow,
    ProcessRow,
    SessionRow,
    TaskRow,
    utcnow,
)

# --- sessions ---


async def get_session(db: AsyncSession, *, session_id: str, tenant: str | None = None) -> SessionRow | None:
    row = await db.get(SessionRow, session_id)
    if row is None or (tenant is not None and row.tenant != tenant):
        return None
    return row


async def list_sessions(db: AsyncSession, *, tenant: str | None = None) -> Sequence[SessionRow]:
    query = select(SessionRow).order_by(SessionRow.created)
    if tenant is not None:
        query = query.where(SessionRow.tenant == tenant)
    return (await db.scalars(query)).all()


async def count_sessions(db: AsyncSession, *, tenant: str) -> tuple[int, int]:
    """(sessions on this server, sessions of `tenant`), stopped ones included."""
    mine = func.count().filter(SessionRow.tenant == tenant)
    total, own = (await db.execute(select(func.count(), mine).select_from(SessionRow))).one()
    return int(total), int(own)


async def touch_session(db: AsyncSession, *, session_id: str, **values: Any) -> None:
    values.setdefault("last_activity", utcnow())
    await db.execute(update(SessionRow).where(SessionRow.id == session_id).values(**values))


async def delete_session(db: AsyncSession, *, session_id: str) -> None:
    # Explicit child deletes: SQLite enforces ON DELETE CASCADE only with the pragma, PostgreSQL always.
    for table in (EventRow, MessageRow, ContextViewRow, ProcessRow, TaskRow):
        await db.execute(delete(table).where(table.session_id == session_id))
    await db.execute(delete(SessionRow).where(SessionRow.id == session_id))


# --- tasks ---


async def list_tasks(db: AsyncSession, *, session_id: str) -> Sequence[TaskRow]:
    query = select(TaskRow).where(TaskRow.session_id == session_id).order_by(TaskRow.created, TaskRow.id)
    return (await db.scalars(query)).all()


async def get_task(db: AsyncSession, *, session_id: str, task_id: str) -> TaskRow | None:
    row = await db.get(TaskRow, task_id)
    return row if row is not None and row.session_id == session_id else None


async def update_task(db: AsyncSession, *, task_id: str, **values: Any) -> None:
    await db.execute(update(TaskRow).where(TaskRow.id == task_id).values(**values))


async def unfinished_tasks(db: AsyncSession) -> Sequence[TaskRow]:
    query = select(TaskRow).where(TaskRow.status.in_(("queued", "running"))).order_by(TaskRow.created)
    return (await db.scalars(query)).all()


# --- events ---


async def max_event_seq(db: AsyncSession, *, session_id: str) -> int:
    value = await db.scalar(select(func.max(EventRow.seq)).where(EventRow.session_id == session_id))
    return int(value or 0)


_EVENT_COLUMNS = ("session_id", "seq", "type", "task_id", "data")


@functools.cache
def _insert_events_sql(paramstyle: str) -> str:
    def mark(n: int) -> str:
        return {"qmark": "?", "numeric_dollar": f"${n}", "numeric": f":{n}"}.get(paramstyle, "%s")

    marks = ", ".join(mark(n) for n in range(1, len(_EVENT_COLUMNS) + 1))
    return f"INSERT INTO events ({', '.join(_EVENT_COLUMNS)}) VALUES ({marks})"


async def insert_events(db: AsyncSession, *, rows: Sequence[tuple[str, int, str, str | None, str]]) -> None:
    """Rows of (session_id, seq, type, task_id, data), handed to the driver's executemany as they are.

    The bus stores tens of thousands of events a second; a Core `insert()` spends ~3 us per row
    building parameters on the event loop's thread, a driver-level statement almost nothing.
    """
    connection = await db.connection()
    await connection.exec_driver_sql(_insert_events_sql(connection.dialect.paramstyle), list(rows))


async def events_between(
    db: AsyncSession, *, session_id: str, after: int, upto: int, limit: int
) -> Sequence[tuple[int, str]]:
    query = (
        select(EventRow.seq, EventRow.data)
        .where(EventRow.session_id == session_id, EventRow.seq > after, EventRow.seq <= upto)
        .order_by(EventRow.seq)
        .limit(limit)
    )
    return [(seq, data) for seq, data in (await db.execute(query)).all()]


_TRIM_SQL = text(
    f"DELETE FROM events WHERE session_id = :session_id AND {SANDBOX_DRIVEN_SQL} AND seq < ("
    f"SELECT seq FROM events WHERE session_id = :session_id AND {SANDBOX_DRIVEN_SQL} "
    "ORDER BY seq DESC LIMIT 1 OFFSET :skip)"
)


async def trim_sandbox_events(db: AsyncSession, *, session_id: str, keep: int) -> int:
    """Delete the session's sandbox-driven events but the newest `keep`; how many went.

    Both halves walk the partial index `ix_events_sandbox_driven`: the newest `keep` of those rows,
    then the older ones; the session's other events are never read.
    """
    result = await db.execute(_TRIM_SQL, {"session_id": session_id, "skip": keep - 1})
    return int(getattr(result, "rowcount", 0) or 0)


# --- conversation ---


async def conversation(db: AsyncSession, *, session_id: str) -> list[dict[str, Any]]:
    query = select(MessageRow.message).where(MessageRow.session_id == session_id).order_by(MessageRow.idx)
    return list((await db.scalars(query)).all())


async def message_count(db: AsyncSession, *, session_id: str) -> int:
    value = await db.scalar(select(func.count()).where(MessageRow.session_id == session_id))
    return int(value or 0)


async def append_messages(
    db: AsyncSession, *, session_id: str, task_id: str | None, start: int, messages: list[dict[str, Any]]
) -> None:
    if not messages:
        return
    rows = [
        {"session_id": session_id, "idx": start + i, "task_id": task_id, "message": message}
        for i, message in enumerate(messages)
    ]
    await db.execute(insert(MessageRow), rows)


async def context_view(db: AsyncSession, *, session_id: str) -> tuple[list[dict[str, Any]], int]:
    """(head, covers) of the session's compacted view; ([], 0) when it was never compacted."""
    row = await db.get(ContextViewRow, session_id)
    return ([], 0) if row is None else (list(row.head), row.covers)


async def set_context_view(
    db: AsyncSession, *, session_id: str, head: list[dict[str, Any]], covers: int
) -> None:
    row = await db.get(ContextViewRow, session_id)
    if row is None:
        db.add(ContextViewRow(session_id=session_id, head=head, covers=covers))
    else:
        row.head, row.covers = head, covers


async def task_usages(db: AsyncSession, *, session_id: str) -> list[dict[str, Any]]:
    """The `usage` of every task of the session (for the session's total)."""
    return list((await db.scalars(select(TaskRow.usage).where(TaskRow.session_id == session_id))).all())


# --- processes ---


async def add_process(db: AsyncSession, *, session_id: str, pid: int, cmd: str, log: str) -> ProcessRow:
    row = ProcessRow(session_id=session_id, pid=pid, cmd=cmd, log=log, status="running", started=utcnow())
    db.add(row)
    await db.flush()
    return row


async def list_processes(db: AsyncSession, *, session_id: str) -> Sequence[ProcessRow]:
    query = select(ProcessRow).where(ProcessRow.session_id == session_id).order_by(ProcessRow.id)
    return (await db.scalars(query)).all()


async def get_process(db: AsyncSession, *, session_id: str, pid: int) -> ProcessRow | None:
    query = (
        select(ProcessRow)
        .where(ProcessRow.session_id == session_id, ProcessRow.pid == pid)
        .order_by(ProcessRow.id.desc())
        .limit(1)
    )
    return (await db.scalars(query)).first()


async def finish_process(
    db: AsyncSession, *, process_id: int, status: str, exit_code: int | None, ended: datetime | None = None
) -> bool:
    """Mark a running process ended; False when it had already ended (the first writer wins)."""
    values = {"status": status, "exit_code": exit_code, "ended": ended or utcnow()}
    query = (
        update(ProcessRow).where(ProcessRow.id == process_id, ProcessRow.status == "running").values(**values)
    )
    result = await db.execute(query)
    return bool(getattr(result, "rowcount", 0))
