"""Trimming sandbox-driven events: a partial index over a session's `egress_blocked` /
`port_opened` / `port_closed` rows, so finding the oldest of them to delete never walks the
session's other events and costs the other kinds' inserts nothing.

Revision ID: 0004_event_trim
Revises: 0003_h_egress
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_event_trim"
down_revision = "0003_h_egress"
branch_labels = None
depends_on = None

KINDS = "type IN ('egress_blocked', 'port_opened', 'port_closed')"


def upgrade() -> None:
    op.create_index(
        "ix_events_sandbox_driven",
        "events",
        ["session_id", "seq"],
        sqlite_where=sa.text(KINDS),
        postgresql_where=sa.text(KINDS),
    )


def downgrade() -> None:
    op.drop_index("ix_events_sandbox_driven", table_name="events")
