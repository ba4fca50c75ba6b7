"""Workspace endpoints: thin wrappers over ``WorkspaceService``. Workspaces
are addressed as ``/workspaces/{owner}/{name}``; members reach only their own
(others' are 404), owners and user-admins everyone's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import StreamingResponse

from stockade.sdk import types
from stockade.server.authz import signed_in
from stockade.server.deps import ActorDep, AuditDep, ServicesDep

router = APIRouter(prefix="/api/v2")

Owner = Annotated[str, Path(max_length=32, description="the owner's username")]
Name = Annotated[str, Path(max_length=32, description="workspace name")]
Number = Annotated[int, Path(ge=1, le=2**31 - 1, description="build number")]
BASE = "/workspaces/{owner}/{name}"


@router.get("/workspaces", dependencies=[signed_in()])
async def list_workspaces(
    actor: ActorDep,
    services: ServicesDep,
    owner: Annotated[
        str | None, Query(max_length=32, description="only this user's workspaces")
    ] = None,
) -> types.WorkspaceList:
    """Workspaces the caller may see (members: their own), oldest first."""
    return await services.workspaces.list(actor, owner=owner)


@router.post(
    "/workspaces",
    dependencies=[signed_in()],
    status_code=201,
    responses={400: {"model": types.ApiError}, 409: {"model": types.ApiError}},
)
async def create_workspace(
    body: types.CreateWorkspaceRequest, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> types.Workspace:
    """Create a workspace from a template's active version and queue its
    first start build. Parameter problems are a 400 naming each parameter."""
    return await services.workspaces.create(actor, body, record)


@router.get(BASE, dependencies=[signed_in()])
async def get_workspace(
    owner: Owner, name: Name, actor: ActorDep, services: ServicesDep
) -> types.Workspace:
    return await services.workspaces.get(actor, owner, name)


@router.get(f"{BASE}/builds", dependencies=[signed_in()])
async def list_builds(
    owner: Owner, name: Name, actor: ActorDep, services: ServicesDep
) -> types.WorkspaceBuildList:
    """Every build of the workspace, oldest first."""
    return await services.workspaces.builds(actor, owner, name)


@router.post(
    f"{BASE}/builds",
    dependencies=[signed_in()],
    status_code=201,
    responses={400: {"model": types.ApiError}, 409: {"model": types.ApiError}},
)
async def create_build(
    owner: Owner,
    name: Name,
    body: types.CreateBuildRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> types.WorkspaceBuild:
    """Queue a transition: start (``update`` moves to the template's active
    version), stop, restart (a stop that queues a start) or delete. A build in
    progress is a 409 naming it, unless ``cancel_running``."""
    return await services.workspaces.create_build(actor, owner, name, body, record)


@router.get(f"{BASE}/builds/{{number}}", dependencies=[signed_in()])
async def get_build(
    owner: Owner, name: Name, number: Number, actor: ActorDep, services: ServicesDep
) -> types.WorkspaceBuild:
    return await services.workspaces.build(actor, owner, name, number)


@router.post(f"{BASE}/builds/{{number}}/cancel", dependencies=[signed_in()])
async def cancel_build(
    owner: Owner,
    name: Name,
    number: Number,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> types.WorkspaceBuild:
    """Cancel a pending build now, or ask the worker of a running one to stop."""
    return await services.workspaces.cancel(actor, owner, name, number, record)


async def _ndjson(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    async for event in events:
        yield json.dumps(event).encode() + b"\n"


@router.get(
    f"{BASE}/logs",
    dependencies=[signed_in()],
    responses={200: {"content": {"application/x-ndjson": {}}}},
    response_model=None,
)
async def build_logs(
    owner: Owner,
    name: Name,
    actor: ActorDep,
    services: ServicesDep,
    build: Annotated[
        int | None, Query(ge=1, le=2**31 - 1, description="build number (default: the latest)")
    ] = None,
    after: Annotated[int, Query(ge=0, le=2**62, description="only lines after this id")] = 0,
    follow: Annotated[
        bool,
        Query(
            description="stream lines as they come (application/x-ndjson) until the build "
            'ends, then an {"type": "end"} line'
        ),
    ] = False,
) -> types.BuildLogList | StreamingResponse:
    """A build's log lines (at most 1000 per call; page with ``after``)."""
    if not follow:
        return await services.workspaces.logs(actor, owner, name, build, after=after)
    events = await services.workspaces.follow_logs(actor, owner, name, build, after=after)
    return StreamingResponse(
        _ndjson(events),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )
