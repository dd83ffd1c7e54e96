"""Tables. Every timestamp is stored as UTC and read back timezone-aware."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from crogia.events import SANDBOX_DRIVEN

SANDBOX_DRIVEN_SQL = "type IN ({})".format(", ".join(f"'{kind}'" for kind in SANDBOX_DRIVEN))
"""The trimmed kinds as literal SQL: a partial index is used only for a query whose WHERE repeats
its own predicate with the same constants (neither SQLite nor PostgreSQL matches bound parameters)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """SQLite drops time zones; store naive UTC everywhere and hand back aware datetimes."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON(), list[Any]: JSON()}  # noqa: RUF012


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(128), index=True)
    label: Mapped[str] = mapped_column(Text, default="")
    last_task: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(32), default="active")
    sandbox_backend: Mapped[str] = mapped_column(String(32))
    sandbox_id: Mapped[str] = mapped_column(String(128), default="")
    image: Mapped[str] = mapped_column(String(256), default="")
    env: Mapped[dict[str, Any]] = mapped_column(default=dict)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)
    network: Mapped[dict[str, Any] | None] = mapped_column(JSON(), default=None, nullable=True)
    """The egress policy (`crogia.sandbox.egress.EgressPolicy.to_json`); None: the default."""
    created: Mapped[datetime] = mapped_column(default=utcnow)
    last_activity: Mapped[datetime] = mapped_column(default=utcnow)


class TaskRow(Base):
    __tablename__ = "tasks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    task: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(32), default="queued")
    error: Mapped[str | None] = mapped_column(Text, default=None)
    usage: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created: Mapped[datetime] = mapped_column(default=utcnow)
    started: Mapped[datetime | None] = mapped_column(default=None)
    ended: Mapped[datetime | None] = mapped_column(default=None)


class EventRow(Base):
    __tablename__ = "events"

    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    data: Mapped[str] = mapped_column(Text)
    """The event exactly as sent to clients (JSON text, stamps included)."""

    __table_args__ = (
        Index(
            "ix_events_sandbox_driven",
            "session_id",
            "seq",
            sqlite_where=text(SANDBOX_DRIVEN_SQL),
            postgresql_where=text(SANDBOX_DRIVEN_SQL),
        ),
    )


class MessageRow(Base):
    __tablename__ = "messages"

    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True)
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[str | None] = mapped_column(String(64), default=None)
    message: Mapped[dict[str, Any]] = mapped_column()


class ContextViewRow(Base):
    """The compacted form of a session's conversation the agent sends its model (one per session).

    `head` stands for the first `covers` rows of `messages`; the view is `head` + the rest.
    """

    __tablename__ = "context_views"

    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"), primary_key=True)
    covers: Mapped[int] = mapped_column(Integer, default=0)
    head: Mapped[list[Any]] = mapped_column(default=list)


class ProcessRow(Base):
    __tablename__ = "processes"
    __table_args__ = (Index("ix_processes_session_pid", "session_id", "pid"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    pid: Mapped[int] = mapped_column(Integer)
    cmd: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(32), default="running")
    log: Mapped[str] = mapped_column(Text, default="")
    exit_code: Mapped[int | None] = mapped_column(Integer, default=None)
    started: Mapped[datetime] = mapped_column(default=utcnow)
    ended: Mapped[datetime | None] = mapped_column(default=None)
