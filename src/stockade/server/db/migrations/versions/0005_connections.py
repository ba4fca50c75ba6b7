"""workspace ssh host keys, connections, agent stream stats

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 21:20:00
"""

import sqlalchemy as sa
from alembic import op

import stockade.server.db.models

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workspace_agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stats", sa.JSON(), nullable=True))

    op.create_table(
        "workspace_ssh_keys",
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("algorithm", sa.String(length=32), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("encrypted_private_key", sa.Text(), nullable=False),
        sa.Column(
            "created_at", stockade.server.db.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("workspace_id"),
    )
    op.create_table(
        "workspace_connections",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("workspace_id", sa.String(length=36), nullable=False),
        sa.Column("agent_id", sa.String(length=16), nullable=True),
        sa.Column("user_id", sa.String(length=36), nullable=True),
        sa.Column("username", sa.String(length=64), nullable=True),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=128), nullable=True),
        sa.Column("ip", sa.String(length=64), nullable=True),
        sa.Column("user_agent", sa.String(length=256), nullable=True),
        sa.Column(
            "opened_at", stockade.server.db.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column("closed_at", stockade.server.db.models.UTCDateTime(timezone=True), nullable=True),
        sa.Column("bytes_to_workspace", sa.BigInteger(), nullable=False),
        sa.Column("bytes_from_workspace", sa.BigInteger(), nullable=False),
        sa.Column("close_code", sa.Integer(), nullable=True),
        sa.Column("close_reason", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(["workspace_id"], ["workspaces.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("workspace_connections", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_workspace_connections_workspace_id"), ["workspace_id"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("workspace_connections", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workspace_connections_workspace_id"))
    op.drop_table("workspace_connections")
    op.drop_table("workspace_ssh_keys")
    with op.batch_alter_table("workspace_agents", schema=None) as batch_op:
        batch_op.drop_column("stats")
