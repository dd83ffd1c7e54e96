"""Persistence: SQLAlchemy 2 (async) tables, repository functions and Alembic migrations."""

from crogia.store.db import Database

__all__ = ["Database"]
