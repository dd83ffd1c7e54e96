"""h-egress: sessions.network, the session's egress policy (`{"egress", "allow"}`; NULL: internet).

Revision ID: 0003_h_egress
Revises: 0002_h_agent
"""

import sqlalchemy as sa
from alembic import op

revision = "0003_h_egress"
down_revision = "0002_h_agent"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.add_column(sa.Column("network", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("network")
