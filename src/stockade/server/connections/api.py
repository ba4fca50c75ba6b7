"""Connection endpoints: the tunnel WebSocket clients open to a workspace,
the WebSocket agents dial back on for each stream, a workspace's SSH host key
and its recent connections."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Path, Query, WebSocket

from stockade.agent.protocol import CLOSE_TOKEN_REFUSED
from stockade.sdk import types
from stockade.server.authz import Actor, signed_in
from stockade.server.connections.hop import HOP_PATH
from stockade.server.connections.service import ClientInfo, StreamRefused, StreamTarget
from stockade.server.deps import ActorDep, ServicesDep
from stockade.server.errors import InvalidInput, StockadeError, Unauthenticated
from stockade.server.middleware import presented_token
from stockade.server.services import Services
from stockade.tunnel.protocol import (
    AGENT_STREAM_PATH,
    CLIENT_PATH,
    CLOSE_BAD_REQUEST,
    KIND_PTY,
    KIND_SSH,
    KIND_TCP,
    valid_port,
    valid_stream_id,
)

router = APIRouter()

Owner = Annotated[str, Path(max_length=32, description="the owner's username")]
Name = Annotated[str, Path(max_length=32, description="workspace name")]


def _close_code(exc: StockadeError) -> int:
    """HTTP-like status → tunnel close code (4400, 4401, 4403, 4404, 4409...)."""
    if isinstance(exc, StreamRefused):
        return exc.code
    return 4000 + exc.status_code


async def _actor(websocket: WebSocket, services: Services) -> Actor:
    presented = presented_token(websocket.headers)
    if presented is None:
        raise Unauthenticated("sign in first: no session or API token was sent")
    token, from_cookie = presented
    if from_cookie:
        # A browser sends cookies on cross-site WebSocket upgrades too: only
        # pages of this deployment's origin may use the session cookie.
        origin = websocket.headers.get("origin", "")
        access = urlsplit(services.settings.access_url)
        if origin != f"{access.scheme}://{access.netloc}":
            raise Unauthenticated("the session cookie is only accepted from this site's pages")
    client = websocket.client
    auth = await services.auth.authenticate(token, client.host if client else None)
    if auth.actor is None:
        raise Unauthenticated(auth.problem or "the session or API token is invalid")
    return auth.actor


_PTY_ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def _pty_size(rows: str | None, cols: str | None) -> dict[str, int]:
    """The optional window size of a pty stream (both or neither)."""
    if rows is None and cols is None:
        return {}
    values = [int(v) if v and v.isdecimal() and len(v) <= 4 else 0 for v in (rows, cols)]
    if not all(1 <= v <= 1000 for v in values):
        raise InvalidInput("rows and cols go together, each a number from 1 to 1000")
    return {"rows": values[0], "cols": values[1]}


def _target(
    kind: str,
    port: str | None,
    pty_id: str | None,
    rows: str | None = None,
    cols: str | None = None,
) -> StreamTarget:
    """The stream asked for, from the query (checked here rather than by
    FastAPI, whose refusal of a WebSocket carries no message)."""
    if kind == KIND_SSH:
        return StreamTarget(KIND_SSH, "ssh")
    if kind == KIND_TCP:
        number = int(port) if port and port.isdecimal() and len(port) <= 5 else 0
        if not valid_port(number):
            raise InvalidInput("a tcp stream needs ?port=N with N from 1 to 65535")
        return StreamTarget(KIND_TCP, "port", str(number), {"port": number})
    if kind == KIND_PTY:
        # The client names the terminal so that it can come back to it.
        if not pty_id or len(pty_id) > 64 or not set(pty_id) <= _PTY_ID_CHARACTERS:
            raise InvalidInput(
                "a pty stream needs ?id= with 1 to 64 letters, digits, '-', '_' or '.'"
            )
        return StreamTarget(KIND_PTY, "pty", None, {"pty_id": pty_id, **_pty_size(rows, cols)})
    raise InvalidInput(f"kind must be ssh, tcp or pty, not {kind[:16]!r}")


@router.websocket(CLIENT_PATH)
async def tunnel(
    websocket: WebSocket,
    owner: Owner,
    name: Name,
    kind: str = KIND_SSH,
    port: str | None = None,
    pty_id: Annotated[str | None, Query(alias="id")] = None,
    rows: str | None = None,
    cols: str | None = None,
) -> None:
    """A byte stream to the workspace: ``kind=ssh`` (its SSH server),
    ``kind=tcp&port=N`` (a port inside it) or ``kind=pty&id=ID`` (a
    reconnecting terminal; ``rows``/``cols`` optional). Authenticated like
    the API (Bearer token; the session cookie from this site's pages).
    Refusals accept, then close with a tunnel close code (4400, 4401, 4403,
    4404, 4409, 4502...) and a reason to show."""
    services: Services = websocket.app.state.services
    await websocket.accept()
    client = websocket.client
    try:
        target = _target(kind, port, pty_id, rows, cols)
        actor = await _actor(websocket, services)
        stream = await services.connections.open(
            actor,
            owner,
            name,
            target,
            ClientInfo(client.host if client else None, websocket.headers.get("user-agent")),
        )
    except StockadeError as exc:
        await websocket.close(code=_close_code(exc), reason=exc.message[:120])
        return
    await services.connections.relay(websocket, stream)


@router.websocket(AGENT_STREAM_PATH)
async def agent_stream(websocket: WebSocket, stream_id: str) -> None:
    """Agents only: the dial-back for a stream the server asked for."""
    services: Services = websocket.app.state.services
    agent = await services.agents.authenticate(websocket)
    if agent is None:
        await websocket.close(code=CLOSE_TOKEN_REFUSED)
        return
    if not valid_stream_id(stream_id):
        await websocket.close(code=CLOSE_BAD_REQUEST)
        return
    await services.connections.accept_dial(agent, stream_id, websocket)


@router.websocket(HOP_PATH)
async def replica_stream(websocket: WebSocket, stream_id: str) -> None:
    """Replicas only: an agent's dial-back that reached another replica,
    carried here because this replica asked for the stream (signed with the
    deployment's key; see :mod:`stockade.server.connections.hop`)."""
    services: Services = websocket.app.state.services
    agent_id = services.connections.hops.check(websocket, stream_id)
    if agent_id is None or not valid_stream_id(stream_id):
        await websocket.close(code=CLOSE_TOKEN_REFUSED)
        return
    await services.connections.accept_stream(agent_id, stream_id, websocket)


@router.get("/api/v2/workspaces/{owner}/{name}/ssh", dependencies=[signed_in()])
async def ssh_info(
    owner: Owner, name: Name, actor: ActorDep, services: ServicesDep
) -> types.WorkspaceSSHInfo:
    """The workspace's SSH host public key, for a pinned ``known_hosts``
    (``stockade config-ssh`` writes it): stable for the workspace's life."""
    return await services.connections.host_key(actor, owner, name)


@router.get("/api/v2/workspaces/{owner}/{name}/connections", dependencies=[signed_in()])
async def connections(
    owner: Owner,
    name: Name,
    actor: ActorDep,
    services: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="how many, newest first")] = 100,
) -> types.WorkspaceConnectionList:
    """The workspace's recent connections (ssh, port, app, pty): who, from
    where, when, and the bytes each way once closed."""
    return await services.connections.list(actor, owner, name, limit=limit)
