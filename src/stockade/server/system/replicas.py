"""Replicas: the ``stockade server`` processes of one deployment.

Each registers at start (a row in ``replicas``, with the ``replica_url`` the
others reach it at), renews its heartbeat every ``replica_heartbeat_seconds``
and removes its row at a clean stop. Every replica also removes the rows
whose heartbeat is older than three intervals (a replica that was killed),
so the health API and page list the live ones, with their versions; the
agents a dropped replica held are marked disconnected (those still running
have reconnected to another replica by then, which recorded itself).
"""

from __future__ import annotations

import os
import secrets
import socket
from datetime import timedelta

from sqlalchemy import delete, func, select, update

import stockade
from stockade.sdk import types
from stockade.server.db import Database
from stockade.server.db.models import Replica, WorkspaceAgent, utcnow
from stockade.server.observability import get_logger

log = get_logger("stockade.replicas")
MISSED_HEARTBEATS = 3


class ReplicaRegistry:
    def __init__(self, db: Database, *, address: str, heartbeat_seconds: float) -> None:
        self.db = db
        self.id = secrets.token_hex(8)
        self.address = address
        self.heartbeat_seconds = heartbeat_seconds

    async def register(self) -> None:
        now = utcnow()
        async with self.db.transaction() as session:
            if self.db.dialect != "postgresql":
                # One server per embedded database: a row left by a killed
                # predecessor is not another replica, nor are its agents connected.
                await session.execute(delete(Replica))
                await session.execute(
                    update(WorkspaceAgent)
                    .where(WorkspaceAgent.replica_id.is_not(None))
                    .values(replica_id=None, disconnected_at=now)
                )
            session.add(
                Replica(
                    id=self.id,
                    hostname=socket.gethostname()[:255],
                    pid=os.getpid(),
                    version=stockade.__version__,
                    address=self.address[:255],
                    started_at=now,
                    heartbeat_at=now,
                )
            )
        log.info("replica_registered", replica=self.id)

    async def heartbeat(self) -> None:
        """Renew this replica's row (again if another removed it) and drop
        the rows whose heartbeat stopped."""
        now = utcnow()
        async with self.db.transaction() as session:
            renewed = await session.execute(
                update(Replica).where(Replica.id == self.id).values(heartbeat_at=now)
            )
            stale = now - timedelta(seconds=self.heartbeat_seconds * MISSED_HEARTBEATS)
            dropped = (
                (
                    await session.execute(
                        delete(Replica).where(Replica.heartbeat_at < stale).returning(Replica.id)
                    )
                )
                .scalars()
                .all()
            )
            if dropped:
                await session.execute(
                    update(WorkspaceAgent)
                    .where(WorkspaceAgent.replica_id.in_(dropped))
                    .values(replica_id=None, disconnected_at=now)
                )
        if dropped:
            log.warning("replicas_dropped", replicas=",".join(dropped))
        if getattr(renewed, "rowcount", 1) == 0:
            await self.register()

    async def unregister(self) -> None:
        async with self.db.transaction() as session:
            await session.execute(delete(Replica).where(Replica.id == self.id))

    async def list(self) -> list[types.ReplicaInfo]:
        async with self.db.session() as session:
            counted = await session.execute(
                select(WorkspaceAgent.replica_id, func.count())
                .where(WorkspaceAgent.replica_id.is_not(None))
                .group_by(WorkspaceAgent.replica_id)
            )
            agents: dict[str | None, int] = dict(counted.tuples().all())
            rows = (await session.execute(select(Replica).order_by(Replica.started_at))).scalars()
            return [
                types.ReplicaInfo(
                    id=row.id,
                    hostname=row.hostname,
                    pid=row.pid,
                    version=row.version,
                    address=row.address,
                    started_at=row.started_at,
                    heartbeat_at=row.heartbeat_at,
                    agents=agents.get(row.id, 0),
                    this=row.id == self.id,
                )
                for row in rows
            ]
