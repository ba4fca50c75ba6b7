"""Workspaces and their builds. A workspace's status is its latest build's
(transition, status), as Coder users know it; the state machine lives in the
database so any server process can answer for any workspace.

Every method takes the acting user and checks the policy itself: members act
on their own workspaces only (others' are 404), owners and user-admins on all.
"""

from __future__ import annotations

import builtins
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError
from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from stockade.sdk import types
from stockade.sdk.templates import (
    ComputeError,
    Manifest,
    Parameter,
    check_value,
    resolve_compute,
)
from stockade.server.agents.service import AgentService
from stockade.server.audit.service import AuditRecord
from stockade.server.authz import Actor, Perm, actor_for, authorize, can
from stockade.server.db import Database
from stockade.server.db.models import (
    BuildLog,
    Organization,
    Template,
    TemplateVersion,
    User,
    Workspace,
    WorkspaceBuild,
    utcnow,
)
from stockade.server.errors import Conflict, Forbidden, InvalidInput, NotFound
from stockade.server.events import JOBS, Notifier, build_key
from stockade.server.orgs.access import TemplateAccess, standing, template_access
from stockade.server.templates.service import find_template

UNFINISHED = ("pending", "running", "canceling")
FINISHED = ("succeeded", "failed", "canceled")
_RUNNING_STATUS = {"start": "starting", "stop": "stopping", "delete": "deleting"}
_DONE_STATUS = {"start": "running", "stop": "stopped", "delete": "deleted"}
LOG_PAGE = 1000


def workspace_status(transition: str, build_status: str) -> str:
    """The workspace status shown for its latest build."""
    if build_status == "running":
        return _RUNNING_STATUS[transition]
    if build_status == "succeeded":
        return _DONE_STATUS[transition]
    return build_status  # pending, canceling, canceled, failed


def _not_found() -> NotFound:
    return NotFound("workspace not found", reason="workspace_not_found")


# --- parameters -------------------------------------------------------------------


@dataclass(frozen=True)
class _ParamProblem:
    name: str
    message: str
    missing: bool = False


def _shown(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def resolve_parameters(
    manifest: Manifest,
    given: dict[str, Any],
    previous: dict[str, Any] | None,
) -> dict[str, Any]:
    """The full set of values for a build: ``given`` over ``previous`` (the
    workspace's current values; ``None`` at creation) over defaults. Raises a
    400 naming every parameter that is unknown, invalid, missing or immutable."""
    problems: list[_ParamProblem] = []
    known: dict[str, Parameter] = {p.name: p for p in manifest.parameters}
    for name in given:
        if name not in known:
            names = ", ".join(sorted(known)) or "none"
            problems.append(
                _ParamProblem(name, f"unknown parameter (this template's parameters: {names})")
            )
    values: dict[str, Any] = {}
    for param in manifest.parameters:
        name = param.name
        if name in given:
            value = given[name]
            if (
                previous is not None
                and name in previous
                and not param.mutable
                and value != previous[name]
            ):
                problems.append(
                    _ParamProblem(
                        name,
                        f"is immutable: it keeps the value {_shown(previous[name])} it was given "
                        "when the workspace was created",
                    )
                )
                continue
        elif previous is not None and name in previous:
            value = previous[name]
        elif param.default is not None and not param.required:
            value = param.default
        elif param.required:
            hint = f" (one of: {', '.join(map(_shown, param.options))})" if param.options else ""
            problems.append(
                _ParamProblem(
                    name,
                    f"is required: give it a value with --parameter {name}=VALUE{hint}",
                    missing=True,
                )
            )
            continue
        else:
            continue
        problem = check_value(param, value)
        if problem is not None:
            problems.append(_ParamProblem(name, problem))
            continue
        values[name] = value
    if not problems:
        try:
            resolve_compute(manifest.compute, values)
        except ComputeError as exc:
            problems.append(_ParamProblem(exc.parameter or f"compute.{exc.field}", str(exc)))
    if problems:
        first = problems[0]
        text = f"parameter {first.name!r} {first.message}"
        if len(problems) > 1:
            text += f" (and {len(problems) - 1} more problem(s), listed in detail)"
        raise InvalidInput(
            text,
            reason="invalid_parameters",
            detail=[
                {"parameter": p.name, "message": p.message, "missing": p.missing} for p in problems
            ],
        )
    return values


# --- views ----------------------------------------------------------------------


def _stage_views(stages: Iterable[dict[str, Any]]) -> list[types.BuildStage]:
    views = []
    for stage in stages:
        started = datetime.fromisoformat(stage["started_at"])
        finished = (
            datetime.fromisoformat(stage["finished_at"]) if stage.get("finished_at") else None
        )
        views.append(
            types.BuildStage(
                name=stage["name"],
                started_at=started,
                finished_at=finished,
                seconds=round((finished - started).total_seconds(), 3) if finished else None,
            )
        )
    return views


class _Names:
    """User names and template version numbers for a batch of views."""

    def __init__(
        self, users: dict[str, str], versions: dict[str, int], orgs: dict[str, str]
    ) -> None:
        self.users = users
        self.versions = versions
        self.orgs = orgs

    @classmethod
    async def load(
        cls,
        session: AsyncSession,
        user_ids: set[str],
        version_ids: set[str],
        org_ids: Iterable[str] = (),
    ) -> _Names:
        users: dict[str, str] = {}
        versions: dict[str, int] = {}
        orgs: dict[str, str] = {}
        if org_ids:
            rows = await session.execute(
                select(Organization.id, Organization.name).where(Organization.id.in_(list(org_ids)))
            )
            orgs = {r.id: r.name for r in rows}
        if user_ids:
            rows = await session.execute(
                select(User.id, User.username).where(User.id.in_(user_ids))
            )
            users = {r.id: r.username for r in rows}
        if version_ids:
            rows = await session.execute(
                select(TemplateVersion.id, TemplateVersion.number).where(
                    TemplateVersion.id.in_(version_ids)
                )
            )
            versions = {r.id: r.number for r in rows}
        return cls(users, versions, orgs)


def build_view(build: WorkspaceBuild, ws: Workspace, names: _Names) -> types.WorkspaceBuild:
    return types.WorkspaceBuild(
        id=build.id,
        workspace_id=ws.id,
        workspace_name=ws.name,
        owner_name=names.users.get(ws.owner_id, ""),
        number=build.number,
        transition=build.transition,
        restart=build.then_start,
        status=build.status,
        reason=build.reason,
        error=build.error,
        initiator_id=build.initiator_id,
        initiator_name=names.users.get(build.initiator_id, ""),
        template_version_id=build.template_version_id,
        template_version=names.versions.get(build.template_version_id, 0),
        parameters=build.parameters,
        stages=_stage_views(build.stages),
        attempts=build.attempts,
        worker_name=build.worker_name,
        created_at=build.created_at,
        started_at=build.started_at,
        finished_at=build.finished_at,
    )


def _workspace_view(
    ws: Workspace, template: Template, build: WorkspaceBuild, names: _Names
) -> types.Workspace:
    return types.Workspace(
        id=ws.id,
        name=ws.name,
        owner_id=ws.owner_id,
        owner_name=names.users.get(ws.owner_id, ""),
        organization=names.orgs.get(ws.organization_id, ""),
        template_id=template.id,
        template_name=template.name,
        template_version_id=ws.template_version_id,
        template_version=names.versions.get(ws.template_version_id, 0),
        outdated=template.active_version_id is not None
        and template.active_version_id != ws.template_version_id,
        backend=ws.backend,
        status=workspace_status(build.transition, build.status),
        parameters=ws.parameters,
        compute_status=ws.compute_status,
        compute_detail=ws.compute_detail,
        created_at=ws.created_at,
        updated_at=ws.updated_at,
        latest_build=build_view(build, ws, names),
        **_terraform_view(ws.state),
    )


def _terraform_view(state: dict[str, Any] | None) -> dict[str, Any]:
    """The resources and metadata a terraform build left in the state (what
    the provisioner wrote; anything malformed is left out, not an error)."""
    info = (state or {}).get("terraform")
    if not isinstance(info, dict):
        return {}
    resources = []
    for item in info.get("resources") or []:
        with contextlib.suppress(ValidationError, TypeError):
            resources.append(types.WorkspaceResource.model_validate(item))
    metadata = (info.get("outputs") or {}).get("stockade_metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    return {
        "resources": resources,
        "resource_metadata": {str(k): str(v) for k, v in metadata.items() if v is not None},
    }


async def _views(
    session: AsyncSession, rows: list[tuple[Workspace, Template]], agents: AgentService
) -> list[types.Workspace]:
    if not rows:
        return []
    ids = [ws.id for ws, _ in rows]
    latest = (
        select(WorkspaceBuild.workspace_id, func.max(WorkspaceBuild.number).label("number"))
        .where(WorkspaceBuild.workspace_id.in_(ids))
        .group_by(WorkspaceBuild.workspace_id)
        .subquery()
    )
    builds = {
        b.workspace_id: b
        for b in (
            await session.execute(
                select(WorkspaceBuild).join(
                    latest,
                    and_(
                        WorkspaceBuild.workspace_id == latest.c.workspace_id,
                        WorkspaceBuild.number == latest.c.number,
                    ),
                )
            )
        ).scalars()
    }
    names = await _Names.load(
        session,
        {ws.owner_id for ws, _ in rows} | {b.initiator_id for b in builds.values()},
        {ws.template_version_id for ws, _ in rows}
        | {b.template_version_id for b in builds.values()},
        {ws.organization_id for ws, _ in rows},
    )
    live_agents = await agents.views(session, ids)
    return [
        _workspace_view(ws, t, builds[ws.id], names).model_copy(
            update={"agent": live_agents.get(ws.id)}
        )
        for ws, t in rows
        if ws.id in builds
    ]


# --- the service -----------------------------------------------------------------


class WorkspaceService:
    def __init__(self, db: Database, notifier: Notifier, agents: AgentService) -> None:
        self.db = db
        self.notifier = notifier
        self.agents = agents

    # --- reads ----------------------------------------------------------------------

    async def _owner(
        self, session: AsyncSession, actor: Actor, username: str
    ) -> tuple[User, set[str] | None]:
        """The owner named in a path, and the organizations whose workspaces
        of theirs the caller may see (None: all of them). A user the caller
        may not see is a 404 for the workspace, like one that does not exist."""
        owner = (
            await session.execute(select(User).where(User.username == username))
        ).scalar_one_or_none()
        if owner is None:
            raise _not_found()
        if can(actor, Perm.WORKSPACE_READ, owner_id=owner.id):
            return owner, None
        admin_orgs = (await standing(session, actor)).admin_org_ids()
        if not admin_orgs:
            raise _not_found()
        return owner, admin_orgs

    async def _find(
        self, session: AsyncSession, actor: Actor, owner_name: str, name: str
    ) -> tuple[Workspace, Template]:
        owner, orgs = await self._owner(session, actor, owner_name)
        query = select(Workspace, Template).join(Template, Template.id == Workspace.template_id)
        query = query.where(
            Workspace.owner_id == owner.id, Workspace.name == name, Workspace.deleted.is_(False)
        )
        if orgs is not None:
            query = query.where(Workspace.organization_id.in_(orgs))
        if self.db.dialect == "postgresql":
            # Serialise builds of one workspace across server processes
            # (SQLite's BEGIN IMMEDIATE already serialises every writer).
            # NO KEY UPDATE: rows that merely reference the workspace (agents,
            # logs) can still be inserted by the build queue meanwhile.
            query = query.with_for_update(of=Workspace, key_share=True)
        row = (await session.execute(query)).first()
        if row is None:
            raise _not_found()
        return row[0], row[1]

    async def list(self, actor: Actor, *, owner: str | None = None) -> types.WorkspaceList:
        query = (
            select(Workspace, Template)
            .join(Template, Template.id == Workspace.template_id)
            .where(Workspace.deleted.is_(False))
            .order_by(Workspace.created_at, Workspace.id)
        )
        async with self.db.session() as session:
            if owner is not None:
                user, orgs = await self._owner(session, actor, owner)
                query = query.where(Workspace.owner_id == user.id)
                if orgs is not None:
                    query = query.where(Workspace.organization_id.in_(orgs))
            elif not can(actor, Perm.WORKSPACE_READ):
                # Their own, and every one in the organizations they administer.
                admin_orgs = (await standing(session, actor)).admin_org_ids()
                query = query.where(
                    or_(
                        Workspace.owner_id == actor.user_id,
                        Workspace.organization_id.in_(admin_orgs),
                    )
                )
            rows = [(ws, t) for ws, t in (await session.execute(query)).all()]
            views = await _views(session, rows, self.agents)
        return types.WorkspaceList(workspaces=views, count=len(views))

    async def get(self, actor: Actor, owner: str, name: str) -> types.Workspace:
        async with self.db.session() as session:
            ws, template = await self._find(session, actor, owner, name)
            return (await _views(session, [(ws, template)], self.agents))[0]

    async def builds(self, actor: Actor, owner: str, name: str) -> types.WorkspaceBuildList:
        async with self.db.session() as session:
            ws, _ = await self._find(session, actor, owner, name)
            builds = list(
                (
                    await session.execute(
                        select(WorkspaceBuild)
                        .where(WorkspaceBuild.workspace_id == ws.id)
                        .order_by(WorkspaceBuild.number)
                    )
                ).scalars()
            )
            names = await _Names.load(
                session,
                {ws.owner_id} | {b.initiator_id for b in builds},
                {b.template_version_id for b in builds},
            )
            return types.WorkspaceBuildList(builds=[build_view(b, ws, names) for b in builds])

    async def _build(
        self, session: AsyncSession, actor: Actor, owner: str, name: str, number: int
    ) -> tuple[Workspace, WorkspaceBuild]:
        ws, _ = await self._find(session, actor, owner, name)
        build = (
            await session.execute(
                select(WorkspaceBuild).where(
                    WorkspaceBuild.workspace_id == ws.id, WorkspaceBuild.number == number
                )
            )
        ).scalar_one_or_none()
        if build is None:
            raise NotFound(f"workspace {name!r} has no build {number}", reason="build_not_found")
        return ws, build

    async def build(self, actor: Actor, owner: str, name: str, number: int) -> types.WorkspaceBuild:
        async with self.db.session() as session:
            ws, build = await self._build(session, actor, owner, name, number)
            names = await _Names.load(
                session, {ws.owner_id, build.initiator_id}, {build.template_version_id}
            )
            return build_view(build, ws, names)

    async def _latest_number(self, actor: Actor, owner: str, name: str) -> int:
        async with self.db.session() as session:
            ws, _ = await self._find(session, actor, owner, name)
            return int(
                (
                    await session.execute(
                        select(func.max(WorkspaceBuild.number)).where(
                            WorkspaceBuild.workspace_id == ws.id
                        )
                    )
                ).scalar_one()
            )

    async def logs(
        self, actor: Actor, owner: str, name: str, number: int | None, *, after: int
    ) -> types.BuildLogList:
        """Stored lines of a build (the latest when ``number`` is None) after
        the line id ``after``, at most ``LOG_PAGE`` of them."""
        if number is None:
            number = await self._latest_number(actor, owner, name)
        async with self.db.session() as session:
            _, build = await self._build(session, actor, owner, name, number)
            lines = await self._lines(session, build.id, after)
            return types.BuildLogList(logs=lines, build_status=build.status)

    async def agent_logs(
        self, actor: Actor, owner: str, name: str, *, after: int
    ) -> types.AgentLogList:
        """The startup script output its agent reported (the live agent's)."""
        async with self.db.session() as session:
            ws, _ = await self._find(session, actor, owner, name)
            workspace_id = ws.id
        return await self.agents.logs(workspace_id, after=after)

    @staticmethod
    async def _lines(
        session: AsyncSession, build_id: str, after: int
    ) -> builtins.list[types.BuildLogLine]:
        rows = await session.execute(
            select(BuildLog)
            .where(BuildLog.build_id == build_id, BuildLog.id > after)
            .order_by(BuildLog.id)
            .limit(LOG_PAGE)
        )
        return [
            types.BuildLogLine(
                id=r.id,
                time=r.time,
                stage=r.stage,
                level=r.level,
                line=r.line,
            )
            for r in rows.scalars()
        ]

    async def follow_logs(
        self, actor: Actor, owner: str, name: str, number: int | None, *, after: int
    ) -> AsyncIterator[dict[str, Any]]:
        """Log lines as they come, then one ``end`` event with the build's
        final status. Authorization is checked before the first event."""
        if number is None:
            number = await self._latest_number(actor, owner, name)
        async with self.db.session() as session:
            _, build = await self._build(session, actor, owner, name, number)
            build_id = build.id

        async def events() -> AsyncIterator[dict[str, Any]]:
            last = after
            while True:
                async with self.db.session() as session:
                    lines = await self._lines(session, build_id, last)
                    status = (
                        await session.execute(
                            select(WorkspaceBuild.status).where(WorkspaceBuild.id == build_id)
                        )
                    ).scalar_one()
                for line in lines:
                    last = line.id
                    yield {"type": "log", **line.model_dump(mode="json")}
                if len(lines) == LOG_PAGE:
                    continue
                if status in FINISHED:
                    yield {"type": "end", "build_number": number, "status": status}
                    return
                await self.notifier.wait(build_key(build_id), timeout=1.0)

        return events()

    # --- writes -----------------------------------------------------------------------

    @staticmethod
    async def _authorize_build(session: AsyncSession, actor: Actor, ws: Workspace) -> None:
        """The owner, site owners and user-admins, and the admins of the
        workspace's organization may build it."""
        if can(actor, Perm.WORKSPACE_BUILD, owner_id=ws.owner_id):
            return
        if ws.organization_id in (await standing(session, actor)).admin_org_ids():
            return
        authorize(actor, Perm.WORKSPACE_BUILD, owner_id=ws.owner_id, kind="workspace")

    @staticmethod
    async def _active_version(session: AsyncSession, template: Template) -> TemplateVersion:
        if template.archived_at is not None:
            raise Conflict(
                f"template {template.name!r} is archived; new builds from it are not allowed",
                reason="template_archived",
            )
        if template.active_version_id is None:
            raise Conflict(
                f"template {template.name!r} has no active version yet; a template admin must "
                "push or activate one",
                reason="template_not_active",
            )
        return (
            await session.execute(
                select(TemplateVersion).where(TemplateVersion.id == template.active_version_id)
            )
        ).scalar_one()

    @staticmethod
    async def _check_owner_may_use(session: AsyncSession, owner: User, template: Template) -> None:
        """Starting a workspace needs its owner to be allowed the template
        still: a user dropped from the group that granted it loses it."""
        who = await standing(session, actor_for(owner.id, owner.username, owner.roles))
        access = await template_access(session, who, [(template.id, template.organization_id)])
        if access[template.id] < TemplateAccess.USE:
            raise Forbidden(
                f"{owner.username} may no longer use template {template.name!r}; "
                "ask its admins for access (stop and delete still work)",
                reason="template_access_revoked",
            )

    async def create(
        self, actor: Actor, body: types.CreateWorkspaceRequest, record: AuditRecord
    ) -> types.Workspace:
        record.describe("workspace.create", "workspace", resource_name=body.name)
        try:
            async with self.db.transaction() as session:
                owner = await session.get_one(User, actor.user_id)
                if body.owner is not None and body.owner != actor.username:
                    other = (
                        await session.execute(select(User).where(User.username == body.owner))
                    ).scalar_one_or_none()
                    if other is None or not can(actor, Perm.USER_READ, owner_id=other.id):
                        raise NotFound(f"user {body.owner!r} not found", reason="user_not_found")
                    owner = other
                owner_id = owner.id
                authorize(actor, Perm.WORKSPACE_CREATE, owner_id=owner_id, kind="workspace")
                # The template as its owner-to-be sees it: what they may use.
                template, _ = await find_template(
                    session,
                    actor_for(owner.id, owner.username, owner.roles),
                    body.template,
                    body.organization,
                    TemplateAccess.USE,
                )
                version = await self._active_version(session, template)
                manifest = Manifest.model_validate(version.manifest)
                values = resolve_parameters(manifest, dict(body.parameters), None)
                taken = (
                    await session.execute(
                        select(Workspace.id).where(
                            Workspace.owner_id == owner_id,
                            Workspace.name == body.name,
                            Workspace.deleted.is_(False),
                        )
                    )
                ).first()
                if taken is not None:
                    raise Conflict(
                        f"a workspace named {body.name!r} already exists for this owner; "
                        "choose another name",
                        reason="workspace_exists",
                    )
                ws = Workspace(
                    owner_id=owner_id,
                    name=body.name,
                    organization_id=template.organization_id,
                    template_id=template.id,
                    template_version_id=version.id,
                    backend=manifest.backend,
                    parameters=values,
                    state={},
                )
                session.add(ws)
                await session.flush()
                build = WorkspaceBuild(
                    workspace_id=ws.id,
                    number=1,
                    transition="start",
                    initiator_id=actor.user_id,
                    template_version_id=version.id,
                    parameters=values,
                    backend=manifest.backend,
                    status="pending",
                    stages=[],
                )
                session.add(build)
                await session.flush()
                record.resource_id = ws.id
                record.details.update(
                    owner_id=owner_id,
                    template=template.name,
                    template_version=version.number,
                    build_number=1,
                    parameters=values,
                )
                names = await _Names.load(
                    session, {owner_id, actor.user_id}, {version.id}, {ws.organization_id}
                )
                view = _workspace_view(ws, template, build, names)
        except IntegrityError as exc:
            raise Conflict(
                f"a workspace named {body.name!r} was created at the same time; choose another "
                "name",
                reason="workspace_exists",
            ) from exc
        self.notifier.notify(JOBS)
        return view

    async def create_build(
        self,
        actor: Actor,
        owner: str,
        name: str,
        body: types.CreateBuildRequest,
        record: AuditRecord,
    ) -> types.WorkspaceBuild:
        action = "update" if body.update else body.transition
        record.describe(f"workspace.{action}", "workspace", resource_name=f"{owner}/{name}")
        if body.update and body.transition != "start":
            raise InvalidInput("update goes with a start", reason="invalid_build_request")
        if body.parameters and body.transition not in ("start", "restart"):
            raise InvalidInput(
                "parameters go with a start or a restart", reason="invalid_build_request"
            )
        async with self.db.transaction() as session:
            ws, template = await self._find(session, actor, owner, name)
            record.resource_id = ws.id
            await self._authorize_build(session, actor, ws)
            if body.transition in ("start", "restart"):
                await self._check_owner_may_use(
                    session, await session.get_one(User, ws.owner_id), template
                )
            latest = (
                await session.execute(
                    select(WorkspaceBuild)
                    .where(WorkspaceBuild.workspace_id == ws.id)
                    .order_by(WorkspaceBuild.number.desc())
                    .limit(1)
                )
            ).scalar_one()
            if latest.status in UNFINISHED:
                if not body.cancel_running:
                    raise Conflict(
                        f"build {latest.number} ({latest.transition}, {latest.status}) of "
                        f"{name!r} has not finished; wait for it, or cancel it (cancel_running, "
                        "or `stockade cancel`)",
                        reason="build_in_progress",
                        detail=[{"build_number": latest.number, "status": latest.status}],
                    )
                cancel_build_row(latest, reason="superseded")
            version_id = ws.template_version_id
            if body.update:
                version_id = (await self._active_version(session, template)).id
            version_row = (
                await session.execute(
                    select(TemplateVersion.manifest, TemplateVersion.number).where(
                        TemplateVersion.id == version_id
                    )
                )
            ).one()
            manifest = Manifest.model_validate(version_row.manifest)
            values = ws.parameters
            if body.transition in ("start", "restart"):
                values = resolve_parameters(manifest, dict(body.parameters), ws.parameters)
            build = WorkspaceBuild(
                workspace_id=ws.id,
                number=latest.number + 1,
                transition="stop" if body.transition == "restart" else body.transition,
                then_start=body.transition == "restart",
                initiator_id=actor.user_id,
                template_version_id=version_id,
                parameters=values,
                backend=ws.backend,
                status="pending",
                stages=[],
            )
            session.add(build)
            if body.transition in ("start", "restart"):
                ws.parameters = values
                ws.template_version_id = version_id
            ws.updated_at = utcnow()
            await session.flush()
            record.details.update(
                build_number=build.number,
                transition=body.transition,
                template_version=version_row.number,
                canceled_build=latest.number if body.cancel_running else None,
            )
            names = await _Names.load(session, {ws.owner_id, actor.user_id}, {version_id})
            view = build_view(build, ws, names)
        self.notifier.notify(JOBS)
        self.notifier.notify(build_key(latest.id))
        return view

    async def cancel(
        self, actor: Actor, owner: str, name: str, number: int, record: AuditRecord
    ) -> types.WorkspaceBuild:
        record.describe("workspace.cancel", "workspace", resource_name=f"{owner}/{name}")
        async with self.db.transaction() as session:
            ws, build = await self._build(session, actor, owner, name, number)
            record.resource_id = ws.id
            await self._authorize_build(session, actor, ws)
            if build.status not in UNFINISHED:
                raise Conflict(
                    f"build {build.number} of {name!r} has already {build.status}; there is "
                    "nothing to cancel",
                    reason="build_finished",
                )
            cancel_build_row(build, reason="canceled")
            record.details.update(build_number=build.number, status=build.status)
            names = await _Names.load(
                session, {ws.owner_id, build.initiator_id}, {build.template_version_id}
            )
            view = build_view(build, ws, names)
        self.notifier.notify(build_key(build.id))
        return view


def cancel_build_row(build: WorkspaceBuild, *, reason: str) -> None:
    """Cancel a pending build at once; ask the worker of a running one to stop
    (it sees the request at its next heartbeat)."""
    now = utcnow()
    build.cancel_requested = True
    if build.status == "pending":
        build.status = "canceled"
        build.reason = reason
        build.error = "canceled before a provisioner took it"
        build.finished_at = now
    elif build.status == "running":
        build.status = "canceling"
        build.reason = reason
