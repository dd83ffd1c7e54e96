from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import text

from crogia.store import Database
from crogia.store.tables import Base


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, data_dir: Path) -> AsyncIterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{data_dir / 'test.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    database = Database(url)
    await database.migrate()
    yield database
    if request.param == "postgres":
        async with database.engine.begin() as conn:
            tables = [table.name for table in reversed(Base.metadata.sorted_tables)]
            for table in (*tables, "alembic_version"):
                await conn.execute(text(f"DROP TABLE IF EXISTS {table} CASCADE"))
    await database.close()
