"""Workspace agents on the control plane: their tokens, the WebSocket they
connect out on (protocol in ``stockade.agent.protocol``), what they report
(lifecycle, startup script output, metadata) and how the API shows it.

Replicas: an agent's control connection is held by one replica, recorded in
``workspace_agents.replica_id``. Another replica reaches it through the
notifier's broadcast messages (``agent_send``: a control message for the
holder to pass on); the holder tells the others when the agent leaves
(``agent_gone``), passes on a refusal of another replica's stream
(``stream_error``) and shares the agent's app health (``app_health``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from stockade.agent.protocol import CLOSE_TOKEN_REFUSED, LIFECYCLE_STATES, PROTOCOL_VERSION
from stockade.provisioner.worker import parameter_env
from stockade.sdk import types
from stockade.sdk.templates import Manifest, health_check_url, workspace_apps
from stockade.server.auth import keys
from stockade.server.db import Database
from stockade.server.db.models import (
    AgentLog,
    AgentMetadata,
    ApiKey,
    Replica,
    TemplateVersion,
    User,
    Workspace,
    WorkspaceAgent,
    WorkspaceSSHKey,
    utcnow,
)
from stockade.server.egress.service import AGENT_PREFIX, EgressService
from stockade.server.events import Notifier
from stockade.server.observability import get_logger
from stockade.server.secretbox import SecretBox
from stockade.tunnel.protocol import CLOSE_AGENT_UNAVAILABLE

log = get_logger("stockade.agents")

MAX_AGENT_LOG_LINES = 10_000
MAX_LINE = 4096
MAX_METADATA_ITEMS = 100
# Makes the AI bridge's variables for an agent's sessions (see session_env).
SessionEnv = Callable[[AsyncSession, WorkspaceAgent], Awaitable[dict[str, str]]]
SEEN_EVERY = timedelta(seconds=5)  # last_seen_at is written at most this often
# Messages whose handling writes last_seen_at itself.
_WRITES_LAST_SEEN = frozenset({"hello", "lifecycle", "metadata"})


@dataclass
class PendingStream:
    """A stream asked of an agent and not yet dialed back: the agent's
    WebSocket arrives in ``dialed``, or a ``(code, reason)`` refusal."""

    agent_id: str
    dialed: asyncio.Future[WebSocket | tuple[int, str]]
    # Set when the relay is over: the dial-back endpoint returns then.
    finished: asyncio.Event = field(default_factory=asyncio.Event)


def agent_logs_key(agent_id: str) -> str:
    return f"agent-logs:{agent_id}"


def _parse_time(value: Any) -> datetime:
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is not None:
                return parsed
    return utcnow()


def _text(value: Any, limit: int) -> str | None:
    if value is None:
        return None
    text = str(value).replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")[:limit]


class AgentService:
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        secrets: SecretBox,
        egress: EgressService,
        *,
        replica_id: str,
    ) -> None:
        self.db = db
        self.egress = egress
        self.notifier = notifier
        self.secrets = secrets
        # This replica's id (``replicas.id``); stream ids it asks for start with it.
        self.replica_id = replica_id
        # Sends to agents asked for by other replicas, until they are done.
        self._relayed: set[asyncio.Task[Any]] = set()
        # Agents connected to this process, by agent id.
        self._connections: dict[str, WebSocket] = {}
        # Streams asked of agents on this process, by stream id.
        self.pending_streams: dict[str, PendingStream] = {}
        # App health as the agents connected here last reported it:
        # agent id -> slug -> initializing | healthy | unhealthy.
        self.app_health: dict[str, dict[str, str]] = {}
        # Variables for the workspace's sessions beyond its parameters (the
        # AI bridge's URLs and key), made inside the hello's transaction.
        self.session_env: SessionEnv | None = None
        notifier.on_message("agent_send", self._on_agent_send)
        notifier.on_message("agent_gone", self._on_agent_gone)
        notifier.on_message("agents_revoked", self._on_agents_revoked)
        notifier.on_message("stream_error", self._on_stream_error)
        notifier.on_message("app_health", self._on_app_health)

    # --- host keys --------------------------------------------------------------

    async def ssh_host_key(self, session: AsyncSession, workspace_id: str) -> WorkspaceSSHKey:
        """The workspace's SSH host key, made on first use and kept for the
        workspace's life."""
        query = select(WorkspaceSSHKey).where(WorkspaceSSHKey.workspace_id == workspace_id)
        row = (await session.execute(query)).scalar_one_or_none()
        if row is not None:
            return row
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        ).decode()
        public = (
            key.public_key()
            .public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
            .decode()
        )
        row = WorkspaceSSHKey(
            workspace_id=workspace_id,
            algorithm="ssh-ed25519",
            public_key=public,
            encrypted_private_key=self.secrets.encrypt(private, context=workspace_id),
        )
        try:
            async with session.begin_nested():
                session.add(row)
        except IntegrityError:  # made meanwhile by another request
            return (await session.execute(query)).scalar_one()
        return row

    # --- talking to connected agents ---------------------------------------------

    async def reachable(self, agent_id: str) -> bool:
        """Whether the agent is connected to this replica or to another live
        one (whose row in ``replicas`` is still there)."""
        if agent_id in self._connections:
            return True
        async with self.db.session() as session:
            holder = (
                await session.execute(
                    select(Replica.id)
                    .join(WorkspaceAgent, WorkspaceAgent.replica_id == Replica.id)
                    .where(WorkspaceAgent.id == agent_id, WorkspaceAgent.revoked_at.is_(None))
                )
            ).scalar_one_or_none()
        return holder is not None and holder != self.replica_id

    async def deliver(self, agent_id: str, message: dict[str, Any]) -> bool:
        """Send a control message to the agent wherever it is connected: on
        this replica directly, else through the replica holding it (best
        effort: False only when it surely did not go)."""
        if agent_id in self._connections:
            return await self.send(agent_id, message)
        return self.notifier.broadcast("agent_send", agent=agent_id, message=message)

    # --- messages from other replicas ------------------------------------------------

    def _on_agent_send(self, message: dict[str, Any]) -> None:
        agent_id, payload = str(message.get("agent")), message.get("message")
        if agent_id in self._connections and isinstance(payload, dict):
            task = asyncio.ensure_future(self.send(agent_id, payload))
            self._relayed.add(task)
            task.add_done_callback(self._relayed.discard)

    def _on_agent_gone(self, message: dict[str, Any]) -> None:
        agent_id = str(message.get("agent"))
        if agent_id not in self._connections:  # not already back here
            self.app_health.pop(agent_id, None)
            self._refuse_pending(agent_id, "the agent disconnected")

    def _on_agents_revoked(self, message: dict[str, Any]) -> None:
        agents = message.get("agents")
        if isinstance(agents, list):
            task = asyncio.ensure_future(self._close_revoked([str(a) for a in agents]))
            self._relayed.add(task)
            task.add_done_callback(self._relayed.discard)

    def _on_stream_error(self, message: dict[str, Any]) -> None:
        pending = self.pending_streams.get(str(message.get("id")))
        code, reason = message.get("code"), message.get("reason")
        if (
            pending is not None
            and pending.agent_id == message.get("agent")
            and not pending.dialed.done()
            and isinstance(code, int)
            and isinstance(reason, str)
        ):
            pending.dialed.set_result((code, reason))

    def _on_app_health(self, message: dict[str, Any]) -> None:
        agent_id, apps = str(message.get("agent")), message.get("apps")
        if isinstance(apps, dict) and agent_id not in self._connections:
            self.app_health[agent_id] = {str(k): str(v) for k, v in apps.items()}

    async def send(self, agent_id: str, message: dict[str, Any]) -> bool:
        """Send a control message to an agent connected to this process;
        False when it is not (or the send failed)."""
        websocket = self._connections.get(agent_id)
        if websocket is None:
            return False
        try:
            await websocket.send_json(message)
        except Exception:
            return False
        return True

    # --- tokens (called inside the build queue's transactions) ---------------------

    @staticmethod
    async def issue(session: AsyncSession, workspace_id: str, build_id: str) -> str:
        """A new agent for a start build; earlier agents of the workspace are
        revoked. Returns the token, which exists nowhere else afterwards."""
        await AgentService.revoke(session, workspace_id)
        agent_id, token, hashed = keys.generate()
        session.add(
            WorkspaceAgent(
                id=agent_id, workspace_id=workspace_id, build_id=build_id, hashed_token=hashed
            )
        )
        return token

    @staticmethod
    async def revoke(session: AsyncSession, workspace_id: str) -> list[str]:
        """Revoke every live agent of a workspace; their ids (the caller
        disconnects them once the transaction has committed)."""
        ids = list(
            (
                await session.execute(
                    select(WorkspaceAgent.id).where(
                        WorkspaceAgent.workspace_id == workspace_id,
                        WorkspaceAgent.revoked_at.is_(None),
                    )
                )
            ).scalars()
        )
        if ids:
            await session.execute(
                update(WorkspaceAgent).where(WorkspaceAgent.id.in_(ids)).values(revoked_at=utcnow())
            )
        # The AI bridge key the agents handed their sessions goes with them.
        await session.execute(
            delete(ApiKey).where(
                ApiKey.workspace_id == workspace_id, ApiKey.login_type == keys.AIBRIDGE_LOGIN_TYPE
            )
        )
        return ids

    async def disconnect(self, agent_ids: Iterable[str]) -> None:
        """Close the connections of revoked agents, on whichever replica."""
        agent_ids = list(agent_ids)
        if any(agent_id not in self._connections for agent_id in agent_ids):
            self.notifier.broadcast("agents_revoked", agents=agent_ids)
        await self._close_revoked(agent_ids)

    async def _close_revoked(self, agent_ids: list[str]) -> None:
        for agent_id in agent_ids:
            websocket = self._connections.pop(agent_id, None)
            if websocket is not None:
                with contextlib.suppress(Exception):
                    await websocket.close(code=CLOSE_TOKEN_REFUSED, reason="agent token revoked")

    # --- the connection ----------------------------------------------------------

    async def authenticate(self, websocket: WebSocket) -> WorkspaceAgent | None:
        header = websocket.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        parts = keys.split(token.strip()) if scheme.lower() == "bearer" else None
        if parts is None:
            return None
        agent_id, secret = parts
        async with self.db.session() as session:
            agent = (
                await session.execute(select(WorkspaceAgent).where(WorkspaceAgent.id == agent_id))
            ).scalar_one_or_none()
        if agent is None or agent.revoked_at is not None:
            return None
        if not keys.matches(secret, agent.hashed_token):
            return None
        return agent

    async def serve(self, websocket: WebSocket) -> None:
        """One agent connection, from the upgrade to the disconnect."""
        agent = await self.authenticate(websocket)
        if agent is None:
            # Refused before the upgrade: the agent sees a 403 and stops retrying.
            log.info("agent_refused", client=str(websocket.client))
            await websocket.close(code=CLOSE_TOKEN_REFUSED)
            return
        await websocket.accept()
        previous = self._connections.get(agent.id)
        self._connections[agent.id] = websocket
        if previous is not None:  # the agent reconnected before we saw it leave
            with contextlib.suppress(Exception):
                await previous.close(code=1000, reason="replaced by a new connection")
        log.info("agent_connected", agent_id=agent.id, workspace_id=agent.workspace_id)
        last_seen = utcnow()
        try:
            while True:
                try:
                    message = await websocket.receive_json()
                except (ValueError, KeyError):
                    await websocket.close(code=1003, reason="frames must be JSON objects")
                    return
                if not isinstance(message, dict):
                    continue
                await self._handle(websocket, agent.id, message, workspace_id=agent.workspace_id)
                now = utcnow()
                if message.get("type") in _WRITES_LAST_SEEN:
                    last_seen = now
                elif now - last_seen > SEEN_EVERY:
                    last_seen = now
                    await self._update(agent.id, last_seen_at=now)
        except WebSocketDisconnect:
            pass
        finally:
            if self._connections.get(agent.id) is websocket:
                del self._connections[agent.id]
                self.app_health.pop(agent.id, None)
                self._refuse_pending(agent.id, "the agent disconnected")
                self.notifier.broadcast("agent_gone", agent=agent.id)
                hello_at = getattr(websocket.state, "hello_at", None)
                if hello_at is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(self._disconnected(agent.id, hello_at))
            log.info("agent_disconnected", agent_id=agent.id)

    def _refuse_pending(self, agent_id: str, reason: str) -> None:
        for pending in self.pending_streams.values():
            if pending.agent_id == agent_id and not pending.dialed.done():
                pending.dialed.set_result((CLOSE_AGENT_UNAVAILABLE, reason))

    async def _disconnected(self, agent_id: str, hello_at: datetime) -> None:
        """Record that the connection whose hello came at ``hello_at`` ended,
        unless the agent has said hello again since (on this replica or
        another): that newer connection's record stands."""
        now = utcnow()
        async with self.db.transaction() as session:
            await session.execute(
                update(WorkspaceAgent)
                .where(
                    WorkspaceAgent.id == agent_id,
                    WorkspaceAgent.replica_id == self.replica_id,
                    WorkspaceAgent.last_connected_at == hello_at,
                )
                .values(disconnected_at=now, last_seen_at=now, replica_id=None)
            )

    async def _update(self, agent_id: str, **values: Any) -> None:
        async with self.db.transaction() as session:
            await session.execute(
                update(WorkspaceAgent).where(WorkspaceAgent.id == agent_id).values(**values)
            )

    async def _handle(
        self, websocket: WebSocket, agent_id: str, message: dict[str, Any], *, workspace_id: str
    ) -> None:
        kind = message.get("type")
        now = utcnow()
        if kind == "hello":
            async with self.db.transaction() as session:
                agent = (
                    await session.execute(
                        select(WorkspaceAgent).where(WorkspaceAgent.id == agent_id)
                    )
                ).scalar_one()
                agent.version = _text(message.get("version"), 64)
                agent.hostname = _text(message.get("hostname"), 255)
                agent.os = _text(message.get("os"), 64)
                agent.arch = _text(message.get("arch"), 64)
                agent.python = _text(message.get("python"), 64)
                agent.first_connected_at = agent.first_connected_at or now
                agent.last_connected_at = now
                agent.last_seen_at = now
                agent.disconnected_at = None
                agent.replica_id = self.replica_id
                # Which hello this connection's disconnect may undo (see _disconnected).
                websocket.state.hello_at = now
                manifest = await self._manifest(session, agent)
            await websocket.send_json(manifest)
        elif kind == "lifecycle":
            state = message.get("state")
            if state in LIFECYCLE_STATES:
                values: dict[str, Any] = {"lifecycle_state": state, "last_seen_at": now}
                if state == "ready":
                    values["ready_at"] = _parse_time(message.get("time"))
                await self._update(agent_id, **values)
                self.notifier.notify(agent_logs_key(agent_id))
        elif kind == "startup_log":
            lines = message.get("lines")
            if isinstance(lines, list) and lines:
                await self._store_lines(agent_id, lines)
        elif kind == "metadata":
            items = message.get("items")
            if isinstance(items, list):
                await self._store_metadata(agent_id, items[:MAX_METADATA_ITEMS])
        elif kind == "stream_error":
            stream_id = str(message.get("id"))[:64]
            code = message.get("code")
            if not (isinstance(code, int) and 4000 <= code <= 4999):
                code = CLOSE_AGENT_UNAVAILABLE
            reason = _text(message.get("reason"), 120) or "the agent refused the stream"
            pending = self.pending_streams.get(stream_id)
            if pending is None and not stream_id.startswith(self.replica_id):
                # Another replica asked for this stream: pass the refusal on.
                self.notifier.broadcast(
                    "stream_error", id=stream_id, agent=agent_id, code=code, reason=reason
                )
            elif pending is not None and pending.agent_id == agent_id and not pending.dialed.done():
                pending.dialed.set_result((code, reason))
        elif kind == "app_health":
            apps = message.get("apps")
            if isinstance(apps, dict):
                health = {
                    str(slug)[:64]: state
                    for slug, state in list(apps.items())[:MAX_METADATA_ITEMS]
                    if state in ("initializing", "healthy", "unhealthy")
                }
                if self.app_health.get(agent_id) != health:
                    self.notifier.broadcast("app_health", agent=agent_id, apps=health)
                self.app_health[agent_id] = health
        elif kind == "egress":
            self.egress.add_remote(AGENT_PREFIX + workspace_id, message.get("records"))
        elif kind == "stats":
            fields = ("streams_open", "streams_total", "bytes_in", "bytes_out")
            try:
                stats = types.AgentStats.model_validate(
                    {k: message[k] for k in fields if message.get(k) is not None}
                )
            except ValidationError:
                return  # a malformed report is dropped, the connection stays
            await self._update(agent_id, stats=stats.model_dump())

    async def _manifest(self, session: AsyncSession, agent: WorkspaceAgent) -> dict[str, Any]:
        ws, owner, manifest_data = (
            await session.execute(
                select(Workspace, User.username, TemplateVersion.manifest)
                .join(User, User.id == Workspace.owner_id)
                .join(TemplateVersion, TemplateVersion.id == Workspace.template_version_id)
                .where(Workspace.id == agent.workspace_id)
            )
        ).one()
        manifest = Manifest.model_validate(manifest_data)
        host_key = await self.ssh_host_key(session, ws.id)
        return {
            "type": "manifest",
            "protocol": PROTOCOL_VERSION,
            "agent_id": agent.id,
            "workspace_id": ws.id,
            "workspace_name": ws.name,
            "owner": owner,
            "startup_script": manifest.agent.startup_script,
            "startup_timeout": manifest.agent.startup_timeout,
            "metadata": [item.model_dump() for item in manifest.agent.metadata],
            "env": parameter_env(ws.parameters),
            "session_env": await self.session_env(session, agent) if self.session_env else {},
            "ssh_host_key": self.secrets.decrypt(host_key.encrypted_private_key, context=ws.id),
            # The allow-list the agent's egress guard enforces (ssh -L, app checks).
            "egress": self.egress.policy.to_wire(),
            # Apps with a health check, for the agent to check.
            "apps": [
                {
                    "slug": app.slug,
                    "health_url": health_check_url(app),
                    "interval": app.health_check.interval,
                    "threshold": app.health_check.threshold,
                }
                for app in workspace_apps(manifest, ws.state)
                if app.health_check is not None and health_check_url(app) is not None
            ],
        }

    async def _store_lines(self, agent_id: str, lines: list[Any]) -> None:
        async with self.db.transaction() as session:
            count = (
                await session.execute(select(func.count()).where(AgentLog.agent_id == agent_id))
            ).scalar_one()
            room = MAX_AGENT_LOG_LINES - count
            if room <= 0:
                return
            for item in lines[:room]:
                if isinstance(item, dict):
                    text = _text(item.get("line"), MAX_LINE)
                    if text is not None:
                        session.add(
                            AgentLog(
                                agent_id=agent_id, time=_parse_time(item.get("time")), line=text
                            )
                        )
        self.notifier.notify(agent_logs_key(agent_id))

    async def _store_metadata(self, agent_id: str, items: list[Any]) -> None:
        async with self.db.transaction() as session:
            # The agent's most frequent message: last_seen_at rides along
            # rather than costing a transaction of its own.
            await session.execute(
                update(WorkspaceAgent)
                .where(WorkspaceAgent.id == agent_id)
                .values(last_seen_at=utcnow())
            )
            existing = {
                row.key: row
                for row in (
                    await session.execute(
                        select(AgentMetadata).where(AgentMetadata.agent_id == agent_id)
                    )
                ).scalars()
            }
            for item in items:
                if not isinstance(item, dict):
                    continue
                key = _text(item.get("key"), 64)
                if not key:
                    continue
                row = existing.get(key)
                if row is None:
                    if len(existing) >= MAX_METADATA_ITEMS:
                        continue
                    row = AgentMetadata(agent_id=agent_id, key=key)
                    session.add(row)
                    existing[key] = row
                row.value = _text(item.get("value"), MAX_LINE) or ""
                row.error = _text(item.get("error"), MAX_LINE)
                row.collected_at = _parse_time(item.get("collected_at"))

    # --- views ------------------------------------------------------------------------

    async def views(
        self, session: AsyncSession, workspace_ids: list[str]
    ) -> dict[str, types.WorkspaceAgent]:
        """The live (not revoked) agent of each workspace, by workspace id."""
        if not workspace_ids:
            return {}
        agents = list(
            (
                await session.execute(
                    select(WorkspaceAgent).where(
                        WorkspaceAgent.workspace_id.in_(workspace_ids),
                        WorkspaceAgent.revoked_at.is_(None),
                    )
                )
            ).scalars()
        )
        metadata: dict[str, list[types.AgentMetadataItem]] = {}
        if agents:
            rows = await session.execute(
                select(AgentMetadata)
                .where(AgentMetadata.agent_id.in_([a.id for a in agents]))
                .order_by(AgentMetadata.key)
            )
            for row in rows.scalars():
                metadata.setdefault(row.agent_id, []).append(
                    types.AgentMetadataItem(
                        key=row.key, value=row.value, error=row.error, collected_at=row.collected_at
                    )
                )
        out = {}
        for agent in agents:
            if agent.last_connected_at is None:
                status = "connecting"
            elif agent.disconnected_at is not None:
                status = "disconnected"
            else:
                status = "connected"
            out[agent.workspace_id] = types.WorkspaceAgent(
                id=agent.id,
                status=status,
                lifecycle_state=agent.lifecycle_state,
                version=agent.version,
                hostname=agent.hostname,
                os=agent.os,
                arch=agent.arch,
                python=agent.python,
                created_at=agent.created_at,
                first_connected_at=agent.first_connected_at,
                last_connected_at=agent.last_connected_at,
                disconnected_at=agent.disconnected_at,
                last_seen_at=agent.last_seen_at,
                ready_at=agent.ready_at,
                replica=agent.replica_id if status == "connected" else None,
                metadata=metadata.get(agent.id, []),
                stats=types.AgentStats.model_validate(agent.stats) if agent.stats else None,
            )
        return out

    async def logs(self, workspace_id: str, *, after: int, limit: int = 1000) -> types.AgentLogList:
        """The startup script output of the workspace's live agent."""
        async with self.db.session() as session:
            agent = (
                await session.execute(
                    select(WorkspaceAgent).where(
                        WorkspaceAgent.workspace_id == workspace_id,
                        WorkspaceAgent.revoked_at.is_(None),
                    )
                )
            ).scalar_one_or_none()
            if agent is None:
                return types.AgentLogList(logs=[], lifecycle_state=None)
            rows = await session.execute(
                select(AgentLog)
                .where(AgentLog.agent_id == agent.id, AgentLog.id > after)
                .order_by(AgentLog.id)
                .limit(limit)
            )
            return types.AgentLogList(
                logs=[
                    types.AgentLogLine(id=r.id, time=r.time, line=r.line) for r in rows.scalars()
                ],
                lifecycle_state=agent.lifecycle_state,
            )
