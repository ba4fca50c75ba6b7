"""AI bridge: its request records, the workspace-scoped bridge keys, and the
agent's encrypted bridge token

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-28 20:00:00
"""

import sqlalchemy as sa
from alembic import op

import stockade.server.db.models

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_TIME = stockade.server.db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "aibridge_interceptions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("workspace_id", sa.String(length=36), nullable=True),
        sa.Column("workspace_name", sa.String(length=64), nullable=True),
        sa.Column("provider", sa.String(length=16), nullable=False),
        sa.Column("endpoint", sa.String(length=32), nullable=False),
        sa.Column("model", sa.String(length=255), nullable=False),
        sa.Column("streamed", sa.Boolean(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=True),
        sa.Column("tool_calls", sa.JSON(), nullable=False),
        sa.Column("input_tokens", sa.BigInteger(), nullable=False),
        sa.Column("output_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_read_tokens", sa.BigInteger(), nullable=False),
        sa.Column("cache_write_tokens", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("latency_ms", sa.Integer(), nullable=False),
        sa.Column("first_byte_ms", sa.Integer(), nullable=True),
        sa.Column("request_id", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("aibridge_interceptions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_aibridge_interceptions_created_at"), ["created_at"], unique=False
        )
        batch_op.create_index(
            "ix_aibridge_interceptions_user_created", ["user_id", "created_at"], unique=False
        )
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.add_column(sa.Column("workspace_id", sa.String(length=36), nullable=True))
        batch_op.create_index(batch_op.f("ix_api_keys_workspace_id"), ["workspace_id"])
        batch_op.create_foreign_key(
            "fk_api_keys_workspace_id", "workspaces", ["workspace_id"], ["id"], ondelete="CASCADE"
        )
    with op.batch_alter_table("workspace_agents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("encrypted_aibridge_token", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workspace_agents", schema=None) as batch_op:
        batch_op.drop_column("encrypted_aibridge_token")
    with op.batch_alter_table("api_keys", schema=None) as batch_op:
        batch_op.drop_constraint("fk_api_keys_workspace_id", type_="foreignkey")
        batch_op.drop_index(batch_op.f("ix_api_keys_workspace_id"))
        batch_op.drop_column("workspace_id")
    with op.batch_alter_table("aibridge_interceptions", schema=None) as batch_op:
        batch_op.drop_index("ix_aibridge_interceptions_user_created")
        batch_op.drop_index(batch_op.f("ix_aibridge_interceptions_created_at"))
    op.drop_table("aibridge_interceptions")
