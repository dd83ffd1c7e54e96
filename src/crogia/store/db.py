"""Engine, sessions and migrations for SQLite (embedded default) or PostgreSQL (asyncpg)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (event replay) run while the writer appends; cascades need foreign_keys.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


class Database:
    """Owns the engine; `session()` hands out short-lived ORM sessions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            path = url.split(":///", 1)[1] if ":///" in url else ""
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {} if self.is_sqlite else {"pool_size": 10, "max_overflow": 20}
        self.engine: AsyncEngine = create_async_engine(url, **kwargs)
        if self.is_sqlite:
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        self._sessions = async_sessionmaker(self.engine, expire_on_commit=False)
        self._write_turns = asyncio.Lock() if self.is_sqlite else None
        self._writer: asyncio.Task[Any] | None = None
        """The task holding `_write_turns`."""

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self._sessions() as session:
            yield session

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncSession]:
        """A session in a transaction, committed at the end (rolled back on an exception).

        On SQLite, this process's write transactions take turns on one asyncio lock. SQLite has one
        writer at a time and leaves the others to a polling busy handler; with a hundred tasks
        starting at once on a busy loop, a waiter could starve past `busy_timeout` and fail with
        "database is locked" (seen in the load test). Queued on the lock, they wait in order instead.
        """
        if self._write_turns is None:
            async with self._sessions() as session, session.begin():
                yield session
            return
        me = asyncio.current_task()
        if self._writer is me:  # it would wait for itself forever
            raise RuntimeError("Database.transaction() is not re-entrant")
        async with self._write_turns:
            self._writer = me
            try:
                async with self._sessions() as session, session.begin():
                    yield session
            finally:
                self._writer = None

    async def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        async with self.engine.begin() as conn:
            await conn.run_sync(_upgrade)
        log.info("database schema is up to date (%s)", self.engine.url.render_as_string(hide_password=True))

    async def close(self) -> None:
        await self.engine.dispose()


def alembic_config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["connection"] = connection
    return cfg


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")
