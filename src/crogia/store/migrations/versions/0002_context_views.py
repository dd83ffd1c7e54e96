"""h-agent: context_views, the compacted conversation the agent sends its model.

Revision ID: 0002_h_agent
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_h_agent"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "context_views",
        sa.Column(
            "session_id",
            sa.String(64),
            sa.ForeignKey("sessions.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("covers", sa.Integer, nullable=False),
        sa.Column("head", sa.JSON, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("context_views")
