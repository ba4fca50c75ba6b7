"""user links (OpenID Connect issuer and subject per user) and pending SSO logins

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28 15:00:00
"""

import sqlalchemy as sa
from alembic import op

import stockade.server.db.models

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_TIME = stockade.server.db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "user_links",
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("login_type", sa.String(length=16), nullable=False),
        sa.Column("issuer", sa.String(length=512), nullable=False),
        sa.Column("subject", sa.String(length=255), nullable=False),
        sa.Column("claims", sa.JSON(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("user_id", "login_type"),
    )
    with op.batch_alter_table("user_links", schema=None) as batch_op:
        batch_op.create_index("uq_user_links_issuer_subject", ["issuer", "subject"], unique=True)
    op.create_table(
        "oidc_login_states",
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("nonce", sa.String(length=128), nullable=False),
        sa.Column("code_verifier", sa.String(length=128), nullable=False),
        sa.Column("redirect", sa.String(length=2048), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("state_hash"),
    )
    with op.batch_alter_table("oidc_login_states", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_oidc_login_states_expires_at"), ["expires_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("oidc_login_states", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_oidc_login_states_expires_at"))
    op.drop_table("oidc_login_states")
    with op.batch_alter_table("user_links", schema=None) as batch_op:
        batch_op.drop_index("uq_user_links_issuer_subject")
    op.drop_table("user_links")
