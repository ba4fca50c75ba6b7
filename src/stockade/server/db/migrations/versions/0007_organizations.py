"""organizations, groups and template ACLs

Every existing template and workspace moves into a new default organization,
and every existing template keeps being usable by everyone (an ACL entry for
the default organization's "everyone" group), so nothing changes for users
until an admin narrows a template's ACL.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28 13:45:00
"""

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

import stockade.server.db.models

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_TIME = stockade.server.db.models.UTCDateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "organizations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("is_default", sa.Boolean(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "organization_members",
        sa.Column("organization_id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("roles", sa.JSON(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("organization_id", "user_id"),
    )
    op.create_index(
        "ix_organization_members_user_id", "organization_members", ["user_id"], unique=False
    )
    op.create_table(
        "groups",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("organization_id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("display_name", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["organization_id"], ["organizations.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_groups_organization_id", "groups", ["organization_id"], unique=False)
    op.create_index(
        "uq_groups_organization_name", "groups", ["organization_id", "name"], unique=True
    )
    op.create_table(
        "group_members",
        sa.Column("group_id", sa.String(length=36), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["group_id"], ["groups.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["user_id"], ["users.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("group_id", "user_id"),
    )
    op.create_index("ix_group_members_user_id", "group_members", ["user_id"], unique=False)
    for kind, column, target in (("user", "user_id", "users"), ("group", "group_id", "groups")):
        op.create_table(
            f"template_{kind}_acl",
            sa.Column("template_id", sa.String(length=36), nullable=False),
            sa.Column(column, sa.String(length=36), nullable=False),
            sa.Column("role", sa.String(length=8), nullable=False),
            sa.ForeignKeyConstraint(["template_id"], ["templates.id"], ondelete="CASCADE"),
            sa.ForeignKeyConstraint([column], [f"{target}.id"], ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("template_id", column),
        )
        op.create_index(
            f"ix_template_{kind}_acl_{column}", f"template_{kind}_acl", [column], unique=False
        )

    # The default organization; its "everyone" group shares its id.
    org_id = str(uuid.uuid4())
    now = datetime.now(UTC)
    organizations = sa.table(
        "organizations",
        sa.column("id", sa.String),
        sa.column("name", sa.String),
        sa.column("display_name", sa.String),
        sa.column("description", sa.Text),
        sa.column("is_default", sa.Boolean),
        sa.column("created_at", _TIME),
        sa.column("updated_at", _TIME),
    )
    op.bulk_insert(
        organizations,
        [
            {
                "id": org_id,
                "name": "default",
                "display_name": "Default",
                "description": "Every user is a member of this organization.",
                "is_default": True,
                "created_at": now,
                "updated_at": now,
            }
        ],
    )
    groups = sa.table(
        "groups",
        sa.column("id", sa.String),
        sa.column("organization_id", sa.String),
        sa.column("name", sa.String),
        sa.column("display_name", sa.String),
        sa.column("source", sa.String),
        sa.column("created_at", _TIME),
        sa.column("updated_at", _TIME),
    )
    op.bulk_insert(
        groups,
        [
            {
                "id": org_id,
                "organization_id": org_id,
                "name": "everyone",
                "display_name": "Everyone",
                "source": "everyone",
                "created_at": now,
                "updated_at": now,
            }
        ],
    )

    for table in ("templates", "workspaces"):
        with op.batch_alter_table(table) as batch_op:
            batch_op.add_column(sa.Column("organization_id", sa.String(length=36), nullable=True))
        op.execute(sa.text(f"UPDATE {table} SET organization_id = :org").bindparams(org=org_id))  # noqa: S608
    # SQLite names the old UNIQUE(name) nothing; the naming convention lets
    # batch mode find it. PostgreSQL named it templates_name_key.
    sqlite = op.get_bind().dialect.name == "sqlite"
    with op.batch_alter_table(
        "templates",
        naming_convention={"uq": "uq_%(table_name)s_%(column_0_name)s"},
    ) as batch_op:
        batch_op.drop_constraint("uq_templates_name" if sqlite else "templates_name_key", "unique")
        batch_op.alter_column("organization_id", existing_type=sa.String(length=36), nullable=False)
        batch_op.create_foreign_key(
            "fk_templates_organization_id", "organizations", ["organization_id"], ["id"]
        )
        batch_op.create_index("ix_templates_organization_id", ["organization_id"], unique=False)
        batch_op.create_index(
            "uq_templates_organization_name", ["organization_id", "name"], unique=True
        )
    with op.batch_alter_table("workspaces") as batch_op:
        batch_op.alter_column("organization_id", existing_type=sa.String(length=36), nullable=False)
        batch_op.create_foreign_key(
            "fk_workspaces_organization_id", "organizations", ["organization_id"], ["id"]
        )
        batch_op.create_index("ix_workspaces_organization_id", ["organization_id"], unique=False)
    op.execute(
        sa.text(
            "INSERT INTO template_group_acl (template_id, group_id, role) "
            "SELECT id, :org, 'use' FROM templates"
        ).bindparams(org=org_id)
    )


def downgrade() -> None:
    with op.batch_alter_table("workspaces") as batch_op:
        batch_op.drop_index("ix_workspaces_organization_id")
        batch_op.drop_constraint("fk_workspaces_organization_id", "foreignkey")
        batch_op.drop_column("organization_id")
    with op.batch_alter_table("templates") as batch_op:
        batch_op.drop_index("uq_templates_organization_name")
        batch_op.drop_index("ix_templates_organization_id")
        batch_op.drop_constraint("fk_templates_organization_id", "foreignkey")
        batch_op.drop_column("organization_id")
        batch_op.create_unique_constraint("templates_name_key", ["name"])
    for table in ("template_group_acl", "template_user_acl", "group_members", "groups"):
        op.drop_table(table)
    op.drop_table("organization_members")
    op.drop_table("organizations")
