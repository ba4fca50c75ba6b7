"""Health, build info and metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

import stockade
from stockade.sdk import types
from stockade.server.authz import Perm, public, requires
from stockade.server.deps import ServicesDep
from stockade.server.system import service

router = APIRouter()


@router.get("/healthz", response_class=PlainTextResponse)
async def healthz() -> str:
    """Liveness for load balancers: the process answers."""
    return "ok"


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics. Carries no secrets; firewall it like any exporter."""
    pool = services.db.pool_status()
    services.metrics.db_pool_size.set(pool["size"])
    services.metrics.db_pool_checked_out.set(pool["checked_out"])
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v2/buildinfo", dependencies=[public()])
async def buildinfo(services: ServicesDep) -> types.BuildInfo:
    return types.BuildInfo(version=stockade.__version__, dialect=services.db.dialect)


@router.get("/api/v2/debug/health", dependencies=[requires(Perm.DEPLOYMENT_READ)])
async def debug_health(services: ServicesDep) -> types.Health:
    """Database reachability and latency, migration state, background jobs,
    the built-in build workers and the orphans the reconciler last removed."""
    return await service.health(services)
