"""Templates and their versions. Every method takes the acting user and
checks the policy itself, so the API and the web pages share one set of rules."""

from __future__ import annotations

import asyncio
import re
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from stockade.sdk import types
from stockade.sdk.templates import (
    MAX_ARCHIVE_BYTES,
    TEMPLATE_NAME_HELP,
    TEMPLATE_NAME_PATTERN,
    ArchiveError,
    ArchiveInfo,
    Manifest,
    ManifestError,
    inspect_archive,
    parse_manifest,
    read_archive_files,
)
from stockade.sdk.terraform_variables import merge_terraform_parameters
from stockade.server.audit.service import AuditRecord, diff_fields
from stockade.server.authz import Actor, Perm, can
from stockade.server.db import Database
from stockade.server.db.models import (
    Group,
    Organization,
    Template,
    TemplateGroupAcl,
    TemplateUserAcl,
    TemplateVersion,
    User,
    utcnow,
)
from stockade.server.errors import Conflict, Forbidden, InvalidInput, NotFound, PayloadTooLarge
from stockade.server.orgs.access import (
    TemplateAccess,
    default_org_id,
    find_org,
    is_member,
    standing,
    template_access,
)

_NAME = re.compile(TEMPLATE_NAME_PATTERN)
# Columns of a version without its archive: lists never load the blobs.
_VERSION_COLUMNS = [
    TemplateVersion.id,
    TemplateVersion.template_id,
    TemplateVersion.number,
    TemplateVersion.message,
    TemplateVersion.archive_sha256,
    TemplateVersion.size,
    TemplateVersion.manifest,
    TemplateVersion.created_by,
    TemplateVersion.created_at,
]


def _not_found(name: str) -> NotFound:
    return NotFound(f"template {name!r} not found", reason="template_not_found")


def _template_api(template: Template, active_number: int | None, org: str) -> types.Template:
    return types.Template.model_validate(
        {
            **{
                f: getattr(template, f)
                for f in types.Template.model_fields
                if f not in ("active_version", "organization")
            },
            "active_version": active_number,
            "organization": org,
        }
    )


def _version_api(row: Any, template: Template) -> types.TemplateVersion:
    return types.TemplateVersion(
        id=row.id,
        template_id=row.template_id,
        template_name=template.name,
        number=row.number,
        active=row.id == template.active_version_id,
        message=row.message,
        archive_sha256=row.archive_sha256,
        size=row.size,
        manifest=row.manifest,
        created_by=row.created_by,
        created_at=row.created_at,
    )


def _check_name(name: str) -> None:
    if not _NAME.match(name):
        raise InvalidInput(
            f"invalid template name {name!r}: it must be {TEMPLATE_NAME_HELP}",
            reason="invalid_template_name",
        )


def _terraform_files(data: bytes) -> dict[str, bytes]:
    try:
        return read_archive_files(data)
    except ArchiveError as exc:
        raise InvalidInput(str(exc), reason="invalid_archive") from exc


def _check_upload(data: bytes, name: str) -> tuple[ArchiveInfo, Manifest]:
    """Runs in a thread: decompressing is CPU work."""
    try:
        info = inspect_archive(data)
    except ArchiveError as exc:
        raise InvalidInput(str(exc), reason="invalid_archive") from exc
    try:
        manifest = parse_manifest(info.manifest_text, expected_name=name)
        if manifest.backend == "terraform":
            # The stored manifest carries the parameters its variables declare.
            manifest = merge_terraform_parameters(
                manifest, _terraform_files(data), manifest_text=info.manifest_text
            )
    except ManifestError as exc:
        raise InvalidInput(
            f"invalid manifest: {exc}" if len(exc.problems) == 1 else f"invalid manifest:\n{exc}",
            reason="invalid_manifest",
            detail=[
                {
                    "file": p.file,
                    "line": p.line,
                    "field": p.path,
                    "message": p.reason,
                    "text": str(p),
                }
                for p in exc.problems
            ],
        ) from exc
    return info, manifest


async def _set_acl_entry(
    session: AsyncSession,
    model: type[TemplateUserAcl] | type[TemplateGroupAcl],
    key: dict[str, str],
    role: str | None,
) -> None:
    """Give the ACL entry whose primary key is ``key`` (template and user or
    group, in that order) ``role``; remove it when ``role`` is None."""
    existing: TemplateUserAcl | TemplateGroupAcl | None = await session.get(
        model, tuple(key.values())
    )
    if role is None:
        if existing is not None:
            await session.delete(existing)
    elif existing is None:
        session.add(model(**key, role=role))
    else:
        existing.role = role


def _acl_snapshot(acl: types.TemplateAcl) -> dict[str, Any]:
    return {
        **{f"user:{u.username}": u.role for u in acl.users},
        **{f"group:{g.name}": g.role for g in acl.groups},
    }


async def find_template(
    session: AsyncSession,
    actor: Actor,
    name: str,
    org: str | None,
    need: TemplateAccess = TemplateAccess.READ,
) -> tuple[Template, str]:
    """A template (and its organization's name) by name, within ``org`` or,
    without one, within the organizations where the actor can see a
    template of that name. What the actor cannot see is reported exactly
    like what does not exist; seeing it without ``need`` is a 403."""
    template, org_name, access = await _visible_template(session, actor, name, org)
    if access < need:
        raise Forbidden(
            f"you do not have permission to "
            f"{'administer' if need == TemplateAccess.ADMIN else 'use'} template {name!r}",
            reason="forbidden",
            log_message=f"{actor.username} has {access.name} on {template.id}",
        )
    return template, org_name


async def _visible_template(
    session: AsyncSession, actor: Actor, name: str, org: str | None
) -> tuple[Template, str, TemplateAccess]:
    """``find_template``'s lookup: the template, its organization's name and
    the actor's access to it (at least READ)."""
    query = select(Template, Organization.name).join(
        Organization, Organization.id == Template.organization_id
    )
    query = query.where(Template.name == name)
    if org is not None:
        query = query.where(Template.organization_id == (await find_org(session, actor, org)).id)
    rows = (await session.execute(query)).all()
    who = await standing(session, actor)
    access = await template_access(session, who, [(t.id, t.organization_id) for t, _ in rows])
    visible = [
        (t, org_name)
        for t, org_name in rows
        if access[t.id] >= TemplateAccess.READ
        and (access[t.id] == TemplateAccess.ADMIN or t.archived_at is None)
    ]
    if not visible:
        raise _not_found(name)
    if len(visible) > 1:
        orgs = ", ".join(sorted(org_name for _, org_name in visible))
        raise Conflict(
            f"template {name!r} exists in several organizations ({orgs}); "
            "name one (--org, or ?org= in the API)",
            reason="template_ambiguous",
        )
    template, org_name = visible[0]
    return template, org_name, access[template.id]


class TemplateService:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- reads -------------------------------------------------------------------

    async def _active_number(self, session: AsyncSession, template: Template) -> int | None:
        if template.active_version_id is None:
            return None
        return (
            await session.execute(
                select(TemplateVersion.number).where(
                    TemplateVersion.id == template.active_version_id
                )
            )
        ).scalar_one_or_none()

    async def list(
        self, actor: Actor, *, include_archived: bool, org: str | None = None
    ) -> types.TemplateList:
        """The templates the actor can see: all of them for site template
        admins, those of their organizations' ACLs for others. Members see only
        what they can use: templates with an active version, not archived."""
        query = (
            select(Template, TemplateVersion.number, Organization.name)
            .join(Organization, Organization.id == Template.organization_id)
            .outerjoin(TemplateVersion, TemplateVersion.id == Template.active_version_id)
            .order_by(Template.name, Organization.name)
        )
        async with self.db.session() as session:
            if org is not None:
                org_id = (await find_org(session, actor, org)).id
                query = query.where(Template.organization_id == org_id)
            rows = (await session.execute(query)).all()
            access = await template_access(
                session,
                await standing(session, actor),
                [(t.id, t.organization_id) for t, *_ in rows],
            )
        templates = [
            _template_api(t, number, org_name)
            for t, number, org_name in rows
            if access[t.id] >= TemplateAccess.READ
            and (
                t.archived_at is None or (include_archived and access[t.id] == TemplateAccess.ADMIN)
            )
            and (t.active_version_id is not None or access[t.id] == TemplateAccess.ADMIN)
        ]
        return types.TemplateList(templates=templates, count=len(templates))

    async def get(self, actor: Actor, name: str, org: str | None = None) -> types.Template:
        async with self.db.session() as session:
            template, org_name = await find_template(session, actor, name, org)
            return _template_api(template, await self._active_number(session, template), org_name)

    async def access_of(self, actor: Actor, name: str, org: str | None = None) -> TemplateAccess:
        """What the actor may do with one template (found as ``get`` finds it):
        the dashboard shows admin controls only to its admins."""
        async with self.db.session() as session:
            return (await _visible_template(session, actor, name, org))[2]

    async def administers_any(self, actor: Actor) -> bool:
        """Whether the actor administers some template or may create one: site
        template admins, organization admins, and admins by a template's ACL."""
        async with self.db.session() as session:
            who = await standing(session, actor)
            if who.site_template_admin or who.admin_org_ids():
                return True
            by_user = select(TemplateUserAcl.template_id).where(
                TemplateUserAcl.user_id == who.user_id, TemplateUserAcl.role == "admin"
            )
            by_group = select(TemplateGroupAcl.template_id).where(
                TemplateGroupAcl.group_id.in_(who.group_ids), TemplateGroupAcl.role == "admin"
            )
            found = await session.execute(by_user.union_all(by_group).limit(1))
            return found.first() is not None

    async def versions(
        self, actor: Actor, name: str, org: str | None = None
    ) -> types.TemplateVersionList:
        async with self.db.session() as session:
            template, _ = await find_template(session, actor, name, org)
            rows = await session.execute(
                select(*_VERSION_COLUMNS)
                .where(TemplateVersion.template_id == template.id)
                .order_by(TemplateVersion.number)
            )
            return types.TemplateVersionList(versions=[_version_api(r, template) for r in rows])

    async def archive_of(
        self, actor: Actor, name: str, number: int, org: str | None = None
    ) -> tuple[bytes, str]:
        """(the .tar.gz as pushed, its sha256)."""
        async with self.db.session() as session:
            template, _ = await find_template(session, actor, name, org)
            row = (
                await session.execute(
                    select(TemplateVersion.archive, TemplateVersion.archive_sha256).where(
                        TemplateVersion.template_id == template.id,
                        TemplateVersion.number == number,
                    )
                )
            ).first()
        if row is None:
            raise NotFound(
                f"template {name!r} has no version {number}", reason="template_version_not_found"
            )
        return bytes(row.archive), str(row.archive_sha256)

    # --- writes ------------------------------------------------------------------

    async def push(
        self,
        actor: Actor,
        name: str,
        data: bytes,
        *,
        activate: bool,
        message: str,
        record: AuditRecord,
        org: str | None = None,
    ) -> types.TemplateVersion:
        """Add a version to a template the actor administers, or create the
        template (in ``org``, by default the default organization) when the
        actor is a site template admin or that organization's admin."""
        record.describe("template.push", "template", resource_name=name[:128])
        _check_name(name)
        if len(message) > 1024 or "\x00" in message:
            raise InvalidInput(
                "message must be at most 1024 characters, without NUL", reason="invalid_message"
            )
        if len(data) > MAX_ARCHIVE_BYTES:
            raise PayloadTooLarge(
                f"the archive is {len(data)} bytes; the limit is {MAX_ARCHIVE_BYTES} bytes"
            )
        if not data:
            raise InvalidInput(
                "send the template as a .tar.gz body (Content-Type: application/gzip)",
                reason="invalid_archive",
            )
        async with self.db.session() as session:
            existing_id, org_id = await self._push_target(session, actor, name, org)
        info, manifest = await asyncio.to_thread(_check_upload, data, name)
        stored = manifest.model_dump(mode="json")
        try:
            async with self.db.transaction() as session:
                template = (
                    await session.get(Template, existing_id) if existing_id is not None else None
                )
                created = template is None
                if template is None:
                    template = Template(
                        organization_id=org_id,
                        name=name,
                        display_name=manifest.display_name,
                        description=manifest.description,
                        icon=manifest.icon,
                        backend=manifest.backend,
                        created_by=actor.user_id,
                    )
                    session.add(template)
                    await session.flush()
                    # As in Coder: a new template is open to the whole organization
                    # until an admin narrows its ACL.
                    session.add(
                        TemplateGroupAcl(template_id=template.id, group_id=org_id, role="use")
                    )
                elif template.archived_at is not None:
                    raise Conflict(
                        f"template {name!r} is archived; pushing to it is not allowed",
                        reason="template_archived",
                    )
                before = await self._snapshot(session, template)
                number = (
                    await session.execute(
                        select(func.coalesce(func.max(TemplateVersion.number), 0)).where(
                            TemplateVersion.template_id == template.id
                        )
                    )
                ).scalar_one() + 1
                version = TemplateVersion(
                    template_id=template.id,
                    number=number,
                    manifest=stored,
                    archive=data,
                    archive_sha256=info.sha256,
                    size=len(data),
                    message=message,
                    created_by=actor.user_id,
                )
                session.add(version)
                await session.flush()
                if activate:
                    self._activate(template, version, manifest)
                template.updated_at = utcnow()
                after = await self._snapshot(session, template)
                result = _version_api(version, template)
        except IntegrityError as exc:
            raise Conflict(
                f"another push to {name!r} happened at the same time; push again",
                reason="concurrent_push",
            ) from exc
        record.resource_id = template.id
        record.diff = diff_fields(before, after)
        record.details.update(
            version=number,
            sha256=info.sha256,
            size=len(data),
            files=info.files,
            message=message,
            activated=result.active,
            created_template=created,
        )
        return result

    async def _push_target(
        self, session: AsyncSession, actor: Actor, name: str, org: str | None
    ) -> tuple[str | None, str]:
        """(the template's id, or None to create it; its organization's id)."""
        try:
            template, _ = await find_template(session, actor, name, org, TemplateAccess.ADMIN)
        except NotFound:
            pass
        else:
            return template.id, template.organization_id
        if org is not None:
            target = await find_org(session, actor, org)
        else:
            target = await session.get_one(Organization, await default_org_id(session))
        who = await standing(session, actor)
        if not (who.site_template_admin or who.is_org_admin(target.id)):
            raise Forbidden(
                f"you do not have permission to create templates in organization {target.name!r}",
                reason="forbidden",
                log_message=f"{actor.username} may not create template {name!r} in {target.name}",
            )
        return None, target.id

    @staticmethod
    def _activate(template: Template, version: TemplateVersion, manifest: Manifest) -> None:
        template.active_version_id = version.id
        # The listing shows what the active version says about itself.
        template.display_name = manifest.display_name
        template.description = manifest.description
        template.icon = manifest.icon
        template.backend = manifest.backend

    @staticmethod
    async def _snapshot(session: AsyncSession, template: Template) -> dict[str, Any]:
        number = None
        if template.active_version_id is not None:
            number = (
                await session.execute(
                    select(TemplateVersion.number).where(
                        TemplateVersion.id == template.active_version_id
                    )
                )
            ).scalar_one_or_none()
        return {
            "active_version": number,
            "display_name": template.display_name,
            "description": template.description,
            "icon": template.icon,
            "backend": template.backend,
            "archived": template.archived_at is not None,
        }

    async def set_active(
        self, actor: Actor, name: str, number: int, record: AuditRecord, org: str | None = None
    ) -> types.Template:
        record.describe("template.activate", "template", resource_name=name[:128])
        async with self.db.transaction() as session:
            template, org_name = await find_template(
                session, actor, name, org, TemplateAccess.ADMIN
            )
            record.resource_id = template.id
            if template.archived_at is not None:
                raise Conflict(
                    f"template {name!r} is archived; its versions cannot be activated",
                    reason="template_archived",
                )
            version = (
                await session.execute(
                    select(TemplateVersion).where(
                        TemplateVersion.template_id == template.id,
                        TemplateVersion.number == number,
                    )
                )
            ).scalar_one_or_none()
            if version is None:
                raise NotFound(
                    f"template {name!r} has no version {number}",
                    reason="template_version_not_found",
                )
            before = await self._snapshot(session, template)
            self._activate(template, version, Manifest.model_validate(version.manifest))
            template.updated_at = utcnow()
            after = await self._snapshot(session, template)
            record.diff = diff_fields(before, after)
            record.details["version"] = number
            return _template_api(template, number, org_name)

    async def archive(
        self, actor: Actor, name: str, record: AuditRecord, org: str | None = None
    ) -> types.Template:
        record.describe("template.archive", "template", resource_name=name[:128])
        async with self.db.transaction() as session:
            template, org_name = await find_template(
                session, actor, name, org, TemplateAccess.ADMIN
            )
            record.resource_id = template.id
            before = await self._snapshot(session, template)
            if template.archived_at is None:
                template.archived_at = utcnow()
                template.updated_at = template.archived_at
            after = await self._snapshot(session, template)
            record.diff = diff_fields(before, after)
            return _template_api(template, after["active_version"], org_name)

    # --- access control list -------------------------------------------------------

    async def acl(self, actor: Actor, name: str, org: str | None = None) -> types.TemplateAcl:
        """The template's ACL: for its admins and for the site roles that read
        every template (auditors, user-admins)."""
        async with self.db.session() as session:
            template, org_name, access = await _visible_template(session, actor, name, org)
            if access < TemplateAccess.ADMIN and not can(actor, Perm.TEMPLATE_READ):
                raise Forbidden(
                    f"only the admins of template {name!r} can see who may use it",
                    reason="forbidden",
                )
            return await self._acl_view(session, template, org_name)

    @staticmethod
    async def _acl_view(
        session: AsyncSession, template: Template, org_name: str
    ) -> types.TemplateAcl:
        users = await session.execute(
            select(User.id, User.username, TemplateUserAcl.role)
            .join(TemplateUserAcl, TemplateUserAcl.user_id == User.id)
            .where(TemplateUserAcl.template_id == template.id)
            .order_by(User.username)
        )
        groups = await session.execute(
            select(Group.id, Group.name, TemplateGroupAcl.role)
            .join(TemplateGroupAcl, TemplateGroupAcl.group_id == Group.id)
            .where(TemplateGroupAcl.template_id == template.id)
            .order_by(Group.name)
        )
        return types.TemplateAcl(
            template=template.name,
            organization=org_name,
            users=[types.TemplateAclUser(user_id=i, username=n, role=r) for i, n, r in users.all()],
            groups=[types.TemplateAclGroup(group_id=i, name=n, role=r) for i, n, r in groups.all()],
        )

    async def update_acl(
        self,
        actor: Actor,
        name: str,
        body: types.UpdateTemplateAclRequest,
        record: AuditRecord,
        org: str | None = None,
    ) -> types.TemplateAcl:
        """Set or remove ACL entries; users and groups must belong to the
        template's organization. All or nothing."""
        record.describe("template.acl", "template", resource_name=name[:128])
        async with self.db.transaction() as session:
            template, org_name = await find_template(
                session, actor, name, org, TemplateAccess.ADMIN
            )
            record.resource_id = template.id
            before = await self._acl_view(session, template, org_name)
            template_org = await session.get_one(Organization, template.organization_id)
            for username, role in body.users.items():
                user = (
                    await session.execute(select(User).where(User.username == username.lower()))
                ).scalar_one_or_none()
                if user is None or not await is_member(session, template_org, user.id):
                    raise InvalidInput(
                        f"user {username!r} is not a member of organization {org_name!r}; "
                        "add them to it first",
                        reason="not_a_member",
                    )
                await _set_acl_entry(
                    session, TemplateUserAcl, {"template_id": template.id, "user_id": user.id}, role
                )
            for group_name, role in body.groups.items():
                group = (
                    await session.execute(
                        select(Group).where(
                            Group.organization_id == template.organization_id,
                            Group.name == group_name,
                        )
                    )
                ).scalar_one_or_none()
                if group is None:
                    raise InvalidInput(
                        f"organization {org_name!r} has no group {group_name!r}",
                        reason="group_not_found",
                    )
                await _set_acl_entry(
                    session,
                    TemplateGroupAcl,
                    {"template_id": template.id, "group_id": group.id},
                    role,
                )
            await session.flush()
            after = await self._acl_view(session, template, org_name)
        record.diff = diff_fields(_acl_snapshot(before), _acl_snapshot(after))
        return after
