"""Agents: the replica holding each agent's control connection

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-29 07:20:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workspace_agents") as batch:
        batch.add_column(sa.Column("replica_id", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workspace_agents") as batch:
        batch.drop_column("replica_id")
