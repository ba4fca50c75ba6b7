"""Audit log endpoints: owners and auditors only."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import StreamingResponse

from stockade.sdk import types
from stockade.server.audit import service
from stockade.server.authz import Perm, requires
from stockade.server.db import AuditEntry
from stockade.server.deps import Limit, Offset, ServicesDep
from stockade.server.errors import InvalidInput

router = APIRouter(prefix="/api/v2/audit", dependencies=[requires(Perm.AUDIT_READ)])


async def audit_filter(
    actor: Annotated[str | None, Query(max_length=64, description="username or user id")] = None,
    action: Annotated[str | None, Query(max_length=64, description="e.g. user.create")] = None,
    resource_type: Annotated[str | None, Query(max_length=32)] = None,
    resource_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601 time, exclusive")] = None,
) -> service.AuditFilter:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f"{name} needs a time zone, e.g. 2026-01-31T12:00:00Z")
    try:
        since, until = (v.astimezone(UTC) if v else None for v in (since, until))
    except OverflowError as exc:
        raise InvalidInput("since/until is outside the range of dates the log can hold") from exc
    if since and until and since >= until:
        raise InvalidInput("since must be earlier than until")
    return service.AuditFilter(actor, action, resource_type, resource_id, since, until)


FilterDep = Annotated[service.AuditFilter, Depends(audit_filter)]


@router.get("")
async def list_audit(
    flt: FilterDep, services: ServicesDep, limit: Limit = 100, offset: Offset = 0
) -> types.AuditList:
    """Entries, newest first."""
    rows, count = await service.list_entries(services.db, flt, limit=limit, offset=offset)
    return types.AuditList(entries=[types.AuditEntry.model_validate(r) for r in rows], count=count)


@router.get("/verify")
async def verify_audit(services: ServicesDep) -> types.AuditVerification:
    """Recompute the hash chain and name the first entry that no longer fits."""
    result = await service.verify(services.db, key=services.audit_key)
    return types.AuditVerification.model_validate(result)


@router.get("/export", response_class=StreamingResponse)
async def export_audit(flt: FilterDep, services: ServicesDep) -> StreamingResponse:
    """JSON lines, oldest first, for a SIEM."""

    rows = service.stream_entries(services.db, flt)
    # Read the first row before answering, so that a failing query is an error
    # response and not a 200 that breaks off.
    first = await anext(rows, None)

    async def lines() -> AsyncIterator[bytes]:
        if first is None:
            return
        yield _json_line(first)
        async for row in rows:
            yield _json_line(row)

    return StreamingResponse(lines(), media_type="application/x-ndjson")


def _json_line(row: AuditEntry) -> bytes:
    entry = types.AuditEntry.model_validate(row)
    return (json.dumps(entry.model_dump(mode="json"), sort_keys=True) + "\n").encode()
