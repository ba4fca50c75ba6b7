"""FastAPI dependencies shared by every domain's endpoints.

They are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in a
thread pool, a thread hop on every request for nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Query, Request

from stockade.server.audit.service import AuditRecord
from stockade.server.authz import Actor, current_actor

if TYPE_CHECKING:
    from stockade.server.services import Services


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def get_actor(request: Request) -> Actor:
    return current_actor(request)


async def get_audit(request: Request) -> AuditRecord:
    record: AuditRecord = request.state.audit
    return record


ServicesDep = Annotated["Services", Depends(get_services)]
ActorDep = Annotated[Actor, Depends(get_actor)]
AuditDep = Annotated[AuditRecord, Depends(get_audit)]
Limit = Annotated[int, Query(ge=1, le=1000, description="page size (1-1000)")]
Offset = Annotated[int, Query(ge=0, le=2**31, description="rows to skip")]
