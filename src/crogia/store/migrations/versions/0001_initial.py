"""Initial schema: sessions, tasks, events, messages, processes.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

from crogia.store.tables import UTCDateTime

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant", sa.String(128), nullable=False, index=True),
        sa.Column("label", sa.Text, nullable=False),
        sa.Column("last_task", sa.Text, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("sandbox_backend", sa.String(32), nullable=False),
        sa.Column("sandbox_id", sa.String(128), nullable=False),
        sa.Column("image", sa.String(256), nullable=False),
        sa.Column("env", sa.JSON, nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.Column("last_activity", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("session_id", sa.String(64), sa.ForeignKey("sessions.id", ondelete="CASCADE"), index=True),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("usage", sa.JSON, nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.Column("started", UTCDateTime(), nullable=True),
        sa.Column("ended", UTCDateTime(), nullable=True),
    )
    op.create_table(
        "events",
        sa.Column(
            "session_id",
            sa.String(64),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
        sa.Column("type", sa.String(64), nullable=False),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("data", sa.Text, nullable=False),
    )
    op.create_table(
        "messages",
        sa.Column(
            "session_id",
            sa.String(64),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("idx", sa.Integer, primary_key=True),
        sa.Column("task_id", sa.String(64), nullable=True),
        sa.Column("message", sa.JSON, nullable=False),
    )
    op.create_table(
        "processes",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("session_id", sa.String(64), sa.ForeignKey("sessions.id", ondelete="CASCADE")),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("cmd", sa.Text, nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("log", sa.Text, nullable=False),
        sa.Column("exit_code", sa.Integer, nullable=True),
        sa.Column("started", UTCDateTime(), nullable=False),
        sa.Column("ended", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_processes_session_pid", "processes", ["session_id", "pid"])


def downgrade() -> None:
    for table in ("processes", "messages", "events", "tasks", "sessions"):
        op.drop_table(table)
