"""Alembic environment: runs on the connection Crogia hands over (see `Database.migrate`)."""

from __future__ import annotations

from alembic import context

from crogia.store.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("Crogia runs its migrations in-process; use `crogia db upgrade` or start the server.")

context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
