"""``GET /api/v2/deployment/egress``: the egress report."""

from __future__ import annotations

from fastapi import APIRouter

from stockade.sdk import types
from stockade.server.authz import Perm, requires
from stockade.server.deps import ServicesDep

router = APIRouter()


@router.get("/api/v2/deployment/egress", dependencies=[requires(Perm.EGRESS_READ)])
async def egress_report(services: ServicesDep) -> types.EgressReport:
    """Every outbound connection and name lookup the server, its build
    workers, provisioner daemons and workspace agents attempted, allowed or
    denied, with counts and first/last seen; and the allow-list."""
    return await services.egress.report()
