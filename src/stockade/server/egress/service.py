"""The deployment's egress report: what the egress guards of the server, its
build workers, provisioner daemons and workspace agents counted, kept in the
database so that every replica adds to one report that survives restarts."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite

from stockade.egress import EgressLedger, EgressPolicy, EgressRecord, is_internal
from stockade.egress.guard import INTERNAL_REASONS
from stockade.sdk import types
from stockade.server.db import Database, User
from stockade.server.db.models import EgressDestination, Workspace

log = logging.getLogger(__name__)

AGENT_PREFIX = "agent:"
PROVISIONERD_PREFIX = "provisionerd:"
# A remote component sends at most this many records at once.
MAX_REMOTE_RECORDS = 500


def _when(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class EgressService:
    """Drains the process's ledger into the database and reads the report."""

    def __init__(self, db: Database, policy: EgressPolicy, ledger: EgressLedger) -> None:
        self.db = db
        self.policy = policy
        self.ledger = ledger

    def add_remote(self, component: str, records: Any) -> int:
        """Count what another process's guard sent (an agent's, a provisioner
        daemon's) under ``component``; malformed records are dropped.
        Returns how many were taken."""
        if not isinstance(records, list):
            return 0
        taken: list[EgressRecord] = []
        for data in records[:MAX_REMOTE_RECORDS]:
            if not isinstance(data, dict):
                continue
            try:
                taken.append(EgressRecord.from_dict(data, component))
            except ValueError:
                continue
        self.ledger.add(taken)
        return len(taken)

    async def flush(self) -> None:
        """Write what the ledger counted since the last flush; on failure the
        counts go back to the ledger for the next one."""
        records = self.ledger.drain()
        if not records:
            return
        try:
            await self._upsert(records)
        except BaseException:
            self.ledger.add(records)
            raise

    async def _upsert(self, records: list[EgressRecord]) -> None:
        table = EgressDestination.__table__
        dialect = postgresql if self.db.dialect == "postgresql" else sqlite
        greatest = func.greatest if self.db.dialect == "postgresql" else func.max
        least = func.least if self.db.dialect == "postgresql" else func.min
        rows = [
            {
                "component": r.component,
                "kind": r.kind,
                "destination": r.destination,
                "port": r.port,
                "allowed": r.allowed,
                "reason": r.reason,
                "count": r.count,
                "first_seen": _when(r.first_seen),
                "last_seen": _when(r.last_seen),
            }
            for r in records
        ]
        statement = dialect.insert(table).values(rows)
        statement = statement.on_conflict_do_update(
            index_elements=["component", "kind", "destination", "port", "allowed"],
            set_={
                "count": table.c.count + statement.excluded.count,
                "reason": statement.excluded.reason,
                "first_seen": least(table.c.first_seen, statement.excluded.first_seen),
                "last_seen": greatest(table.c.last_seen, statement.excluded.last_seen),
            },
        )
        async with self.db.transaction() as session:
            await session.execute(statement)

    async def report(self) -> types.EgressReport:
        """Everything counted so far (this process's latest counts included)."""
        await self.flush()
        async with self.db.session() as session:
            rows = (
                (
                    await session.execute(
                        select(EgressDestination).order_by(
                            EgressDestination.allowed,
                            EgressDestination.component,
                            EgressDestination.destination,
                            EgressDestination.port,
                            EgressDestination.kind,
                        )
                    )
                )
                .scalars()
                .all()
            )
            workspace_ids = {
                r.component.removeprefix(AGENT_PREFIX)
                for r in rows
                if r.component.startswith(AGENT_PREFIX)
            }
            names: dict[str, str] = {}
            if workspace_ids:
                found = await session.execute(
                    select(Workspace.id, User.username, Workspace.name)
                    .join(User, User.id == Workspace.owner_id)
                    .where(Workspace.id.in_(workspace_ids))
                )
                names = {wid: f"{owner}/{name}" for wid, owner, name in found.all()}
        destinations = []
        for row in rows:
            component, workspace = row.component, None
            if component.startswith(AGENT_PREFIX):
                workspace_id = component.removeprefix(AGENT_PREFIX)
                component = "agent"
                # A deleted workspace's agent still made its attempts.
                workspace = names.get(workspace_id, f"(deleted workspace {workspace_id})")
            destinations.append(
                types.EgressDestination(
                    component=component,
                    workspace=workspace,
                    kind=row.kind,
                    destination=row.destination,
                    port=row.port,
                    allowed=row.allowed,
                    internal=row.reason in INTERNAL_REASONS or is_internal(row.destination),
                    reason=row.reason,
                    count=row.count,
                    first_seen=row.first_seen,
                    last_seen=row.last_seen,
                )
            )
        return types.EgressReport(
            allow_list=self.policy.describe(),
            denied=sum(d.count for d in destinations if not d.allowed),
            external_allowed=sum(1 for d in destinations if d.allowed and not d.internal),
            destinations=destinations,
        )
