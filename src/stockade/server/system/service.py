"""The deployment's health, as ``/api/v2/debug/health`` reports it, and the
rest of what an owner reads on the deployment page: the build queue, the
workers that took builds (built-in ones of every replica and ``stockade
provisionerd`` daemons), provisioner keys in use, the connected agents, and
the effective settings with every secret masked.

Everything here reads the database as every replica sees it, except the
built-in workers and background jobs, which are this process's own.
"""

from __future__ import annotations

import time
import types as pytypes
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from pydantic import SecretStr
from pydantic.fields import FieldInfo
from sqlalchemy import case, func, select

import stockade
from stockade.sdk import types
from stockade.server.authz import Actor, Perm, authorize, can
from stockade.server.db import User, migrate
from stockade.server.db.models import Workspace, WorkspaceAgent, WorkspaceBuild, utcnow
from stockade.server.provisioning.service import BUILT_IN_MARK
from stockade.server.settings import Settings

if TYPE_CHECKING:
    from stockade.server.services import Services

# Builds a worker took this long ago or less count as "seen" on the page.
WORKERS_SEEN_WITHIN = timedelta(hours=24)
# A running provisionerd authenticates at least once a minute (its long poll
# is at most 30 s and the key's last use is written once a minute).
KEY_ACTIVE_WITHIN = timedelta(minutes=3)
MAX_AGENTS_LISTED = 200
_UNFINISHED = ("pending", "running", "canceling")


async def health(services: Services) -> types.Health:
    """Database reachability and latency, migration state, background jobs,
    the built-in build workers and the orphans the reconciler last removed."""
    started = time.perf_counter()
    database: dict[str, object] = {"dialect": services.db.dialect, **services.db.pool_status()}
    try:
        await services.db.ping()
        database["ok"] = True
        database["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
        current = await migrate.current_revision(services.db)
    except Exception as exc:  # report, don't fail: this is the page you read when it's broken
        database["ok"] = False
        database["error"] = type(exc).__name__
        current = None
    head = migrate.head_revision()
    workers = services.background.status()
    provisioners = services.provisioner.status()
    healthy = (
        bool(database["ok"])
        and current == head
        and all(w["alive"] for w in workers.values())
        and provisioners["alive"] == provisioners["built_in"]
    )
    return types.Health(
        status="ok" if healthy else "degraded",
        database=database,
        migrations={"current": current, "head": head, "up_to_date": current == head},
        workers=workers,
        provisioners=provisioners,
        version=stockade.__version__,
        replicas=await services.replicas.list() if database["ok"] else [],
        relay={
            "enabled": services.relay is not None,
            "connected": bool(services.relay and services.relay.connected),
            "received": services.notifier.received,
            "messages_received": services.notifier.messages_received,
            "hops": services.connections.hops.counts(),
        },
    )


@dataclass
class QueueLine:
    """Unfinished builds of one backend."""

    backend: str
    pending: int
    running: int  # running or canceling: a worker holds them
    oldest_pending: datetime | None


@dataclass
class WorkerSeen:
    """A worker that took builds recently (any replica's, or a provisionerd)."""

    name: str
    built_in: bool
    builds: int
    running: int
    last_started_at: datetime | None


@dataclass
class ProvisionerKeyUse:
    key: types.ProvisionerKey
    active: bool  # used within KEY_ACTIVE_WITHIN: a daemon runs with it


@dataclass
class ConnectedAgent:
    owner: str
    workspace: str
    agent: types.WorkspaceAgent


@dataclass
class Deployment:
    """What the deployment page shows."""

    health: types.Health
    deployment_id: str
    queue: list[QueueLine]
    workers: list[WorkerSeen]
    keys: list[ProvisionerKeyUse]
    agents: list[ConnectedAgent]
    agents_connected: int  # may exceed len(agents): the list is capped


async def deployment(services: Services, actor: Actor) -> Deployment:
    """The deployment page's content; ``deployment.read`` (owners)."""
    authorize(actor, Perm.DEPLOYMENT_READ, owner_id=None, kind="deployment")
    keys: list[ProvisionerKeyUse] = []
    if can(actor, Perm.PROVISIONER_ADMIN):
        now = utcnow()
        keys = [
            ProvisionerKeyUse(
                key,
                key.last_used_at is not None and now - key.last_used_at <= KEY_ACTIVE_WITHIN,
            )
            for key in (await services.provisioning.list_keys(actor)).keys
        ]
    agents, connected = await _connected_agents(services)
    return Deployment(
        health=await health(services),
        deployment_id=await services.provisioning.deployment_id(),
        queue=await _queue(services),
        workers=await _workers(services),
        keys=keys,
        agents=agents,
        agents_connected=connected,
    )


async def _queue(services: Services) -> list[QueueLine]:
    pending = WorkspaceBuild.status == "pending"
    query = (
        select(
            WorkspaceBuild.backend,
            func.count(case((pending, 1))),
            func.count(case((~pending, 1))),
            func.min(case((pending, WorkspaceBuild.created_at))),
        )
        .where(WorkspaceBuild.status.in_(_UNFINISHED))
        .group_by(WorkspaceBuild.backend)
        .order_by(WorkspaceBuild.backend)
    )
    async with services.db.session() as session:
        rows = (await session.execute(query)).all()
    return [QueueLine(b, int(p), int(r), oldest) for b, p, r, oldest in rows]


async def _workers(services: Services) -> list[WorkerSeen]:
    running = WorkspaceBuild.status.in_(("running", "canceling"))
    query = (
        select(
            WorkspaceBuild.worker_name,
            func.count(),
            func.count(case((running, 1))),
            func.max(WorkspaceBuild.started_at),
        )
        .where(
            WorkspaceBuild.worker_name.is_not(None),
            WorkspaceBuild.started_at >= utcnow() - WORKERS_SEEN_WITHIN,
        )
        .group_by(WorkspaceBuild.worker_name)
        .order_by(WorkspaceBuild.worker_name)
    )
    async with services.db.session() as session:
        rows = (await session.execute(query)).all()
    return [
        WorkerSeen(str(name), BUILT_IN_MARK in str(name), int(count), int(busy), last)
        for name, count, busy, last in rows
    ]


async def _connected_agents(services: Services) -> tuple[list[ConnectedAgent], int]:
    connected = (
        WorkspaceAgent.revoked_at.is_(None),
        WorkspaceAgent.last_connected_at.is_not(None),
        WorkspaceAgent.disconnected_at.is_(None),
        Workspace.deleted.is_(False),
    )
    listed = (
        select(Workspace.id, Workspace.name, User.username)
        .join(WorkspaceAgent, WorkspaceAgent.workspace_id == Workspace.id)
        .join(User, User.id == Workspace.owner_id)
        .where(*connected)
    )
    async with services.db.session() as session:
        total = (
            await session.execute(select(func.count()).select_from(listed.subquery()))
        ).scalar_one()
        rows = (
            await session.execute(
                listed.order_by(User.username, Workspace.name).limit(MAX_AGENTS_LISTED)
            )
        ).all()
        views = await services.agents.views(session, [row.id for row in rows])
    agents = [
        ConnectedAgent(row.username, row.name, views[row.id])
        for row in rows
        if row.id in views and views[row.id].status == "connected"
    ]
    return agents, int(total)


# --- effective settings ----------------------------------------------------------------

MASK = "\u2022\u2022\u2022"
# A text setting whose name has one of these words holds a secret...
SECRET_WORDS = frozenset({"key", "secret", "password", "passwd", "token", "credential"})
# ...and these are secrets whatever they come to be called.
SECRET_SETTINGS = frozenset({"audit_key"})

# How the page groups settings; a setting missing here lands in "Other".
SETTING_GROUPS: dict[str, tuple[str, ...]] = {
    "Network and URLs": (
        "address", "access_url", "agent_url", "trusted_proxies", "secure_cookies",
        "tls_cert_file", "tls_key_file", "agent_ca_file",
    ),
    "Database and storage": ("data_dir", "postgres_url", "db_pool_size"),
    "Sign-in and tokens": (
        "session_lifetime_seconds", "max_token_lifetime_seconds",
        "default_token_lifetime_seconds", "login_rate_per_ip", "login_failures_per_user",
    ),
    "Single sign-on (OIDC)": (
        "oidc_issuer_url", "oidc_client_id", "oidc_client_secret", "oidc_scopes",
        "oidc_username_field", "oidc_email_field", "oidc_email_domains", "oidc_allow_signups",
        "oidc_sign_in_text", "oidc_ca_file", "oidc_ignore_email_verified",
        "disable_password_auth_for_oidc_users", "oidc_group_field", "oidc_group_mapping",
        "oidc_group_regex_filter", "oidc_group_auto_create", "oidc_user_role_field",
        "oidc_user_role_mapping",
    ),
    "Audit log": ("audit_key", "audit_retention_days"),
    "Builds and provisioners": (
        "provisioner_workers", "provisioner_backends", "build_timeout_seconds",
        "job_lease_seconds", "reconcile_interval_seconds", "local_allow_unsandboxed",
        "docker_host", "docker_network",
    ),
    "Workspace apps": (
        "wildcard_access_url", "max_app_share_level", "dangerous_allow_path_app_sharing",
        "app_token_lifetime_seconds",
    ),
    "Logging": ("log_level", "log_json"),
}  # fmt: skip


@dataclass
class SettingView:
    name: str
    env: str  # the environment variable that sets it
    value: str  # what the page shows: a secret is only ever "••• set" or "not set"
    is_set: bool
    secret: bool
    hint: str  # a duration in words, for settings in seconds or days
    default: bool  # the value is the built-in default
    help: str


def _holds_text(annotation: Any) -> bool:
    """Whether a field's type can hold text (a path, number or flag never
    holds a secret itself, whatever its name)."""
    if annotation in (str, SecretStr):
        return True
    if get_origin(annotation) in (Union, pytypes.UnionType):
        return any(_holds_text(arg) for arg in get_args(annotation))
    return False


def is_secret(name: str, field: FieldInfo, value: object) -> bool:
    if name in SECRET_SETTINGS or isinstance(value, SecretStr):
        return True
    return bool(SECRET_WORDS & set(name.split("_"))) and _holds_text(field.annotation)


def mask_url_password(text: str) -> str:
    """``scheme://user:•••@host/...``: a URL's password never shows."""
    if "://" not in text:
        return text
    try:
        parts = urlsplit(text)
        password = parts.password
    except ValueError:
        return MASK + " set"  # unparseable: could hold anything
    if not password:
        return text
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username or ''}:{MASK}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _show(value: object, *, secret: bool) -> str:
    if value is None or value == "" or (isinstance(value, SecretStr) and not len(value)):
        return "not set"
    if secret:
        return f"{MASK} set"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Path):
        return str(value)
    return mask_url_password(str(value))


def human_seconds(seconds: float) -> str:
    """``90`` -> ``1 min 30 s``; ``86400`` -> ``1 d``."""
    rest, parts = int(seconds), []
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60), ("s", 1)):
        if rest >= size:
            parts.append(f"{rest // size} {unit}")
            rest %= size
    return " ".join(parts[:2]) or f"{seconds:g} s"


def _hint(name: str, value: object) -> str:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return ""
    if name.endswith("_seconds") and value >= 60:
        return human_seconds(value)
    if name.endswith("_days"):
        return f"{value} day{'s' if value != 1 else ''}"
    return ""


def _default_of(field: FieldInfo) -> object:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return field.default


def effective_settings(settings: Settings) -> list[tuple[str, list[SettingView]]]:
    """Every setting with its value and help text, grouped, secrets masked."""
    views: dict[str, SettingView] = {}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        secret = is_secret(name, field, value)
        views[name] = SettingView(
            name=name,
            env=f"STOCKADE_{name.upper()}",
            value=_show(value, secret=secret),
            is_set=_show(value, secret=False) != "not set",
            hint=_hint(name, value),
            secret=secret,
            default=value == _default_of(field),
            help=field.description or "",
        )
    groups: list[tuple[str, list[SettingView]]] = []
    for title, names in SETTING_GROUPS.items():
        members = [views.pop(n) for n in names if n in views]
        if members:
            groups.append((title, members))
    if views:
        groups.append(("Other", list(views.values())))
    return groups
