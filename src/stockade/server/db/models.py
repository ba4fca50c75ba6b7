"""Tables. The same models serve SQLite and PostgreSQL; every change to them
comes with an Alembic migration (a test compares the two)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both databases (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime stored; use an aware UTC datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class User(Base):
    __tablename__ = "users"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    username: Mapped[str] = mapped_column(String(32), unique=True)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    name: Mapped[str] = mapped_column(String(128), default="")
    hashed_password: Mapped[str | None] = mapped_column(Text)
    login_type: Mapped[str] = mapped_column(String(16), default="password")
    status: Mapped[str] = mapped_column(String(16), default="active")
    roles: Mapped[list[str]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime | None]


class SetupState(Base):
    """One row, inserted with the first user: its primary key makes first-user
    setup succeed exactly once even when two requests race."""

    __tablename__ = "setup_state"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_user_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    """A session (``login_type='password'``, sliding expiry) or an API token
    (``login_type='token'``, fixed expiry). The secret is stored as SHA-256:
    it is 128 random bits, so a slow hash would add latency and no safety."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    hashed_secret: Mapped[str] = mapped_column(String(64))
    user_id: Mapped[str] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    login_type: Mapped[str] = mapped_column(String(16))
    token_name: Mapped[str | None] = mapped_column(String(64))
    lifetime_seconds: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]
    ip_address: Mapped[str | None] = mapped_column(String(64))
    # login_type 'aibridge': the key a workspace's sessions call the AI bridge
    # with, good for nothing else, gone with the workspace's agent.
    workspace_id: Mapped[str | None] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )

    __table_args__ = (Index("uq_api_keys_user_token_name", "user_id", "token_name", unique=True),)


class UserLink(Base):
    """A user's identity at an external login provider: the OpenID Connect
    issuer and subject that sign in as this user, and the claims of its last
    login (no tokens)."""

    __tablename__ = "user_links"

    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    login_type: Mapped[str] = mapped_column(String(16), primary_key=True)
    issuer: Mapped[str] = mapped_column(String(512))
    subject: Mapped[str] = mapped_column(String(255))
    claims: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("uq_user_links_issuer_subject", "issuer", "subject", unique=True),)


class OidcLoginState(Base):
    """A single sign-on started and not yet finished: the browser holds the
    state, this row its nonce and PKCE verifier. Deleted when the callback
    uses it (so it works once, on any replica) or once expired."""

    __tablename__ = "oidc_login_states"

    state_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(128))
    code_verifier: Mapped[str] = mapped_column(String(128))
    redirect: Mapped[str] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class AuditEntry(Base):
    """One audit entry. ``hash`` covers every other column and ``prev_hash``,
    so editing, deleting or reordering rows breaks the chain."""

    __tablename__ = "audit_log"

    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    id: Mapped[str] = mapped_column(String(36), unique=True, default=new_id)
    time: Mapped[datetime] = mapped_column(index=True)
    user_id: Mapped[str | None] = mapped_column(String(36), index=True)
    username: Mapped[str | None] = mapped_column(String(64))
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    action: Mapped[str] = mapped_column(String(64), index=True)
    resource_type: Mapped[str | None] = mapped_column(String(32), index=True)
    resource_id: Mapped[str | None] = mapped_column(String(64))
    resource_name: Mapped[str | None] = mapped_column(String(128))
    diff: Mapped[dict[str, Any]] = mapped_column(default=dict)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    request_id: Mapped[str | None] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The chain's head (last seq and hash) and its anchor (the last purged
    entry). Appends lock this row, which serialises the chain on PostgreSQL
    replicas as well as on SQLite."""

    __tablename__ = "audit_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[str] = mapped_column(String(64))
    anchor_seq: Mapped[int] = mapped_column(BigInteger)
    anchor_hash: Mapped[str] = mapped_column(String(64))


class Organization(Base):
    """A tenant: templates and workspaces belong to one, and a user sees
    nothing of an organization it is not a member of. Every user is a member
    of the default organization (made by the migration) without a row."""

    __tablename__ = "organizations"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(32), unique=True)
    display_name: Mapped[str] = mapped_column(String(128), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    is_default: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class OrganizationMember(Base):
    """A member of a non-default organization, or an organization role
    (``org-admin``) held in any organization."""

    __tablename__ = "organization_members"

    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    roles: Mapped[list[str]] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Group(Base):
    """A named set of an organization's users. ``source`` says who manages
    its members: ``manual`` (admins), ``oidc`` (made by group sync) or
    ``everyone`` (every member of the organization, never stored)."""

    __tablename__ = "groups"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    organization_id: Mapped[str] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(128), default="")
    source: Mapped[str] = mapped_column(String(16), default="manual")
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("uq_groups_organization_name", "organization_id", "name", unique=True),)


class GroupMember(Base):
    __tablename__ = "group_members"

    group_id: Mapped[str] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TemplateUserAcl(Base):
    """A user's access to a template: ``use`` (see it, build workspaces from
    it) or ``admin`` (also push, activate, archive and change its ACL)."""

    __tablename__ = "template_user_acl"

    template_id: Mapped[str] = mapped_column(
        ForeignKey("templates.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[str] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(8))


class TemplateGroupAcl(Base):
    """A group's access to a template (``use`` or ``admin``)."""

    __tablename__ = "template_group_acl"

    template_id: Mapped[str] = mapped_column(
        ForeignKey("templates.id", ondelete="CASCADE"), primary_key=True
    )
    group_id: Mapped[str] = mapped_column(
        ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    role: Mapped[str] = mapped_column(String(8))


class Template(Base):
    """A named template; its content lives in immutable ``TemplateVersion``
    rows. Names are unique within an organization."""

    __tablename__ = "templates"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    display_name: Mapped[str] = mapped_column(String(128), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    icon: Mapped[str | None] = mapped_column(String(512))
    backend: Mapped[str] = mapped_column(String(16))
    # No foreign key: versions point at their template, and a cycle would
    # complicate inserts and deletes on both databases.
    active_version_id: Mapped[str | None] = mapped_column(String(36))
    archived_at: Mapped[datetime | None]
    created_by: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("uq_templates_organization_name", "organization_id", "name", unique=True),
    )


class TemplateVersion(Base):
    """One push: the archive as uploaded and its validated manifest. Never changed."""

    __tablename__ = "template_versions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    template_id: Mapped[str] = mapped_column(
        ForeignKey("templates.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    manifest: Mapped[dict[str, Any]] = mapped_column()
    archive: Mapped[bytes] = mapped_column(LargeBinary)
    archive_sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    message: Mapped[str] = mapped_column(String(1024), default="")
    created_by: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (
        Index("uq_template_versions_template_number", "template_id", "number", unique=True),
    )


class DeploymentInfo(Base):
    """One row: the deployment's id, made at the first start. Backends label
    what they create with it, so two deployments sharing a Docker host never
    reconcile away each other's workspaces."""

    __tablename__ = "deployment_info"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    deployment_id: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Replica(Base):
    """A running ``stockade server`` process on this database: it inserts its
    row at start, renews ``heartbeat_at`` while it runs, and removes it at a
    clean stop; rows whose heartbeat stopped are removed by the others."""

    __tablename__ = "replicas"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)


class Workspace(Base):
    """A workspace. What it is doing is its latest build; ``state`` is the
    JSON its backend returned from the last build that succeeded. Deleted
    workspaces keep their row (and builds) with ``deleted`` set, and free
    their name."""

    __tablename__ = "workspaces"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    owner_id: Mapped[str] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(32))
    # The template's organization, kept here so org-scoped lists need no join.
    organization_id: Mapped[str] = mapped_column(ForeignKey("organizations.id"), index=True)
    template_id: Mapped[str] = mapped_column(ForeignKey("templates.id"), index=True)
    # The version the latest start build used (an update moves it on).
    template_version_id: Mapped[str] = mapped_column(ForeignKey("template_versions.id"))
    backend: Mapped[str] = mapped_column(String(16))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[dict[str, Any]] = mapped_column(default=dict)
    deleted: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # What the reconciler last saw of the compute: running, stopped or missing.
    compute_status: Mapped[str | None] = mapped_column(String(16))
    compute_detail: Mapped[str | None] = mapped_column(String(256))
    compute_checked_at: Mapped[datetime | None]

    __table_args__ = (
        Index(
            "uq_workspaces_owner_name",
            "owner_id",
            "name",
            unique=True,
            sqlite_where=text("deleted = 0"),
            postgresql_where=text("deleted = false"),
        ),
    )


class WorkspaceBuild(Base):
    """One transition of a workspace (start, stop or delete), which is also
    its provisioner job: workers lease pending builds, heartbeat the lease and
    finish them. At most one build per workspace is unfinished."""

    __tablename__ = "workspace_builds"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    number: Mapped[int] = mapped_column(Integer)
    transition: Mapped[str] = mapped_column(String(8))
    # A restart is a stop build that queues a start build when it succeeds.
    then_start: Mapped[bool] = mapped_column(default=False)
    initiator_id: Mapped[str] = mapped_column(String(36))
    template_version_id: Mapped[str] = mapped_column(String(36))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    backend: Mapped[str] = mapped_column(String(16))
    # pending, running, canceling, succeeded, failed, canceled
    status: Mapped[str] = mapped_column(String(12), index=True)
    reason: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    stages: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # The job: who holds it and until when.
    worker_id: Mapped[str | None] = mapped_column(String(64))
    worker_name: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(default=False)

    __table_args__ = (
        Index("uq_workspace_builds_workspace_number", "workspace_id", "number", unique=True),
    )


class BuildLog(Base):
    """A line of a build's output, in order of ``id``."""

    __tablename__ = "build_logs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    build_id: Mapped[str] = mapped_column(
        ForeignKey("workspace_builds.id", ondelete="CASCADE"), index=True
    )
    time: Mapped[datetime] = mapped_column(default=utcnow)
    stage: Mapped[str] = mapped_column(String(128), default="")
    level: Mapped[str] = mapped_column(String(8), default="info")
    line: Mapped[str] = mapped_column(Text)


class ProvisionerKey(Base):
    """A key an external ``stockade provisionerd`` authenticates with; the
    secret is kept as SHA-256 (128 random bits), as for API keys."""

    __tablename__ = "provisioner_keys"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    hashed_secret: Mapped[str] = mapped_column(String(64))
    created_by: Mapped[str] = mapped_column(String(36))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None]


class WorkspaceAgent(Base):
    """The agent of one start build of a workspace. Its token (SHA-256 at
    rest, like API keys) is made when a worker takes the build and revoked at
    the next stop, delete or start."""

    __tablename__ = "workspace_agents"

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    build_id: Mapped[str] = mapped_column(String(36))
    hashed_token: Mapped[str] = mapped_column(String(64))
    lifecycle_state: Mapped[str] = mapped_column(String(16), default="created")
    version: Mapped[str | None] = mapped_column(String(64))
    hostname: Mapped[str | None] = mapped_column(String(255))
    os: Mapped[str | None] = mapped_column(String(64))
    arch: Mapped[str | None] = mapped_column(String(64))
    python: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    first_connected_at: Mapped[datetime | None]
    last_connected_at: Mapped[datetime | None]
    disconnected_at: Mapped[datetime | None]
    last_seen_at: Mapped[datetime | None]
    ready_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
    # The agent's own stream counters (open/total by kind, bytes), as last reported.
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The AI bridge token the agent gives its sessions (encrypted: the agent
    # gets it again at every reconnect, so it cannot be hashed).
    encrypted_aibridge_token: Mapped[str | None] = mapped_column(Text)
    # The replica (``replicas.id``) holding the agent's control connection
    # now; None while it is connected nowhere.
    replica_id: Mapped[str | None] = mapped_column(String(32))


class AgentLog(Base):
    """A line of an agent's startup script output, in order of ``id``."""

    __tablename__ = "agent_logs"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    agent_id: Mapped[str] = mapped_column(
        ForeignKey("workspace_agents.id", ondelete="CASCADE"), index=True
    )
    time: Mapped[datetime] = mapped_column(default=utcnow)
    line: Mapped[str] = mapped_column(Text)


class AgentMetadata(Base):
    """The latest value of one metadata item an agent collects."""

    __tablename__ = "agent_metadata"

    agent_id: Mapped[str] = mapped_column(
        ForeignKey("workspace_agents.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str | None] = mapped_column(Text)
    collected_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkspaceSSHKey(Base):
    """A workspace's SSH host key: made once, kept for the workspace's life,
    so ``known_hosts`` pins it across restarts and rebuilds. The private half
    is encrypted at rest (:mod:`stockade.server.secretbox`)."""

    __tablename__ = "workspace_ssh_keys"

    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), primary_key=True
    )
    algorithm: Mapped[str] = mapped_column(String(32))
    public_key: Mapped[str] = mapped_column(Text)
    encrypted_private_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WorkspaceConnection(Base):
    """One tunnel stream a user opened to a workspace (ssh, port, app, pty):
    who, from where, when, and the bytes each way once it closed."""

    __tablename__ = "workspace_connections"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    workspace_id: Mapped[str] = mapped_column(
        ForeignKey("workspaces.id", ondelete="CASCADE"), index=True
    )
    agent_id: Mapped[str | None] = mapped_column(String(16))
    user_id: Mapped[str | None] = mapped_column(String(36))
    username: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    # The port for port streams, the app's slug for app streams.
    target: Mapped[str | None] = mapped_column(String(128))
    ip: Mapped[str | None] = mapped_column(String(64))
    user_agent: Mapped[str | None] = mapped_column(String(256))
    opened_at: Mapped[datetime] = mapped_column(default=utcnow)
    closed_at: Mapped[datetime | None]
    bytes_to_workspace: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_from_workspace: Mapped[int] = mapped_column(BigInteger, default=0)
    close_code: Mapped[int | None]
    close_reason: Mapped[str | None] = mapped_column(String(256))


class EgressDestination(Base):
    """Outbound attempts of one kind by one component (the server, its build
    workers, a provisioner daemon, a workspace's agent) to one destination,
    with one decision: how many, first and last seen. The egress report."""

    __tablename__ = "egress_destinations"
    __table_args__ = (
        UniqueConstraint(
            "component", "kind", "destination", "port", "allowed", name="uq_egress_destination"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    # "server", "provisioner", "provisionerd:NAME" or "agent:WORKSPACE_ID".
    component: Mapped[str] = mapped_column(String(80))
    kind: Mapped[str] = mapped_column(String(16))  # connect | send | resolve
    destination: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)  # 0: a lookup without a port
    allowed: Mapped[bool]
    reason: Mapped[str] = mapped_column(String(128))
    count: Mapped[int] = mapped_column(BigInteger)
    first_seen: Mapped[datetime]
    last_seen: Mapped[datetime]


class AibridgeInterception(Base):
    """One request through the AI bridge: who (and from which workspace),
    which provider and model, the last user prompt, the tool calls the model
    asked for, token usage, latency and outcome. Kept after the user or the
    workspace is gone (their names are copied), purged by age."""

    __tablename__ = "aibridge_interceptions"
    __table_args__ = (Index("ix_aibridge_interceptions_user_created", "user_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    user_id: Mapped[str] = mapped_column(String(36))
    username: Mapped[str] = mapped_column(String(64))
    workspace_id: Mapped[str | None] = mapped_column(String(36))
    workspace_name: Mapped[str | None] = mapped_column(String(64))
    provider: Mapped[str] = mapped_column(String(16))  # openai | anthropic
    endpoint: Mapped[str] = mapped_column(String(32))  # chat.completions | responses | messages
    model: Mapped[str] = mapped_column(String(255))
    streamed: Mapped[bool]
    prompt: Mapped[str | None] = mapped_column(Text)
    tool_calls: Mapped[list[Any]] = mapped_column(JSON, default=list)
    input_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    output_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_read_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    cache_write_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    status: Mapped[int] = mapped_column(Integer)  # the HTTP status the caller got
    # completed | upstream_error | refused | cancelled | failed
    outcome: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(Text)
    latency_ms: Mapped[int] = mapped_column(Integer)
    first_byte_ms: Mapped[int | None] = mapped_column(Integer)
    request_id: Mapped[str | None] = mapped_column(String(64))
