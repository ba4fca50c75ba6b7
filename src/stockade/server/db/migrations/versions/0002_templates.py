"""templates and their immutable versions

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

import stockade.server.db.models

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "templates",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("icon", sa.String(length=512), nullable=True),
        sa.Column("backend", sa.String(length=16), nullable=False),
        sa.Column("active_version_id", sa.String(length=36), nullable=True),
        sa.Column(
            "archived_at", stockade.server.db.models.UTCDateTime(timezone=True), nullable=True
        ),
        sa.Column("created_by", sa.String(length=36), nullable=False),
        sa.Column(
            "created_at", stockade.server.db.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.Column(
            "updated_at", stockade.server.db.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "template_versions",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("template_id", sa.String(length=36), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("archive", sa.LargeBinary(), nullable=False),
        sa.Column("archive_sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("message", sa.String(length=1024), nullable=False),
        sa.Column("created_by", sa.String(length=36), nullable=False),
        sa.Column(
            "created_at", stockade.server.db.models.UTCDateTime(timezone=True), nullable=False
        ),
        sa.ForeignKeyConstraint(["template_id"], ["templates.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("template_versions", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_template_versions_template_id"), ["template_id"], unique=False
        )
        batch_op.create_index(
            "uq_template_versions_template_number", ["template_id", "number"], unique=True
        )


def downgrade() -> None:
    with op.batch_alter_table("template_versions", schema=None) as batch_op:
        batch_op.drop_index("uq_template_versions_template_number")
        batch_op.drop_index(batch_op.f("ix_template_versions_template_id"))
    op.drop_table("template_versions")
    op.drop_table("templates")
