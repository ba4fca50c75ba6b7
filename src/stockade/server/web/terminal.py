"""Dashboard page: the web terminal of a workspace.

The page is a shell around xterm.js (``static/js/terminal.js``); the bytes go
over the tunnel WebSocket every client uses (``kind=pty``, see
:mod:`stockade.tunnel.protocol`), which authenticates the browser by its
session cookie and this site's Origin, and checks the connect permission and
records the connection itself. The page only checks up front what it can
explain better than a closed WebSocket can: the workspace exists, the user may
connect to it, its agent is there.

The terminal's id (the agent's reconnecting PTY) is in the page's address
(``?session=ID``), so a reload resumes the same shell with its recent output;
the page proposes a fresh id for a first visit and for "New terminal".
"""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from stockade.sdk import types
from stockade.server.connections.service import AgentUnavailable
from stockade.server.deps import ServicesDep
from stockade.server.errors import InvalidInput
from stockade.server.web.core import PageActor, render
from stockade.tunnel.protocol import CLIENT_PATH

router = APIRouter(include_in_schema=False)  # pages, not API

Owner = Annotated[str, Path(max_length=32)]
Name = Annotated[str, Path(max_length=32)]
# Checked by hand below for a message a person can act on.
Session = Annotated[str | None, Query(alias="session", max_length=200)]

# The tunnel's rule for a PTY id (connections/api.py): 1-64 of these.
_SESSION_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_SESSION_LENGTH = 64


def _session(value: str | None) -> str | None:
    if value is None:
        return None
    if not 1 <= len(value) <= MAX_SESSION_LENGTH or not set(value) <= _SESSION_CHARACTERS:
        raise InvalidInput(
            "The terminal session in the address must be 1 to 64 letters, digits, "
            "'-', '_' or '.'; open the terminal from the workspace's page for a new one."
        )
    return value


def new_session() -> str:
    """A fresh terminal id (the agent starts a new shell for an id it does not know)."""
    return secrets.token_hex(8)


def _unavailable(ws: types.Workspace) -> str:
    """Why there is no terminal now, in the dashboard's words (the service's
    message speaks of the CLI)."""
    where = f"{ws.owner_name}/{ws.name}"
    if ws.agent is None:
        return (
            f"Workspace {where} is {ws.status.replace('_', ' ')}, so it has no terminal: "
            "start it from its page, then open the terminal again."
        )
    return (
        f"The agent of workspace {where} is not connected ({ws.agent.status}); it may "
        "still be starting, or the workspace may have stopped. Try again in a moment."
    )


@router.get("/workspaces/{owner}/{name}/terminal")
async def terminal(
    request: Request,
    owner: Owner,
    name: Name,
    actor: PageActor,
    services: ServicesDep,
    session: Session = None,
) -> Response:
    chosen = _session(session)
    ws = await services.workspaces.get(actor, owner, name)  # not visible: 404
    unavailable = None
    try:
        # The tunnel's own check: may connect (else 403), agent connected.
        await services.connections.find_agent(actor, ws.owner_name, ws.name)
    except AgentUnavailable:
        unavailable = _unavailable(ws)
    return render(
        request,
        "terminal.html",
        {
            "body_class": "terminal-page",
            "workspace": ws,
            "workspace_url": f"/workspaces/{ws.owner_name}/{ws.name}",
            "tunnel_path": CLIENT_PATH.format(owner=ws.owner_name, name=ws.name),
            "session": chosen or "",
            "proposed_session": new_session(),
            "fresh_session": new_session(),
            "unavailable": unavailable,
        },
    )
