"""egress destinations: the egress guard's report

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28 04:30:00
"""

import sqlalchemy as sa
from alembic import op

import stockade.server.db.models

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "egress_destinations",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("component", sa.String(length=80), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("destination", sa.String(length=255), nullable=False),
        sa.Column("port", sa.Integer(), nullable=False),
        sa.Column("allowed", sa.Boolean(), nullable=False),
        sa.Column("reason", sa.String(length=128), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.Column(
            "first_seen", stockade.server.db.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "last_seen", stockade.server.db.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "component", "kind", "destination", "port", "allowed", name="uq_egress_destination"
        ),
    )


def downgrade() -> None:
    op.drop_table("egress_destinations")
