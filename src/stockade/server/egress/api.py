"""``GET /api/v2/deployment/egress``: the egress report."""

from __future__ import annotations

from fastapi import APIRouter

from stockade.sdk import types
from stockade.server.authz import Perm, provisioner, requires
from stockade.server.deps import ServicesDep
from stockade.server.egress.service import PROVISIONERD_PREFIX

router = APIRouter()


@router.get("/api/v2/deployment/egress", dependencies=[requires(Perm.EGRESS_READ)])
async def egress_report(services: ServicesDep) -> types.EgressReport:
    """Every outbound connection and name lookup the server, its build
    workers, provisioner daemons and workspace agents attempted, allowed or
    denied, with counts and first/last seen; and the allow-list."""
    return await services.egress.report()


@router.post("/api/v2/provisionerd/egress", dependencies=[provisioner()])
async def provisionerd_egress(
    body: types.EgressRecords, services: ServicesDep
) -> types.EgressPolicyWire:
    """A provisioner daemon's counts since its last report; the answer is
    the allow-list its guard is to enforce."""
    services.egress.add_remote(PROVISIONERD_PREFIX + body.daemon, body.records)
    return types.EgressPolicyWire(policy=services.egress.policy.to_wire())
