"""The build queue and provisioner keys.

Builds are the jobs: a worker (in the server or a ``stockade provisionerd``)
acquires the oldest pending build of a backend it serves, holding a lease it
renews by heartbeat; it streams log lines and completes the build. A lease
that runs out means the worker died: the reaper puts the build back in the
queue (backends are idempotent) or, after ``MAX_ATTEMPTS``, fails it with a
reason. A build that outlives its timeout is canceled, so none stays running
for ever.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from stockade.agent.bundle import agent_bundle
from stockade.provisioner.backends.base import SEALED_STATE_KEY
from stockade.sdk import types
from stockade.server.agents.service import AgentService
from stockade.server.audit.service import AuditRecord, append
from stockade.server.auth import keys
from stockade.server.authz import Actor, Perm, authorize
from stockade.server.db import Database
from stockade.server.db.models import (
    BuildLog,
    DeploymentInfo,
    ProvisionerKey,
    Template,
    TemplateVersion,
    User,
    Workspace,
    WorkspaceBuild,
    utcnow,
)
from stockade.server.errors import Conflict, NotFound, Unauthenticated
from stockade.server.events import JOBS, Notifier, build_key
from stockade.server.observability import get_logger
from stockade.server.secretbox import SecretBox, SecretBoxError

log = get_logger("stockade.provisioning")

MAX_ATTEMPTS = 2
# In the names of the server's own workers: "<host>:<pid>/built-in-<n>".
BUILT_IN_MARK = "/built-in-"
MAX_LOG_LINES = 20_000  # per build; later lines are dropped with one notice
MAX_LOG_LINE = 4096  # characters kept of one line


class LeaseLost(Conflict):
    """The worker no longer holds the build (its lease ran out, or the build
    was finished by someone else): it must stop working on it."""

    status_code = 409
    default_reason = "lease_lost"


@dataclass(frozen=True)
class WorkerIdentity:
    worker_id: str
    worker_name: str


def _lease_lost(build_id: str) -> LeaseLost:
    return LeaseLost(f"this worker no longer holds build {build_id}; drop it", reason="lease_lost")


def _stage_end(stages: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    out = [dict(s) for s in stages]
    if out and not out[-1].get("finished_at"):
        out[-1]["finished_at"] = now.isoformat()
    return out


class ProvisioningService:
    def __init__(
        self,
        db: Database,
        notifier: Notifier,
        *,
        access_url: str,
        lease_seconds: int,
        timeout_seconds: int,
        audit_key: bytes,
        agents: AgentService,
        agent_ca: str | None = None,
    ) -> None:
        self.agents = agents
        # Sent with every job: external provisionerd daemons get it this way too.
        self.agent_ca = agent_ca
        self.db = db
        self.notifier = notifier
        self.access_url = access_url
        self.lease_seconds = lease_seconds
        self.timeout_seconds = timeout_seconds
        self.audit_key = audit_key
        # Seals the secret part of backends' state (Terraform state) at rest.
        self.secrets = SecretBox(audit_key)
        self._deployment_id: str | None = None
        self._bundle_sha: str | None = None

    # --- deployment id ---------------------------------------------------------------

    async def deployment_id(self) -> str:
        """Made once per deployment (the first start) and kept in the database."""
        if self._deployment_id is not None:
            return self._deployment_id
        async with self.db.session() as session:
            found = (
                await session.execute(select(DeploymentInfo.deployment_id))
            ).scalar_one_or_none()
        if found is None:
            try:
                async with self.db.transaction() as session:
                    session.add(DeploymentInfo(id=1, deployment_id=secrets.token_hex(16)))
            except IntegrityError:
                pass  # another process made it first
            async with self.db.session() as session:
                found = (await session.execute(select(DeploymentInfo.deployment_id))).scalar_one()
        self._deployment_id = str(found)
        return self._deployment_id

    async def _bundle_sha256(self) -> str:
        """The sha256 of the agent bundle this server serves (built once, in a
        thread: zipping the agent takes a moment)."""
        if self._bundle_sha is None:
            self._bundle_sha = (await asyncio.to_thread(agent_bundle))[1]
        return self._bundle_sha

    # --- the queue -------------------------------------------------------------------

    async def acquire(
        self, worker: WorkerIdentity, backends: Sequence[str]
    ) -> types.ProvisionerJob | None:
        """Lease the oldest pending build of one of ``backends`` whose
        workspace has no other build in progress; ``None`` when there is none."""
        deployment_id = await self.deployment_id()
        other = aliased(WorkspaceBuild)
        busy = exists().where(
            other.workspace_id == WorkspaceBuild.workspace_id,
            other.status.in_(("running", "canceling")),
        )
        candidate = (
            select(WorkspaceBuild.id)
            .join(Workspace, Workspace.id == WorkspaceBuild.workspace_id)
            .where(
                WorkspaceBuild.status == "pending",
                WorkspaceBuild.backend.in_(backends),
                Workspace.deleted.is_(False),
                ~busy,
            )
            .order_by(WorkspaceBuild.created_at, WorkspaceBuild.id)
            .limit(1)
        )
        if self.db.dialect == "postgresql":
            candidate = candidate.with_for_update(of=WorkspaceBuild, skip_locked=True)
        bundle_sha256 = await self._bundle_sha256()
        now = utcnow()
        async with self.db.transaction() as session:
            build_id = (await session.execute(candidate)).scalar_one_or_none()
            if build_id is None:
                return None
            build = (
                await session.execute(select(WorkspaceBuild).where(WorkspaceBuild.id == build_id))
            ).scalar_one()
            build.status = "running"
            build.worker_id = worker.worker_id
            build.worker_name = worker.worker_name or worker.worker_id
            build.lease_expires_at = now + timedelta(seconds=self.lease_seconds)
            build.attempts += 1
            if build.started_at is None:
                build.started_at = now
            ws, owner, template, version = (
                await session.execute(
                    select(Workspace, User, Template, TemplateVersion)
                    .join(User, User.id == Workspace.owner_id)
                    .join(Template, Template.id == Workspace.template_id)
                    .join(TemplateVersion, TemplateVersion.id == build.template_version_id)
                    .where(Workspace.id == build.workspace_id)
                )
            ).one()
            try:
                state = self._unseal(ws.state, ws.id)
            except SecretBoxError:
                # A restore under another audit key: this build can never
                # run, and leaving it pending would stall the queue behind it.
                build.status = "failed"
                build.reason = "state_unreadable"
                build.error = (
                    "the workspace's stored backend state does not decrypt with this server's "
                    "audit key (was the database restored under another key?); restore the key "
                    "the state was written with (--audit-key or DATA_DIR/audit.key)"
                )
                build.finished_at = now
                build.lease_expires_at = None
                log.error("build_state_unreadable", build_id=build.id, workspace_id=ws.id)
                return None
            agent_token = None
            if build.transition == "start":
                # New at every attempt: a retry replaces the compute the
                # previous attempt may have left with the old token.
                agent_token = await self.agents.issue(session, ws.id, build.id)
            job = types.ProvisionerJob(
                agent_token=agent_token,
                agent_bundle_sha256=bundle_sha256,
                agent_ca=self.agent_ca,
                build_id=build.id,
                build_number=build.number,
                transition=build.transition,
                workspace_id=ws.id,
                workspace_name=ws.name,
                owner_id=owner.id,
                owner_name=owner.username,
                deployment_id=deployment_id,
                template_name=template.name,
                template_version=version.number,
                manifest=version.manifest,
                parameters=build.parameters,
                state=state,
                access_url=self.access_url,
                lease_seconds=self.lease_seconds,
                timeout_seconds=self.timeout_seconds,
                archive_sha256=version.archive_sha256,
            )
            if build.attempts > 1:
                session.add(
                    BuildLog(
                        build_id=build.id,
                        level="warn",
                        line=f"retrying on {build.worker_name} (attempt {build.attempts}): the "
                        "previous worker stopped answering",
                    )
                )
        log.info(
            "build_acquired",
            build_id=job.build_id,
            workspace=f"{job.owner_name}/{job.workspace_name}",
            transition=job.transition,
            worker=worker.worker_name,
        )
        self.notifier.notify(build_key(job.build_id))
        return job

    def _seal(self, state: dict[str, Any], workspace_id: str) -> dict[str, Any]:
        """``state`` with its secret part (``SEALED_STATE_KEY``) encrypted."""
        secret = state.get(SEALED_STATE_KEY)
        if secret is None:
            return state
        text = json.dumps(secret, separators=(",", ":"))
        return {**state, SEALED_STATE_KEY: self.secrets.encrypt(text, context=workspace_id)}

    def _unseal(self, state: dict[str, Any], workspace_id: str) -> dict[str, Any]:
        sealed = state.get(SEALED_STATE_KEY)
        if not isinstance(sealed, str):
            return state
        text = self.secrets.decrypt(sealed, context=workspace_id)
        return {**state, SEALED_STATE_KEY: json.loads(text)}

    async def _held(self, session: AsyncSession, build_id: str, worker_id: str) -> WorkspaceBuild:
        query = select(WorkspaceBuild).where(WorkspaceBuild.id == build_id)
        if self.db.dialect == "postgresql":
            query = query.with_for_update()
        build = (await session.execute(query)).scalar_one_or_none()
        if (
            build is None
            or build.worker_id != worker_id
            or build.status not in ("running", "canceling")
        ):
            raise _lease_lost(build_id)
        return build

    async def heartbeat(self, build_id: str, worker_id: str) -> bool:
        """Renew the lease; True when the build was asked to cancel."""
        async with self.db.transaction() as session:
            result = await session.execute(
                update(WorkspaceBuild)
                .where(
                    WorkspaceBuild.id == build_id,
                    WorkspaceBuild.worker_id == worker_id,
                    WorkspaceBuild.status.in_(("running", "canceling")),
                )
                .values(lease_expires_at=utcnow() + timedelta(seconds=self.lease_seconds))
                .returning(WorkspaceBuild.cancel_requested)
            )
            row = result.first()
        if row is None:
            raise _lease_lost(build_id)
        return bool(row[0])

    async def append_logs(
        self,
        build_id: str,
        worker_id: str,
        lines: list[types.JobLogLine],
        *,
        stage_started: str | None = None,
    ) -> None:
        now = utcnow()
        async with self.db.transaction() as session:
            build = await self._held(session, build_id, worker_id)
            if stage_started:
                stages = _stage_end(build.stages, now)
                stages.append({"name": stage_started, "started_at": now.isoformat()})
                build.stages = stages
            if lines:
                count = (
                    await session.execute(select(func.count()).where(BuildLog.build_id == build_id))
                ).scalar_one()
                room = MAX_LOG_LINES - count
                if room <= 0:
                    lines = []
                elif len(lines) >= room:
                    lines = [
                        *lines[: room - 1],
                        types.JobLogLine(
                            level="warn",
                            line=f"(log truncated: a build keeps at most {MAX_LOG_LINES} lines)",
                        ),
                    ]
                current = stage_started or (build.stages[-1]["name"] if build.stages else "")
                session.add_all(
                    BuildLog(
                        build_id=build_id,
                        time=now,
                        stage=line.stage or current,
                        level=line.level,
                        line=line.line.replace("\x00", "")[:MAX_LOG_LINE],
                    )
                    for line in lines
                )
        self.notifier.notify(build_key(build_id))

    async def archive(self, build_id: str, worker_id: str) -> bytes:
        """The template archive of a build its worker holds."""
        async with self.db.session() as session:
            await self._held(session, build_id, worker_id)
            data = (
                await session.execute(
                    select(TemplateVersion.archive)
                    .join(WorkspaceBuild, WorkspaceBuild.template_version_id == TemplateVersion.id)
                    .where(WorkspaceBuild.id == build_id)
                )
            ).scalar_one()
        return bytes(data)

    async def complete(
        self,
        build_id: str,
        worker_id: str,
        status: str,
        *,
        state: dict[str, Any] | None,
        reason: str | None = None,
        error: str | None = None,
    ) -> None:
        """Finish a build; a succeeded one stores the backend's new state
        (a delete marks the workspace deleted, a restart's stop queues its
        start). Audited as the build's initiator."""
        now = utcnow()
        queued_next = False
        async with self.db.transaction() as session:
            # Lock the workspace before its build, in the order the API's build
            # requests take them: the other order deadlocks on PostgreSQL.
            workspace_query = select(Workspace).where(
                Workspace.id
                == select(WorkspaceBuild.workspace_id)
                .where(WorkspaceBuild.id == build_id)
                .scalar_subquery()
            )
            if self.db.dialect == "postgresql":
                workspace_query = workspace_query.with_for_update(key_share=True)
            ws = (await session.execute(workspace_query)).scalar_one_or_none()
            if ws is None:
                raise _lease_lost(build_id)
            build = await self._held(session, build_id, worker_id)
            build.status = status
            build.finished_at = now
            build.lease_expires_at = None
            build.stages = _stage_end(build.stages, now)
            if status == "canceled":
                # Whoever asked for the cancel said why (canceled, superseded, timeout).
                build.reason = build.reason or reason or status
                build.error = error
            elif status == "failed":
                build.reason = reason or status
                build.error = error
            if state is not None:
                ws.state = self._seal(state, ws.id)
            newer = list(
                (
                    await session.execute(
                        select(WorkspaceBuild).where(
                            WorkspaceBuild.workspace_id == ws.id,
                            WorkspaceBuild.number > build.number,
                            WorkspaceBuild.status == "pending",
                        )
                    )
                ).scalars()
            )
            revoked: list[str] = []
            if status == "succeeded":
                build.reason = None
                if build.transition in ("stop", "delete"):
                    revoked = await self.agents.revoke(session, ws.id)
                if build.transition == "delete":
                    ws.deleted = True
                    # What was queued behind a delete has nothing left to act on.
                    for later in newer:
                        later.status = "canceled"
                        later.reason = "workspace_deleted"
                        later.error = "the workspace was deleted before this build ran"
                        later.finished_at = now
                ws.compute_status = "running" if build.transition == "start" else "missing"
                ws.compute_detail = None
                ws.compute_checked_at = now
                if build.then_start and not build.cancel_requested and not newer:
                    session.add(
                        WorkspaceBuild(
                            workspace_id=ws.id,
                            number=build.number + 1,
                            transition="start",
                            initiator_id=build.initiator_id,
                            template_version_id=ws.template_version_id,
                            parameters=ws.parameters,
                            backend=ws.backend,
                            status="pending",
                            stages=[],
                        )
                    )
                    queued_next = True
            ws.updated_at = now
            initiator = (
                await session.execute(select(User.username).where(User.id == build.initiator_id))
            ).scalar_one_or_none()
            seconds = (now - build.started_at).total_seconds() if build.started_at else None
            await append(
                session,
                key=self.audit_key,
                action=f"workspace.build.{status}",
                status_code=200 if status == "succeeded" else 500 if status == "failed" else 499,
                user_id=build.initiator_id,
                username=initiator,
                ip=None,
                user_agent=None,
                resource_type="workspace",
                resource_id=ws.id,
                resource_name=ws.name,
                diff={},
                details={
                    "build_number": build.number,
                    "transition": build.transition,
                    "reason": build.reason if status != "succeeded" else None,
                    "worker": build.worker_name,
                    "attempts": build.attempts,
                    "seconds": round(seconds, 3) if seconds is not None else None,
                },
                request_id=None,
            )
        await self.agents.disconnect(revoked)
        log.info(
            "build_finished",
            build_id=build_id,
            status=status,
            reason=reason,
            transition=build.transition,
        )
        self.notifier.notify(build_key(build_id))
        if queued_next:
            self.notifier.notify(JOBS)

    async def reap(self) -> int:
        """Requeue or fail builds whose worker stopped heartbeating; cancel
        builds past their timeout. Returns how many builds it changed."""
        now = utcnow()
        changed: list[str] = []
        async with self.db.transaction() as session:
            query = select(WorkspaceBuild).where(
                WorkspaceBuild.status.in_(("running", "canceling")),
                WorkspaceBuild.lease_expires_at < now,
            )
            if self.db.dialect == "postgresql":
                query = query.with_for_update(skip_locked=True)
            for build in (await session.execute(query)).scalars():
                changed.append(build.id)
                lost = f"the worker {build.worker_name} stopped answering"
                if build.status == "running" and build.attempts < MAX_ATTEMPTS:
                    build.status = "pending"
                    build.worker_id = None
                    build.lease_expires_at = None
                    line = f"{lost}; the build goes back to the queue"
                    level = "warn"
                else:
                    build.status = "canceled" if build.status == "canceling" else "failed"
                    build.reason = "worker_lost"
                    build.error = (
                        f"{lost} (attempt {build.attempts} of {MAX_ATTEMPTS}); start, stop or "
                        "delete the workspace again"
                    )
                    build.finished_at = now
                    build.lease_expires_at = None
                    build.stages = _stage_end(build.stages, now)
                    line = build.error
                    level = "error"
                session.add(BuildLog(build_id=build.id, level=level, line=line))
            timed_out = select(WorkspaceBuild).where(
                WorkspaceBuild.status == "running",
                WorkspaceBuild.started_at < now - timedelta(seconds=self.timeout_seconds),
            )
            for build in (await session.execute(timed_out)).scalars():
                changed.append(build.id)
                build.status = "canceling"
                build.cancel_requested = True
                build.reason = "timeout"
                session.add(
                    BuildLog(
                        build_id=build.id,
                        level="error",
                        line=f"the build ran longer than {self.timeout_seconds} s; canceling it",
                    )
                )
            unclaimed = select(WorkspaceBuild).where(
                WorkspaceBuild.status == "pending",
                WorkspaceBuild.created_at < now - timedelta(seconds=self.timeout_seconds),
            )
            for build in (await session.execute(unclaimed)).scalars():
                changed.append(build.id)
                build.status = "failed"
                build.reason = "no_provisioner"
                build.error = (
                    f"no provisioner took this build in {self.timeout_seconds} s: is a worker "
                    f"serving the {build.backend} backend running (the server's "
                    "--provisioner-backends, or a stockade provisionerd)?"
                )
                build.finished_at = now
                session.add(BuildLog(build_id=build.id, level="error", line=build.error))
        for build_id in changed:
            log.warning("build_reaped", build_id=build_id)
            self.notifier.notify(build_key(build_id))
        if changed:
            self.notifier.notify(JOBS)
        return len(changed)

    async def live_workspaces(self, backend: str) -> set[str]:
        """Ids of the workspaces of ``backend`` whose resources must be kept:
        every one not deleted, and any with a build in progress."""
        async with self.db.session() as session:
            rows = await session.execute(
                select(Workspace.id).where(
                    Workspace.backend == backend,
                    (Workspace.deleted.is_(False))
                    | exists().where(
                        and_(
                            WorkspaceBuild.workspace_id == Workspace.id,
                            WorkspaceBuild.status.in_(("pending", "running", "canceling")),
                        )
                    ),
                )
            )
            return {r[0] for r in rows}

    async def running_workspaces(
        self, backend: str, *, built_by: str
    ) -> list[tuple[str, dict[str, Any]]]:
        """(id, state) of the workspaces whose latest build started them, on a
        built-in worker whose name starts with ``built_by`` (the compute of a workspace
        built by a provisionerd elsewhere is not this host's to check)."""
        latest = (
            select(WorkspaceBuild.workspace_id, func.max(WorkspaceBuild.number).label("n"))
            .group_by(WorkspaceBuild.workspace_id)
            .subquery()
        )
        async with self.db.session() as session:
            rows = await session.execute(
                select(Workspace.id, Workspace.state)
                .join(latest, latest.c.workspace_id == Workspace.id)
                .join(
                    WorkspaceBuild,
                    and_(
                        WorkspaceBuild.workspace_id == Workspace.id,
                        WorkspaceBuild.number == latest.c.n,
                    ),
                )
                .where(
                    Workspace.backend == backend,
                    Workspace.deleted.is_(False),
                    WorkspaceBuild.transition == "start",
                    WorkspaceBuild.status == "succeeded",
                    WorkspaceBuild.worker_name.startswith(built_by, autoescape=True),
                    WorkspaceBuild.worker_name.contains(BUILT_IN_MARK, autoescape=True),
                )
            )
            return [(r.id, r.state) for r in rows]

    async def record_compute(self, workspace_id: str, status: str, detail: str) -> None:
        async with self.db.transaction() as session:
            await session.execute(
                update(Workspace)
                .where(Workspace.id == workspace_id)
                .values(
                    compute_status=status, compute_detail=detail[:256], compute_checked_at=utcnow()
                )
            )

    # --- provisioner keys ---------------------------------------------------------------

    async def authenticate_key(self, token: str) -> str:
        """The key's name, or 401."""
        parts = keys.split(token)
        if parts is not None:
            key_id, secret = parts
            async with self.db.session() as session:
                row = (
                    await session.execute(select(ProvisionerKey).where(ProvisionerKey.id == key_id))
                ).scalar_one_or_none()
                if row is not None and keys.matches(secret, row.hashed_secret):
                    name = row.name
                    if row.last_used_at is None or utcnow() - row.last_used_at > timedelta(
                        minutes=1
                    ):
                        async with self.db.transaction() as write:
                            await write.execute(
                                update(ProvisionerKey)
                                .where(ProvisionerKey.id == key_id)
                                .values(last_used_at=utcnow())
                            )
                    return name
        raise Unauthenticated(
            "a valid provisioner key is required (Stockade-Provisioner-Key header); an owner "
            "creates one with `stockade provisioner-keys create NAME`",
            reason="invalid_provisioner_key",
        )

    async def list_keys(self, actor: Actor) -> types.ProvisionerKeyList:
        authorize(actor, Perm.PROVISIONER_ADMIN, owner_id=None, kind="provisioner_key")
        async with self.db.session() as session:
            rows = (
                await session.execute(select(ProvisionerKey).order_by(ProvisionerKey.name))
            ).scalars()
            return types.ProvisionerKeyList(
                keys=[types.ProvisionerKey.model_validate(r, from_attributes=True) for r in rows]
            )

    async def create_key(
        self, actor: Actor, name: str, record: AuditRecord
    ) -> types.CreatedProvisionerKey:
        record.describe("provisioner_key.create", "provisioner_key", resource_name=name)
        authorize(actor, Perm.PROVISIONER_ADMIN, owner_id=None, kind="provisioner_key")
        key_id, token, hashed = keys.generate()
        try:
            async with self.db.transaction() as session:
                if (
                    await session.execute(
                        select(ProvisionerKey.id).where(ProvisionerKey.name == name)
                    )
                ).first() is not None:
                    raise Conflict(
                        f"a provisioner key named {name!r} exists; choose another name or "
                        "delete it first",
                        reason="provisioner_key_exists",
                    )
                row = ProvisionerKey(
                    id=key_id, name=name, hashed_secret=hashed, created_by=actor.user_id
                )
                session.add(row)
                await session.flush()
                created = types.ProvisionerKey.model_validate(row, from_attributes=True)
        except IntegrityError as exc:
            raise Conflict(
                f"a provisioner key named {name!r} was created at the same time",
                reason="provisioner_key_exists",
            ) from exc
        record.resource_id = key_id
        return types.CreatedProvisionerKey(**created.model_dump(), key=token)

    async def delete_key(self, actor: Actor, name: str, record: AuditRecord) -> None:
        record.describe("provisioner_key.delete", "provisioner_key", resource_name=name)
        authorize(actor, Perm.PROVISIONER_ADMIN, owner_id=None, kind="provisioner_key")
        async with self.db.transaction() as session:
            row = (
                await session.execute(select(ProvisionerKey).where(ProvisionerKey.name == name))
            ).scalar_one_or_none()
            if row is None:
                raise NotFound(
                    f"provisioner key {name!r} not found", reason="provisioner_key_not_found"
                )
            record.resource_id = row.id
            await session.delete(row)
