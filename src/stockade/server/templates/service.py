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
)
from stockade.server.audit.service import AuditRecord, diff_fields
from stockade.server.authz import Actor, Perm, authorize, can
from stockade.server.db import Database
from stockade.server.db.models import Template, TemplateVersion, utcnow
from stockade.server.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge

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


def _template_api(template: Template, active_number: int | None) -> types.Template:
    return types.Template.model_validate(
        {
            **{
                f: getattr(template, f)
                for f in types.Template.model_fields
                if f != "active_version"
            },
            "active_version": active_number,
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


def _check_upload(data: bytes, name: str) -> tuple[ArchiveInfo, Manifest]:
    """Runs in a thread: decompressing is CPU work."""
    try:
        info = inspect_archive(data)
    except ArchiveError as exc:
        raise InvalidInput(str(exc), reason="invalid_archive") from exc
    try:
        manifest = parse_manifest(info.manifest_text, expected_name=name)
    except ManifestError as exc:
        raise InvalidInput(
            f"invalid manifest: {exc}" if len(exc.problems) == 1 else f"invalid manifest:\n{exc}",
            reason="invalid_manifest",
            detail=[
                {"line": p.line, "field": p.path, "message": p.reason, "text": str(p)}
                for p in exc.problems
            ],
        ) from exc
    return info, manifest


class TemplateService:
    def __init__(self, db: Database) -> None:
        self.db = db

    # --- reads -------------------------------------------------------------------

    async def _find(self, session: AsyncSession, actor: Actor, name: str) -> Template:
        """A template by name; archived ones exist only for template writers."""
        template = (
            await session.execute(select(Template).where(Template.name == name))
        ).scalar_one_or_none()
        if template is None or (
            template.archived_at is not None and not can(actor, Perm.TEMPLATE_WRITE)
        ):
            raise _not_found(name)
        return template

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

    async def list(self, actor: Actor, *, include_archived: bool) -> types.TemplateList:
        authorize(actor, Perm.TEMPLATE_READ, owner_id=None, kind="template")
        if include_archived:
            authorize(actor, Perm.TEMPLATE_WRITE, owner_id=None, kind="template")
        query = (
            select(Template, TemplateVersion.number)
            .outerjoin(TemplateVersion, TemplateVersion.id == Template.active_version_id)
            .order_by(Template.name)
        )
        if not include_archived:
            query = query.where(Template.archived_at.is_(None))
        if not can(actor, Perm.TEMPLATE_WRITE):
            # Members see only what they can use: templates with an active version.
            query = query.where(Template.active_version_id.is_not(None))
        async with self.db.session() as session:
            rows = (await session.execute(query)).all()
        templates = [_template_api(t, number) for t, number in rows]
        return types.TemplateList(templates=templates, count=len(templates))

    async def get(self, actor: Actor, name: str) -> types.Template:
        authorize(actor, Perm.TEMPLATE_READ, owner_id=None, kind="template")
        async with self.db.session() as session:
            template = await self._find(session, actor, name)
            return _template_api(template, await self._active_number(session, template))

    async def versions(self, actor: Actor, name: str) -> types.TemplateVersionList:
        authorize(actor, Perm.TEMPLATE_READ, owner_id=None, kind="template")
        async with self.db.session() as session:
            template = await self._find(session, actor, name)
            rows = await session.execute(
                select(*_VERSION_COLUMNS)
                .where(TemplateVersion.template_id == template.id)
                .order_by(TemplateVersion.number)
            )
            return types.TemplateVersionList(versions=[_version_api(r, template) for r in rows])

    async def archive_of(self, actor: Actor, name: str, number: int) -> tuple[bytes, str]:
        """(the .tar.gz as pushed, its sha256)."""
        authorize(actor, Perm.TEMPLATE_READ, owner_id=None, kind="template")
        async with self.db.session() as session:
            template = await self._find(session, actor, name)
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
    ) -> types.TemplateVersion:
        record.describe("template.push", "template", resource_name=name[:128])
        authorize(actor, Perm.TEMPLATE_WRITE, owner_id=None, kind="template")
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
        info, manifest = await asyncio.to_thread(_check_upload, data, name)
        stored = manifest.model_dump(mode="json")
        try:
            async with self.db.transaction() as session:
                template = (
                    await session.execute(select(Template).where(Template.name == name))
                ).scalar_one_or_none()
                created = template is None
                if template is None:
                    template = Template(
                        name=name,
                        display_name=manifest.display_name,
                        description=manifest.description,
                        icon=manifest.icon,
                        backend=manifest.backend,
                        created_by=actor.user_id,
                    )
                    session.add(template)
                    await session.flush()
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
        self, actor: Actor, name: str, number: int, record: AuditRecord
    ) -> types.Template:
        record.describe("template.activate", "template", resource_name=name[:128])
        authorize(actor, Perm.TEMPLATE_WRITE, owner_id=None, kind="template")
        async with self.db.transaction() as session:
            template = await self._find(session, actor, name)
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
            return _template_api(template, number)

    async def archive(self, actor: Actor, name: str, record: AuditRecord) -> types.Template:
        record.describe("template.archive", "template", resource_name=name[:128])
        authorize(actor, Perm.TEMPLATE_WRITE, owner_id=None, kind="template")
        async with self.db.transaction() as session:
            template = await self._find(session, actor, name)
            record.resource_id = template.id
            before = await self._snapshot(session, template)
            if template.archived_at is None:
                template.archived_at = utcnow()
                template.updated_at = template.archived_at
            after = await self._snapshot(session, template)
            record.diff = diff_fields(before, after)
            return _template_api(template, after["active_version"])
