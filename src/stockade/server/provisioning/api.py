"""Provisioner keys (owners) and the protocol ``stockade provisionerd``
speaks, authenticated by a provisioner key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from stockade.sdk import types
from stockade.server.authz import Perm, provisioner, requires
from stockade.server.deps import ActorDep, AuditDep, ServicesDep
from stockade.server.events import JOBS
from stockade.server.provisioning.service import WorkerIdentity

router = APIRouter(prefix="/api/v2")

KeyName = Annotated[str, Path(max_length=64, description="provisioner key name")]
BuildId = Annotated[str, Path(max_length=36, description="build id")]


@router.get("/provisioner-keys", dependencies=[requires(Perm.PROVISIONER_ADMIN)])
async def list_keys(actor: ActorDep, services: ServicesDep) -> types.ProvisionerKeyList:
    return await services.provisioning.list_keys(actor)


@router.post("/provisioner-keys", dependencies=[requires(Perm.PROVISIONER_ADMIN)], status_code=201)
async def create_key(
    body: types.CreateProvisionerKeyRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> types.CreatedProvisionerKey:
    """A key for ``stockade provisionerd start --key``; the secret is shown once."""
    return await services.provisioning.create_key(actor, body.name, record)


@router.delete(
    "/provisioner-keys/{name}",
    dependencies=[requires(Perm.PROVISIONER_ADMIN)],
    status_code=204,
    response_class=Response,
)
async def delete_key(
    name: KeyName, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> None:
    """Revoke a key: daemons using it are refused from their next call."""
    await services.provisioning.delete_key(actor, name, record)


# --- the daemon protocol -----------------------------------------------------------


@router.post(
    "/provisionerd/acquire",
    dependencies=[provisioner()],
    responses={200: {"model": types.ProvisionerJob}, 204: {"description": "no build to run"}},
    response_model=None,
)
async def acquire(
    body: types.AcquireJobRequest,
    request: Request,
    services: ServicesDep,
    wait: Annotated[
        float, Query(ge=0, le=30, description="seconds to wait for a build before a 204")
    ] = 0,
) -> types.ProvisionerJob | Response:
    """Lease the next build of one of the worker's backends (long poll)."""
    worker = WorkerIdentity(body.worker_id, body.worker_name)
    backends = list(body.backends)
    job = await services.provisioning.acquire(worker, backends)
    if job is None and wait > 0:
        await services.notifier.wait(JOBS, wait)
        # A daemon that went away while waiting must not be handed a build:
        # it would hold it until the lease ran out and cost it an attempt.
        if await request.is_disconnected():
            return Response(status_code=204)
        job = await services.provisioning.acquire(worker, backends)
    return job if job is not None else Response(status_code=204)


@router.post("/provisionerd/jobs/{build_id}/heartbeat", dependencies=[provisioner()])
async def heartbeat(
    build_id: BuildId, body: types.JobHeartbeatRequest, services: ServicesDep
) -> types.JobHeartbeat:
    """Renew the lease; ``cancel`` says the build is to be dropped."""
    return types.JobHeartbeat(
        cancel=await services.provisioning.heartbeat(build_id, body.worker_id)
    )


@router.post(
    "/provisionerd/jobs/{build_id}/logs",
    dependencies=[provisioner()],
    status_code=204,
    response_class=Response,
)
async def logs(build_id: BuildId, body: types.JobLogs, services: ServicesDep) -> None:
    await services.provisioning.append_logs(
        build_id, body.worker_id, body.lines, stage_started=body.stage_started
    )


@router.get(
    "/provisionerd/jobs/{build_id}/archive",
    dependencies=[provisioner()],
    response_class=Response,
    responses={200: {"content": {"application/gzip": {}}}},
)
async def archive(
    build_id: BuildId,
    services: ServicesDep,
    worker_id: Annotated[str, Query(min_length=1, max_length=64)],
) -> Response:
    """The template archive of a build the worker holds."""
    data = await services.provisioning.archive(build_id, worker_id)
    return Response(data, media_type="application/gzip")


@router.post(
    "/provisionerd/jobs/{build_id}/complete",
    dependencies=[provisioner()],
    status_code=204,
    response_class=Response,
)
async def complete(
    build_id: BuildId, body: types.CompleteJobRequest, services: ServicesDep
) -> None:
    await services.provisioning.complete(
        build_id,
        body.worker_id,
        body.status,
        state=body.state,
        reason=body.reason,
        error=body.error,
    )
