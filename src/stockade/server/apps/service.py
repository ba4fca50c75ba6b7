"""Workspace apps: which app an address names, who may open it, the signed
app tokens of subdomain apps, app sessions (connection records and audit)
and the proxying itself (mechanics in :mod:`stockade.server.apps.proxy`).

Addresses. An app (a template's ``apps`` entry) or any port of a workspace is
served

- by path, on the dashboard's origin: ``/@USER/WORKSPACE/apps/SLUG/...`` and
  ``/@USER/WORKSPACE/ports/PORT/...``. The prefix is stripped: the app sees
  ``/...`` (after its URL's own path), with ``X-Forwarded-Prefix`` naming the
  prefix, so apps must use relative links (code-server, Jupyter and most
  dev servers do, or take a base-path option);
- by subdomain, on its own origin, when ``wildcard_access_url`` is set:
  ``SLUG--WORKSPACE--USER.apps.example.com`` (``PORT--WORKSPACE--USER`` for
  ports), with the path as it is.

Who may open it. An app's share level (owner, authenticated, public) is
capped by ``max_app_share_level``. Path apps run on the dashboard's origin,
where their scripts could use the visitor's Stockade session (same-origin
requests carry its cookie): so by path an app is only ever served to the
workspace's owner in person (not even to site owners), unless
``dangerous_allow_path_app_sharing``. Ports are owner-only (the owner, and
site owners by subdomain) and never shared. Whoever may not open an app gets
the same 404 as for one that does not exist.

Subdomain sign-in. The browser holds no session for an app's host. An app
request without a valid app cookie is redirected to
``ACCESS_URL/api/v2/applications/authorize?redirect_uri=...`` (where the
session cookie is), which checks access, opens the app session (audit) and
redirects back with a short-lived, single-use *redirect token* in the query;
the app host trades it for a *cookie token* (``app_token_lifetime_seconds``)
in a cookie scoped to that one host (HttpOnly, SameSite=Lax, Secure under
https) and redirects to the URL without it. Both tokens are HMAC-SHA256
signed with a key derived from the deployment secret (the audit key), and
name their purpose, the user, their session (API key), the host and an
expiry: a token is good for nothing else. The session behind a cookie token
is re-checked every ``KEY_RECHECK_SECONDS`` (logout, suspension, expiry end
app access within that time).

Audit. An *app session* is one user (or, for public apps, one anonymous IP)
using one app of one workspace: it is recorded once as a connection (kind
``app`` or ``port``, target the slug or port) with a ``workspace.connect``
audit entry when it starts (at the subdomain sign-in, or at the first
request), and closed with its bytes each way after ``SESSION_IDLE_SECONDS``
without a request. Recording each HTTP request instead would write hundreds
of entries per page load of an IDE.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote, urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from pydantic import ValidationError
from sqlalchemy import select
from starlette.websockets import WebSocket

from stockade.sdk import types
from stockade.sdk.templates import App, AppTarget, Manifest, app_target, workspace_apps
from stockade.server.agents.service import AgentService, PendingStream
from stockade.server.apps.proxy import AgentStream, Counters, Lease, StreamPool
from stockade.server.audit.service import AuditRecord, write_record
from stockade.server.auth.service import AuthService
from stockade.server.authz import Actor, Perm, actor_for, can
from stockade.server.connections.service import (
    ClientInfo,
    ConnectionService,
    StreamRefused,
    StreamTarget,
)
from stockade.server.db import Database
from stockade.server.db.models import (
    ApiKey,
    TemplateVersion,
    User,
    Workspace,
    WorkspaceAgent,
    utcnow,
)
from stockade.server.errors import InvalidInput, NotFound, StockadeError
from stockade.server.observability import get_logger
from stockade.server.orgs.access import may_read_workspace
from stockade.server.settings import Settings

log = get_logger("stockade.apps")

ShareLevel = Literal["owner", "authenticated", "public"]
_SHARE_ORDER: dict[str, int] = {"owner": 0, "authenticated": 1, "public": 2}

TOKEN_QUERY = "stockade_app_token"
APP_COOKIE = "stockade_app_token"
AUTHORIZE_PATH = "/api/v2/applications/authorize"
REDIRECT_TOKEN_SECONDS = 60
KEY_RECHECK_SECONDS = 30.0
RESOLVE_CACHE_SECONDS = 2.0
SESSION_IDLE_SECONDS = 600.0
_LABEL = re.compile(r"^[a-z0-9-]{1,63}$")
_PATH_ADDRESS = re.compile(
    r"^/@([a-z0-9-]{1,32})/([a-z0-9-]{1,32})/(apps|ports)/([a-z0-9-]{1,32})(/.*)?$"
)


class AppNotFound(NotFound):
    default_reason = "app_not_found"


class AppUnavailable(StockadeError):
    """The app exists but cannot be reached now (workspace stopped, agent
    away, port closed)."""

    status_code = 502
    default_reason = "app_unavailable"


def _not_found() -> AppNotFound:
    # One message for missing and forbidden alike: a denial leaks nothing.
    return AppNotFound("app not found (or you may not open it)", reason="app_not_found")


@dataclass(frozen=True)
class AppAddress:
    """What an address names: an app by slug or a port, of a workspace."""

    owner: str
    workspace: str
    slug: str | None = None
    port: int | None = None

    @property
    def label(self) -> str:
        return self.slug if self.slug is not None else str(self.port)

    @property
    def kind(self) -> str:
        """How its connections are recorded: app or port."""
        return "app" if self.slug is not None else "port"


@dataclass(frozen=True)
class PathRequest:
    address: AppAddress
    prefix: str  # /@user/ws/apps/slug
    rest: str | None  # the path after the prefix, None when nothing follows it


def parse_path(raw_path: str) -> PathRequest | None:
    """``/@USER/WS/apps/SLUG/rest`` or ``/@USER/WS/ports/PORT/rest``; None
    for anything else under ``/@`` (the caller answers 404)."""
    match = _PATH_ADDRESS.match(raw_path)
    if match is None:
        return None
    owner, workspace, kind, name, rest = match.groups()
    prefix = raw_path[: len(raw_path) - len(rest or "")]
    if kind == "apps":
        return PathRequest(AppAddress(owner, workspace, slug=name), prefix, rest)
    port = int(name) if name.isdecimal() and len(name) <= 5 else 0
    if not 1 <= port <= 65535:
        return None
    return PathRequest(AppAddress(owner, workspace, port=port), prefix, rest)


@dataclass
class ResolvedApp:
    """An address resolved against the database: the workspace, its live
    agent and where the app listens."""

    address: AppAddress
    workspace_id: str
    owner_id: str
    agent_id: str | None
    target: AppTarget
    share: ShareLevel  # in force: capped by the server's maximum
    app: App | None


@dataclass
class _Workspace:
    workspace_id: str
    owner_id: str
    agent_id: str | None
    apps: dict[str, App]
    fetched: float


@dataclass
class AppSession:
    """One user's (or anonymous IP's) use of one app: one connection record."""

    connection_id: str
    counters: Counters = field(default_factory=Counters)
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class TokenClaims:
    purpose: str  # "redirect" or "cookie"
    user_id: str
    key_id: str
    host: str
    expires: int


class AppTokens:
    """HMAC-SHA256 signed app tokens, with a key derived (HKDF) one way from
    the deployment secret: it reveals nothing of that secret, and tokens of
    one deployment mean nothing to another."""

    def __init__(self, master_key: bytes) -> None:
        self._key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"stockade app tokens v1"
        ).derive(master_key)
        # Redirect tokens already traded for a cookie, until they expire.
        self._spent: dict[str, int] = {}

    def mint(self, purpose: str, user_id: str, key_id: str, host: str, lifetime: int) -> str:
        claims = {
            "p": purpose,
            "u": user_id,
            "k": key_id,
            "h": host,
            "e": int(time.time()) + lifetime,
            "n": secrets.token_urlsafe(8),
        }
        body = _b64(json.dumps(claims, separators=(",", ":")).encode())
        return f"{body}.{_b64(self._sign(body))}"

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()

    def verify(self, token: str, purpose: str, host: str) -> TokenClaims | None:
        """The claims of a valid, unexpired ``purpose`` token for ``host``;
        None for anything else. Redirect tokens are good once."""
        body, _, signature = token.partition(".")
        if not body or len(token) > 1024:
            return None
        try:
            expected = self._sign(body)
            if not hmac.compare_digest(expected, _unb64(signature)):
                return None
            claims = json.loads(_unb64(body))
        except (ValueError, TypeError):
            return None
        now = int(time.time())
        if (
            not isinstance(claims, dict)
            or claims.get("p") != purpose
            or claims.get("h") != host
            or not isinstance(claims.get("e"), int)
            or claims["e"] < now
            or not isinstance(claims.get("u"), str)
            or not isinstance(claims.get("k"), str)
        ):
            return None
        if purpose == "redirect":
            nonce = str(claims.get("n"))
            self._spent = {n: e for n, e in self._spent.items() if e >= now}
            if nonce in self._spent:
                return None
            self._spent[nonce] = claims["e"]
        return TokenClaims(purpose, claims["u"], claims["k"], host, claims["e"])


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class AppService:
    """Resolves, authorizes and records app access; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        db: Database,
        agents: AgentService,
        connections: ConnectionService,
        auth: AuthService,
        *,
        audit_key: bytes,
    ) -> None:
        self.settings = settings
        self.db = db
        self.agents = agents
        self.connections = connections
        self.auth = auth
        self.tokens = AppTokens(audit_key)
        self.audit_key = audit_key
        self._workspaces: dict[tuple[str, str], _Workspace] = {}
        self._keys: dict[str, tuple[float, Actor | None]] = {}
        self._tokens: dict[str, tuple[float, Actor | None]] = {}
        self._sessions: dict[tuple[str, str, str], AppSession] = {}
        self._session_lock = asyncio.Lock()
        self.pool = StreamPool()
        access = urlsplit(settings.access_url)
        self.scheme = access.scheme
        self.access_origin = f"{access.scheme}://{access.netloc}"
        wildcard = settings.wildcard_access_url
        self.wildcard_suffix = ""
        self.wildcard_port = ""
        if wildcard:
            host, _, port = wildcard[1:].partition(":")
            self.wildcard_suffix = host  # ".apps.example.com"
            default_port = {"http": 80, "https": 443}[access.scheme]
            port = port or (str(access.port) if access.port else "")
            self.wildcard_port = "" if not port or int(port) == default_port else port

    # --- addresses ------------------------------------------------------------------

    def subdomain_address(self, host: str) -> AppAddress | None:
        """The app a ``Host`` header names under the wildcard, if any
        (``None`` also for hosts that are not under it at all)."""
        if not self.wildcard_suffix:
            return None
        name = host.lower().rsplit(":", 1)[0] if not host.startswith("[") else host
        if not name.endswith(self.wildcard_suffix):
            return None
        label = name[: -len(self.wildcard_suffix)]
        if not _LABEL.match(label):
            return None
        first, sep, rest = label.partition("--")
        workspace, sep2, owner = rest.rpartition("--")
        if not sep or not sep2 or not first or not workspace or not owner:
            return None
        if first.isdecimal():
            port = int(first) if len(first) <= 5 else 0
            return AppAddress(owner, workspace, port=port) if 1 <= port <= 65535 else None
        return AppAddress(owner, workspace, slug=first)

    def is_app_host(self, host: str) -> bool:
        """Whether ``host`` is under the wildcard (an app's origin, never the dashboard's)."""
        if not self.wildcard_suffix:
            return False
        name = host.lower().rsplit(":", 1)[0]
        return name.endswith(self.wildcard_suffix)

    def subdomain_host(self, address: AppAddress) -> str | None:
        """``SLUG--WS--USER.suffix[:port]``; None without a wildcard or when
        the label would be longer than DNS allows (63)."""
        if not self.wildcard_suffix:
            return None
        label = f"{address.label}--{address.workspace}--{address.owner}"
        if len(label) > 63:
            return None
        port = f":{self.wildcard_port}" if self.wildcard_port else ""
        return f"{label}{self.wildcard_suffix}{port}"

    def subdomain_url(self, address: AppAddress) -> str | None:
        host = self.subdomain_host(address)
        return f"{self.scheme}://{host}/" if host else None

    def path_url(self, address: AppAddress) -> str:
        kind = "apps" if address.slug is not None else "ports"
        base = self.settings.access_url
        return f"{base}/@{address.owner}/{address.workspace}/{kind}/{address.label}/"

    # --- resolving and authorizing ----------------------------------------------------

    async def _workspace(self, owner: str, name: str) -> _Workspace | None:
        key = (owner, name)
        cached = self._workspaces.get(key)
        now = time.monotonic()
        if cached is not None and now - cached.fetched < RESOLVE_CACHE_SECONDS:
            return cached
        async with self.db.session() as session:
            row = (
                await session.execute(
                    select(
                        Workspace.id, Workspace.owner_id, Workspace.state, TemplateVersion.manifest
                    )
                    .join(User, User.id == Workspace.owner_id)
                    .join(TemplateVersion, TemplateVersion.id == Workspace.template_version_id)
                    .where(
                        User.username == owner,
                        Workspace.name == name,
                        Workspace.deleted.is_(False),
                    )
                )
            ).one_or_none()
            if row is None:
                self._workspaces.pop(key, None)
                return None
            agent_id = (
                await session.execute(
                    select(WorkspaceAgent.id).where(
                        WorkspaceAgent.workspace_id == row.id,
                        WorkspaceAgent.revoked_at.is_(None),
                    )
                )
            ).scalar_one_or_none()
        apps: dict[str, App] = {}
        try:
            manifest = Manifest.model_validate(row.manifest)
            apps = {app.slug: app for app in workspace_apps(manifest, row.state)}
        except ValidationError:
            log.warning("manifest_unreadable", workspace_id=row.id)
        if len(self._workspaces) > 10_000:
            self._workspaces.clear()
        entry = _Workspace(row.id, row.owner_id, agent_id, apps, now)
        self._workspaces[key] = entry
        return entry

    def effective_share(self, app: App | None) -> ShareLevel:
        """The app's share level capped by the server's maximum (ports: owner)."""
        if app is None:
            return "owner"
        cap = self.settings.max_app_share_level
        return app.share if _SHARE_ORDER[app.share] <= _SHARE_ORDER[cap] else cap

    async def resolve(self, address: AppAddress) -> ResolvedApp | None:
        """The app an address names; None when there is no such workspace or app."""
        ws = await self._workspace(address.owner, address.workspace)
        if ws is None:
            return None
        if address.slug is not None:
            app = ws.apps.get(address.slug)
            target = app_target(app) if app is not None else None
            if app is None or target is None:
                return None
        else:
            app, target = None, AppTarget("127.0.0.1", address.port or 0, "")
        return ResolvedApp(
            address,
            ws.workspace_id,
            ws.owner_id,
            ws.agent_id,
            target,
            self.effective_share(app),
            app,
        )

    def allowed(self, actor: Actor | None, app: ResolvedApp, *, by_path: bool) -> bool:
        """Whether ``actor`` (None: anonymous) may open ``app``."""
        share = app.share
        if by_path and not self.settings.dangerous_allow_path_app_sharing:
            share = "owner"
        if share == "public":
            return True
        if actor is None:
            return False
        if share == "authenticated":
            return True
        if by_path and not self.settings.dangerous_allow_path_app_sharing:
            # On the dashboard's origin the app's scripts act with the
            # visitor's session: only the owner in person.
            return actor.user_id == app.owner_id
        return can(actor, Perm.WORKSPACE_CONNECT, owner_id=app.owner_id)

    async def actor_for_key(self, user_id: str, key_id: str) -> Actor | None:
        """The user behind an app token, while its session (API key) is still
        valid and the user active; re-checked every KEY_RECHECK_SECONDS."""
        now = time.monotonic()
        cached = self._keys.get(key_id)
        if cached is not None and now - cached[0] < KEY_RECHECK_SECONDS:
            actor = cached[1]
            return actor if actor is not None and actor.user_id == user_id else None
        async with self.db.session() as session:
            row = (
                await session.execute(
                    select(
                        ApiKey.user_id,
                        ApiKey.login_type,
                        ApiKey.expires_at,
                        User.username,
                        User.status,
                        User.roles,
                    )
                    .join(User, User.id == ApiKey.user_id)
                    .where(ApiKey.id == key_id)
                )
            ).one_or_none()
        actor = None
        if row is not None and row.status == "active" and row.expires_at > utcnow():
            actor = actor_for(
                row.user_id, row.username, row.roles, api_key_id=key_id, login_type=row.login_type
            )
        if len(self._keys) > 10_000:
            self._keys.clear()
        self._keys[key_id] = (now, actor)
        return actor if actor is not None and actor.user_id == user_id else None

    async def actor_for_token(self, token: str, ip: str | None) -> Actor | None:
        """The user of a session or API token presented to a path app.
        Remembered for KEY_RECHECK_SECONDS (by the token's hash), so a page's
        many requests do not each query the database; a revoked token stops
        working within that time."""
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        cached = self._tokens.get(digest)
        if cached is not None and now - cached[0] < KEY_RECHECK_SECONDS:
            return cached[1]
        actor = (await self.auth.authenticate(token, ip)).actor
        if len(self._tokens) > 10_000:
            self._tokens.clear()
        self._tokens[digest] = (now, actor)
        return actor

    # --- the workspace's apps, for the API ---------------------------------------------

    async def _may_read(self, actor: Actor, workspace_id: str, owner_id: str) -> bool:
        if can(actor, Perm.WORKSPACE_READ, owner_id=owner_id):
            return True  # the common case needs no query
        async with self.db.session() as session:
            org_id = (
                await session.execute(
                    select(Workspace.organization_id).where(Workspace.id == workspace_id)
                )
            ).scalar_one()
            return await may_read_workspace(session, actor, owner_id, org_id)

    async def list_apps(self, actor: Actor, owner: str, name: str) -> types.WorkspaceAppList:
        """The workspace's apps with their URLs, share levels and health."""
        if owner == "me":
            owner = actor.username
        ws = await self._workspace(owner, name)
        if ws is None or not await self._may_read(actor, ws.workspace_id, ws.owner_id):
            raise NotFound("workspace not found", reason="workspace_not_found")
        health = self.agents.app_health.get(ws.agent_id or "", {})
        views = []
        for app in ws.apps.values():
            address = AppAddress(owner, name, slug=app.slug)
            subdomain_url = self.subdomain_url(address) if app_target(app) else None
            path_url = self.path_url(address)
            state = health.get(app.slug) or "initializing"
            views.append(
                types.WorkspaceApp(
                    slug=app.slug,
                    display_name=app.display_name or app.slug,
                    icon=app.icon,
                    subdomain=app.subdomain,
                    url=subdomain_url if app.subdomain and subdomain_url else path_url,
                    path_url=path_url,
                    subdomain_url=subdomain_url,
                    share=app.share,
                    effective_share=self.effective_share(app),
                    health="disabled" if app.health_check is None else state,
                )
            )
        return types.WorkspaceAppList(apps=views)

    # --- subdomain sign-in ------------------------------------------------------------

    def authorize_url(self, redirect_uri: str) -> str:
        """Where an app host sends a browser without a valid app cookie."""
        target = quote(redirect_uri, safe="")
        return f"{self.settings.access_url}{AUTHORIZE_PATH}?redirect_uri={target}"

    async def authorize(self, actor: Actor, redirect_uri: str, client: ClientInfo) -> str:
        """Check that ``actor`` may open the app ``redirect_uri`` points into,
        start its app session and return ``redirect_uri`` with a redirect token."""
        if len(redirect_uri) > 4096:
            raise InvalidInput("redirect_uri is too long")
        try:
            parts = urlsplit(redirect_uri)
            _ = parts.port
        except ValueError:
            raise InvalidInput("redirect_uri is not a URL") from None
        if not self.wildcard_suffix:
            raise InvalidInput(
                "subdomain apps are off: the server has no wildcard_access_url",
                reason="subdomain_apps_disabled",
            )
        address = self.subdomain_address(parts.netloc) if parts.scheme == self.scheme else None
        if address is None or parts.netloc.lower() != self.subdomain_host(address):
            raise InvalidInput(
                f"redirect_uri must be an app URL under {self.settings.wildcard_access_url} "
                f"({self.scheme}://SLUG--WORKSPACE--USER...)",
                reason="invalid_redirect_uri",
            )
        resolved = await self.resolve(address)
        if resolved is None or not self.allowed(actor, resolved, by_path=False):
            await self._audit_denial(actor, client, address)
            raise _not_found()
        await self.session(actor, client, resolved, via="subdomain")
        token = self.tokens.mint(
            "redirect",
            actor.user_id,
            actor.api_key_id,
            parts.netloc.lower(),
            REDIRECT_TOKEN_SECONDS,
        )
        separator = "&" if parts.query else "?"
        return f"{redirect_uri.split('#', 1)[0]}{separator}{TOKEN_QUERY}={token}"

    async def _audit_denial(self, actor: Actor, client: ClientInfo, address: AppAddress) -> None:
        """A refused app sign-in, in the audit log like a refused tunnel."""
        record = AuditRecord(ip=client.ip, user_agent=client.user_agent)
        record.user_id, record.username = actor.user_id, actor.username
        record.describe(
            "workspace.connect",
            "workspace",
            resource_name=f"{address.owner}/{address.workspace}",
            kind=address.kind,
            target=address.label,
            via="subdomain",
            reason="app_not_found",
        )
        try:
            await write_record(self.db, record, 404, key=self.audit_key)
        except Exception:
            log.exception("audit_write_failed", action=record.action)

    def cookie_token(self, claims: TokenClaims) -> str:
        return self.tokens.mint(
            "cookie",
            claims.user_id,
            claims.key_id,
            claims.host,
            self.settings.app_token_lifetime_seconds,
        )

    # --- app sessions -------------------------------------------------------------------

    async def session(
        self, actor: Actor | None, client: ClientInfo, app: ResolvedApp, *, via: str
    ) -> AppSession:
        """The app session of this user (or anonymous IP) and app, recorded
        (connection row and audit entry) when it starts."""
        who = actor.user_id if actor is not None else f"ip:{client.ip}"
        key = (who, app.workspace_id, f"{app.address.kind}:{app.address.label}")
        current = self._sessions.get(key)
        if current is not None:
            current.last_used = time.monotonic()
            return current
        async with self._session_lock:
            current = self._sessions.get(key)
            if current is None:
                connection_id = await self.connections.record_open(
                    actor,
                    app.workspace_id,
                    f"{app.address.owner}/{app.address.workspace}",
                    app.agent_id,
                    StreamTarget("tcp", app.address.kind, app.address.label),
                    client,
                    via=via,
                    share=app.share,
                )
                current = AppSession(connection_id)
                self._sessions[key] = current
        return current

    async def sweep(self, *, idle_seconds: float = SESSION_IDLE_SECONDS) -> None:
        """Close the records of app sessions idle for ``idle_seconds``."""
        now = time.monotonic()
        for key, session in list(self._sessions.items()):
            if now - session.last_used >= idle_seconds:
                del self._sessions[key]
                await self.connections.record_close(
                    session.connection_id,
                    to_workspace=session.counters.to_workspace,
                    from_workspace=session.counters.from_workspace,
                    reason="idle",
                )

    # --- streams ----------------------------------------------------------------------

    async def lease(self, app: ResolvedApp, *, fresh: bool = False) -> Lease:
        """A kept-alive HTTP stream to the app, or a new one; give it back
        with ``pool.release`` or close it."""

        async def dial() -> AgentStream:
            websocket, pending = await self.dial(app)
            return AgentStream(websocket, pending, Counters())

        key = (app.agent_id or "", app.target.host, app.target.port)
        return await self.pool.acquire(key, dial, fresh=fresh)

    async def dial(self, app: ResolvedApp) -> tuple[WebSocket, PendingStream]:
        """A stream to the app's port inside the workspace."""
        where = f"{app.address.owner}/{app.address.workspace}"
        if app.agent_id is None:
            raise AppUnavailable(f"workspace {where} is not running; start it first")
        if not await self.agents.reachable(app.agent_id):
            raise AppUnavailable(
                f"the agent of workspace {where} is not connected (it may still be starting)"
            )
        fields: dict[str, Any] = {"port": app.target.port}
        if app.target.host != "127.0.0.1":
            fields["host"] = app.target.host
        try:
            return await self.connections.dial(
                app.agent_id, StreamTarget("tcp", app.address.kind, app.address.label, fields)
            )
        except StreamRefused as exc:
            raise AppUnavailable(exc.message) from None
