"""Agent endpoints: the WebSocket agents connect out on, and their startup
logs for the workspace's users."""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Path, Query, Request, WebSocket
from fastapi.responses import Response

from stockade.agent.bundle import BUNDLE_PATH, agent_bundle
from stockade.agent.protocol import CONNECT_PATH
from stockade.sdk import types
from stockade.server.authz import public, signed_in
from stockade.server.deps import ActorDep, ServicesDep

router = APIRouter()

Owner = Annotated[str, Path(max_length=32, description="the owner's username")]
Name = Annotated[str, Path(max_length=32, description="workspace name")]


@router.websocket(CONNECT_PATH)
async def agent_connect(websocket: WebSocket) -> None:
    """Agents only, with their own token (``Authorization: Bearer``): a
    refused token closes the handshake with 403 before anything is read."""
    await websocket.app.state.services.agents.serve(websocket)


@router.get("/api/v2/workspaces/{owner}/{name}/agent/logs", dependencies=[signed_in()])
async def agent_logs(
    owner: Owner,
    name: Name,
    actor: ActorDep,
    services: ServicesDep,
    after: Annotated[int, Query(ge=0, le=2**62, description="only lines after this id")] = 0,
) -> types.AgentLogList:
    """What the workspace's startup script printed, as its agent reported it."""
    return await services.workspaces.agent_logs(actor, owner, name, after=after)


@router.api_route(
    BUNDLE_PATH,
    methods=["GET", "HEAD"],
    dependencies=[public()],
    response_class=Response,
    responses={200: {"content": {"application/zip": {}}}},
)
async def bundle(request: Request) -> Response:
    """The agent as one file (a Python zipapp: the agent, wsproto and h11),
    which every workspace's bootstrap downloads from here and caches by its
    sha256 (``X-Stockade-Sha256``). Public: it is this release's open code."""
    data, sha256 = await asyncio.to_thread(agent_bundle)
    etag = f'"{sha256}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    return Response(
        data,
        media_type="application/zip",
        headers={"X-Stockade-Sha256": sha256, "ETag": etag, "Cache-Control": "no-cache"},
    )
