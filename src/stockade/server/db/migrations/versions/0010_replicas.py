"""Replicas: each running server process registers and heartbeats here

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-29 05:20:00
"""

import sqlalchemy as sa
from alembic import op

import stockade.server.db.models

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_TIME = stockade.server.db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("hostname", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("address", sa.String(length=255), nullable=False),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("heartbeat_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("replicas")
