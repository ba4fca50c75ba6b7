"""Connections to workspaces: tunnel streams between clients and agents.

A client asks for a stream (ssh, a TCP port, an app, a PTY); this service
checks that the user may connect to the workspace, records the connection
(a ``workspace_connections`` row and an audit entry when it opens and when it
closes, with the bytes each way), asks the agent for the stream and relays
the two WebSockets (protocol: :mod:`stockade.tunnel.protocol`).

Replicas: the replica a client reached relays its stream. The agent may be
connected to another replica (the ``open_stream`` goes there, see
:mod:`stockade.server.agents.service`) and its dial-back may land on a third;
that one carries it over to the asking replica (:mod:`.hop`).

Backpressure: the relay awaits each send before it receives the next
message, and uvicorn stops reading a socket while its message waits to be
received, so a slow reader stalls its own stream back to the sender's TCP
window; the server holds at most one message per direction per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from stockade.sdk import types
from stockade.server.agents.service import AgentService, PendingStream
from stockade.server.audit.service import AuditRecord, write_record
from stockade.server.authz import Actor, Perm, can
from stockade.server.connections.hop import Hops
from stockade.server.db import Database
from stockade.server.db.models import (
    Replica,
    User,
    Workspace,
    WorkspaceAgent,
    WorkspaceConnection,
    utcnow,
)
from stockade.server.errors import Conflict, Forbidden, NotFound, StockadeError
from stockade.server.observability import get_logger
from stockade.server.orgs.access import may_read_workspace
from stockade.tunnel.protocol import (
    CLOSE_AGENT_UNAVAILABLE,
    CLOSE_DIAL_TIMEOUT,
    CLOSE_NORMAL,
    DIAL_TIMEOUT_SECONDS,
    OPENED_MESSAGE,
    STREAM_ID_LENGTH,
)

log = get_logger("stockade.connections")

# Close codes a relay passes on as they are; anything else (1001 going away,
# 1006 abnormal...) reaches the other side as a normal close.
_PASSED_ON = range(4000, 5000)
MAX_REASON = 120


class AgentUnavailable(Conflict):
    default_reason = "agent_unavailable"


@dataclass
class StreamTarget:
    """What a client asks for: the agent-side ``kind`` and its fields, and
    how the connection is recorded (``audit_kind``: ssh, port, app, pty)."""

    kind: str
    audit_kind: str
    label: str | None = None  # the port, or the app's slug
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientInfo:
    ip: str | None
    user_agent: str | None


@dataclass
class OpenedStream:
    """A stream the agent dialed back, ready to relay."""

    agent: WebSocket
    pending: PendingStream
    connection_id: str
    workspace: Workspace
    owner: str
    bytes_to_workspace: int = 0
    bytes_from_workspace: int = 0
    close_code: int = CLOSE_NORMAL
    close_reason: str = ""


class StreamRefused(StockadeError):
    """The agent could not open the stream's target; ``code`` is the tunnel
    close code the agent gave."""

    status_code = 502
    default_reason = "stream_refused"

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class ConnectionService:
    def __init__(self, db: Database, agents: AgentService, *, audit_key: bytes, hops: Hops) -> None:
        self.db = db
        self.agents = agents
        self.audit_key = audit_key
        self.hops = hops

    # --- who may connect where ------------------------------------------------------

    async def find_agent(
        self, actor: Actor, owner_name: str, name: str
    ) -> tuple[Workspace, WorkspaceAgent]:
        """The workspace (which ``actor`` may connect to) and its connected agent.

        A workspace the actor may not see is a 404 like a missing one; one it
        may see but not connect to is a 403; no connected agent is a 409.
        Owner ``me`` is the actor."""
        if owner_name == "me":
            owner_name = actor.username
        async with self.db.session() as session:
            ws = await _visible_workspace(session, actor, owner_name, name)
            if not can(actor, Perm.WORKSPACE_CONNECT, owner_id=ws.owner_id):
                raise Forbidden(
                    "you do not have permission to connect to this workspace",
                    log_message=f"{actor.username} lacks workspace.connect on {owner_name}/{name}",
                )
            agent = (
                await session.execute(
                    select(WorkspaceAgent).where(
                        WorkspaceAgent.workspace_id == ws.id, WorkspaceAgent.revoked_at.is_(None)
                    )
                )
            ).scalar_one_or_none()
        if agent is None:
            raise AgentUnavailable(
                f"workspace {owner_name}/{name} is not running; start it with "
                f"`stockade start {owner_name}/{name}`"
            )
        if not await self.agents.reachable(agent.id):
            raise AgentUnavailable(
                f"the agent of workspace {owner_name}/{name} is not connected "
                f"(it may still be starting: see `stockade show {owner_name}/{name}`)"
            )
        return ws, agent

    async def host_key(self, actor: Actor, owner_name: str, name: str) -> types.WorkspaceSSHInfo:
        """The workspace's SSH host public key (made on first use)."""
        async with self.db.session() as session:
            ws = await _visible_workspace(session, actor, owner_name, name)
        async with self.db.transaction() as session:
            key = await self.agents.ssh_host_key(session, ws.id)
            return types.WorkspaceSSHInfo(
                workspace_id=ws.id,
                owner=owner_name,
                name=name,
                host_key_algorithm=key.algorithm,
                host_public_key=key.public_key,
            )

    # --- opening ------------------------------------------------------------------------

    async def open(
        self,
        actor: Actor,
        owner_name: str,
        name: str,
        target: StreamTarget,
        client: ClientInfo,
    ) -> OpenedStream:
        """Check, record and open one stream; raises a typed error (recorded
        in the audit log) when it cannot be opened."""
        record = AuditRecord(ip=client.ip, user_agent=client.user_agent)
        record.user_id, record.username = actor.user_id, actor.username
        record.describe("workspace.connect", "workspace", resource_name=f"{owner_name}/{name}")
        record.details["kind"] = target.audit_kind
        if target.label:
            record.details["target"] = target.label
        try:
            ws, agent = await self.find_agent(actor, owner_name, name)
        except StockadeError as exc:
            await self._audit(record, exc.status_code, reason=exc.reason)
            raise
        record.resource_id = ws.id
        connection = WorkspaceConnection(
            workspace_id=ws.id,
            agent_id=agent.id,
            user_id=actor.user_id,
            username=actor.username,
            kind=target.audit_kind,
            target=target.label,
            ip=client.ip,
            user_agent=(client.user_agent or "")[:256] or None,
        )
        async with self.db.transaction() as session:
            session.add(connection)
        record.details["connection_id"] = connection.id
        try:
            agent_ws, pending = await self.dial(agent.id, target)
        except StreamRefused as exc:
            await self._close_record(connection.id, exc.code, exc.message)
            await self._audit(record, exc.status_code, reason=exc.message)
            raise
        await self._audit(record, 101)
        return OpenedStream(agent_ws, pending, connection.id, ws, owner_name)

    async def record_open(
        self,
        actor: Actor | None,
        workspace_id: str,
        workspace_label: str,
        agent_id: str | None,
        target: StreamTarget,
        client: ClientInfo,
        **details: Any,
    ) -> str:
        """Record a connection that carries many streams (an app session of
        the app proxy): the row and its ``workspace.connect`` audit entry.
        Authorization is the caller's; ``actor`` is None for an anonymous
        visitor of a public app. Close it with :meth:`record_close`."""
        connection = WorkspaceConnection(
            workspace_id=workspace_id,
            agent_id=agent_id,
            user_id=actor.user_id if actor else None,
            username=actor.username if actor else None,
            kind=target.audit_kind,
            target=target.label,
            ip=client.ip,
            user_agent=(client.user_agent or "")[:256] or None,
        )
        async with self.db.transaction() as session:
            session.add(connection)
        record = AuditRecord(ip=client.ip, user_agent=client.user_agent)
        if actor is not None:
            record.user_id, record.username = actor.user_id, actor.username
        record.describe(
            "workspace.connect",
            "workspace",
            workspace_id,
            resource_name=workspace_label,
            kind=target.audit_kind,
            connection_id=connection.id,
            **details,
        )
        if target.label:
            record.details["target"] = target.label
        await self._audit(record, 200)
        return connection.id

    async def record_close(
        self, connection_id: str, *, to_workspace: int, from_workspace: int, reason: str = ""
    ) -> None:
        """Close a connection :meth:`record_open` recorded, with its bytes."""
        await self._close_record(
            connection_id,
            CLOSE_NORMAL,
            reason,
            to_workspace=to_workspace,
            from_workspace=from_workspace,
        )

    async def dial(self, agent_id: str, target: StreamTarget) -> tuple[WebSocket, PendingStream]:
        """Ask the agent for a stream and wait for it to dial back."""
        # The id names this replica, for a dial-back that lands on another.
        prefix = self.agents.replica_id
        stream_id = prefix + secrets.token_hex((STREAM_ID_LENGTH - len(prefix)) // 2)
        pending = PendingStream(agent_id, asyncio.get_running_loop().create_future())
        self.agents.pending_streams[stream_id] = pending
        try:
            message = {"type": "open_stream", "id": stream_id, "kind": target.kind}
            message.update(target.fields)
            if not await self.agents.deliver(agent_id, message):
                raise StreamRefused(CLOSE_AGENT_UNAVAILABLE, "the agent is not connected")
            try:
                result = await asyncio.wait_for(
                    asyncio.shield(pending.dialed), DIAL_TIMEOUT_SECONDS
                )
            except TimeoutError:
                raise StreamRefused(
                    CLOSE_DIAL_TIMEOUT,
                    f"the agent did not open the stream within {DIAL_TIMEOUT_SECONDS:.0f}s",
                ) from None
        finally:
            del self.agents.pending_streams[stream_id]
            if not pending.dialed.done():
                pending.dialed.cancel()
        if isinstance(result, tuple):
            raise StreamRefused(result[0], result[1])
        return result, pending

    async def accept_dial(
        self, agent: WorkspaceAgent, stream_id: str, websocket: WebSocket
    ) -> None:
        """The agent's dial-back for ``stream_id``: hand it to the waiting
        client and hold it open until the relay is over; carry it to the
        replica that asked for it when that is another one."""
        if stream_id not in self.agents.pending_streams:
            asking = stream_id[: len(self.agents.replica_id)]
            if asking != self.agents.replica_id:
                async with self.db.session() as session:
                    url = (
                        await session.execute(select(Replica.address).where(Replica.id == asking))
                    ).scalar_one_or_none()
                if url is not None:
                    await self.hops.forward(websocket, url, stream_id, agent.id)
                    return
        await self.accept_stream(agent.id, stream_id, websocket)

    async def accept_stream(self, agent_id: str, stream_id: str, websocket: WebSocket) -> None:
        """A dial-back for a stream this replica asked for (from the agent
        itself, or over a hop from the replica it reached)."""
        pending = self.agents.pending_streams.get(stream_id)
        if pending is None or pending.agent_id != agent_id or pending.dialed.done():
            # Too late (the client gave up) or not this agent's stream.
            await websocket.close(code=CLOSE_DIAL_TIMEOUT)
            return
        await websocket.accept()
        pending.dialed.set_result(websocket)
        await pending.finished.wait()

    # --- relaying -------------------------------------------------------------------------

    async def relay(self, client: WebSocket, stream: OpenedStream) -> None:
        """Relay the client's WebSocket and the agent's until either closes,
        then record the close."""
        try:
            await client.send_text(OPENED_MESSAGE)
            to_agent = asyncio.ensure_future(self._pump(client, stream.agent, stream, True))
            to_client = asyncio.ensure_future(self._pump(stream.agent, client, stream, False))
            done, pending = await asyncio.wait(
                {to_agent, to_client}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                error = task.exception()
                # A side that vanished mid-send is how streams often end.
                if error is not None and not isinstance(
                    error, WebSocketDisconnect | RuntimeError | OSError
                ):
                    log.warning("relay_failed", error=repr(error))
            for websocket in (client, stream.agent):
                await _close(websocket, stream.close_code, stream.close_reason)
        finally:
            stream.pending.finished.set()
            await asyncio.shield(self.finish(stream))

    async def _pump(
        self, source: WebSocket, sink: WebSocket, stream: OpenedStream, to_workspace: bool
    ) -> None:
        receive, send = source.receive, sink.send
        while True:
            message = await receive()
            kind = message["type"]
            if kind == "websocket.receive":
                data = message.get("bytes")
                if data is not None:
                    if to_workspace:
                        stream.bytes_to_workspace += len(data)
                    else:
                        stream.bytes_from_workspace += len(data)
                    await send({"type": "websocket.send", "bytes": data})
                elif message.get("text") is not None:
                    await send({"type": "websocket.send", "text": message["text"]})
            elif kind == "websocket.disconnect":
                code = message.get("code", CLOSE_NORMAL)
                if code in _PASSED_ON:
                    stream.close_code = code
                    stream.close_reason = str(message.get("reason") or "")[:MAX_REASON]
                return

    async def finish(self, stream: OpenedStream) -> None:
        """Record the end of a stream: bytes each way, the close, an audit entry."""
        await self._close_record(
            stream.connection_id,
            stream.close_code,
            stream.close_reason,
            to_workspace=stream.bytes_to_workspace,
            from_workspace=stream.bytes_from_workspace,
        )

    async def _close_record(
        self,
        connection_id: str,
        code: int,
        reason: str,
        *,
        to_workspace: int = 0,
        from_workspace: int = 0,
    ) -> None:
        async with self.db.transaction() as session:
            connection = (
                await session.execute(
                    update(WorkspaceConnection)
                    .where(WorkspaceConnection.id == connection_id)
                    .values(
                        closed_at=utcnow(),
                        close_code=code,
                        close_reason=reason[:256] or None,
                        bytes_to_workspace=to_workspace,
                        bytes_from_workspace=from_workspace,
                    )
                    .returning(
                        WorkspaceConnection.workspace_id,
                        WorkspaceConnection.user_id,
                        WorkspaceConnection.username,
                        WorkspaceConnection.kind,
                        WorkspaceConnection.target,
                        WorkspaceConnection.ip,
                        WorkspaceConnection.user_agent,
                    )
                )
            ).one_or_none()
        if connection is None or (code == CLOSE_AGENT_UNAVAILABLE and not to_workspace):
            return
        record = AuditRecord(ip=connection.ip, user_agent=connection.user_agent)
        record.user_id, record.username = connection.user_id, connection.username
        record.describe(
            "workspace.disconnect",
            "workspace",
            connection.workspace_id,
            kind=connection.kind,
            connection_id=connection_id,
            bytes_to_workspace=to_workspace,
            bytes_from_workspace=from_workspace,
            close_code=code,
        )
        if connection.target:
            record.details["target"] = connection.target
        await self._audit(record, 200)

    async def _audit(self, record: AuditRecord, status: int, *, reason: str | None = None) -> None:
        if reason:
            record.details["reason"] = reason
        try:
            await write_record(self.db, record, status, key=self.audit_key)
        except Exception:
            log.exception("audit_write_failed", action=record.action)

    # --- reading ------------------------------------------------------------------------

    async def list(
        self, actor: Actor, owner_name: str, name: str, *, limit: int = 100
    ) -> types.WorkspaceConnectionList:
        """The workspace's most recent connections, open ones included."""
        async with self.db.session() as session:
            ws = await _visible_workspace(session, actor, owner_name, name)
            rows = (
                await session.execute(
                    select(WorkspaceConnection)
                    .where(WorkspaceConnection.workspace_id == ws.id)
                    .order_by(WorkspaceConnection.opened_at.desc(), WorkspaceConnection.id)
                    .limit(limit)
                )
            ).scalars()
            views = [
                types.WorkspaceConnection(
                    id=row.id,
                    kind=row.kind,
                    target=row.target,
                    username=row.username,
                    ip=row.ip,
                    opened_at=row.opened_at,
                    closed_at=row.closed_at,
                    bytes_to_workspace=row.bytes_to_workspace,
                    bytes_from_workspace=row.bytes_from_workspace,
                    close_code=row.close_code,
                    close_reason=row.close_reason,
                )
                for row in rows
            ]
        return types.WorkspaceConnectionList(connections=views)


async def _visible_workspace(
    session: AsyncSession, actor: Actor, owner_name: str, name: str
) -> Workspace:
    """The workspace ``owner_name/name`` if ``actor`` may see it; otherwise
    the same 404 as for one that does not exist."""
    owner = (
        await session.execute(select(User).where(User.username == owner_name))
    ).scalar_one_or_none()
    if owner is None:
        raise NotFound("workspace not found", reason="workspace_not_found")
    ws = (
        await session.execute(
            select(Workspace).where(
                Workspace.owner_id == owner.id,
                Workspace.name == name,
                Workspace.deleted.is_(False),
            )
        )
    ).scalar_one_or_none()
    if ws is None or not await may_read_workspace(session, actor, owner.id, ws.organization_id):
        raise NotFound("workspace not found", reason="workspace_not_found")
    return ws


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state == WebSocketState.DISCONNECTED:
        return
    with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
        await websocket.close(code=code, reason=reason)
