"""Dashboard pages for templates: the list, a template's versions (with
activation and archiving for template admins), and a version's manifest and
files.

The pages call ``services.templates`` as ``templates/api.py`` does; the
service decides who sees what (members: the templates their organizations'
ACLs give them, active and not archived; anything else is a 404). A
template's page also shows its ACL ("Access"), which its admins change.

Templates of the default organization have bare URLs; others carry
``?org=NAME``. A bare URL of a name in several organizations is the default
organization's template. A version's files are read from its archive as
pushed, in memory: nothing is extracted to disk, and a ``?file=`` path is
only ever compared with the names the archive lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import posixpath
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import func, select

from stockade.sdk import types
from stockade.sdk.templates import MANIFEST_NAME, Manifest
from stockade.server.authz import Actor
from stockade.server.db.models import Organization
from stockade.server.deps import AuditDep, ServicesDep
from stockade.server.errors import Conflict, Forbidden, InvalidInput, NotFound, StockadeError
from stockade.server.orgs.access import ACL_ROLES, TemplateAccess
from stockade.server.services import Services
from stockade.server.web.core import (
    DEFAULT_ORG,
    FormErrors,
    PageActor,
    field,
    read_form,
    redirect,
    render,
    template_url,
)

router = APIRouter(include_in_schema=False)  # pages, not API

# The same bounds as the API's path parameters.
Name = Annotated[str, Path(max_length=64)]
Number = Annotated[int, Path(ge=1, le=2**31 - 1)]
FilePath = Annotated[str | None, Query(alias="file", max_length=1024)]
Org = Annotated[str | None, Query(max_length=32, description="the template's organization")]
# A file bigger than this is not shown inline: a page of megabytes of text
# helps nobody, and `stockade templates pull` gets the whole tree.
MAX_SHOWN_BYTES = 256 * 1024


# --- archives -------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One entry of a version's archive."""

    path: str
    kind: str  # file, directory, symlink, hardlink
    size: int
    mode: int
    target: str | None = None  # what a link points to


@dataclass(frozen=True)
class Shown:
    """A file selected for display: its text, or why it is not shown."""

    entry: Entry
    text: str | None
    why_not: str | None
    link_to: str | None = None  # a symlink's target, when it is a file of the archive


def _clean(name: str) -> str:
    clean = posixpath.normpath(name.replace("\\", "/"))
    return "" if clean == "." else clean


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.isdir():
        return "directory"
    return "file"


def _entries(tar: tarfile.TarFile) -> Iterable[tuple[Entry, tarfile.TarInfo]]:
    sizes: dict[str, int] = {}
    for member in tar:
        path = _clean(member.name)
        if not path:
            continue
        kind = _kind(member)
        target = member.linkname if kind in ("symlink", "hardlink") else None
        size = member.size if kind == "file" else 0
        if kind == "hardlink":
            # The push accepted it only as a link to an earlier file.
            size = sizes.get(_clean(member.linkname), 0)
        sizes[path] = size
        yield Entry(path, kind, size, member.mode, target), member


def _read(tar: tarfile.TarFile, member: tarfile.TarInfo, limit: int) -> bytes:
    handle = tar.extractfile(member)  # a hard link reads its target's content
    return handle.read(limit) if handle is not None else b""


def _describe(data: bytes, size: int) -> tuple[str | None, str | None]:
    """(text, None) for a UTF-8 text file, else (None, why it is not shown)."""
    if size > MAX_SHOWN_BYTES:
        return None, (
            f"This file is {size:,} bytes, too large to show here "
            f"(the limit is {MAX_SHOWN_BYTES:,}). Pull the version to read it."
        )
    if b"\x00" in data:
        return None, f"This is a binary file ({size:,} bytes); it is not shown."
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        return None, f"This file is not UTF-8 text ({size:,} bytes); it is not shown."


def _inspect(archive: bytes, selected: str | None) -> tuple[list[Entry], str | None, Shown | None]:
    """The archive's entries by path, the raw manifest (``None`` when too
    large to show), and the selected file (``None`` when it is not a file of
    the archive).

    Runs in a thread: decompressing is CPU work."""
    entries: dict[str, Entry] = {}
    contents: dict[str, bytes] = {}
    # The version passed the push's checks (safe names, limits), so the
    # archive reads back; one pass decompresses it once.
    wanted = {MANIFEST_NAME, selected or MANIFEST_NAME}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for entry, member in _entries(tar):
            entries[entry.path] = entry
            small = entry.size <= MAX_SHOWN_BYTES
            if entry.path in wanted and entry.kind in ("file", "hardlink") and small:
                contents[entry.path] = _read(tar, member, MAX_SHOWN_BYTES)
    listing = sorted(entries.values(), key=lambda e: e.path)
    manifest_text: str | None = None  # None: too large to show
    if MANIFEST_NAME in contents:
        manifest_text = contents[MANIFEST_NAME].decode("utf-8", errors="replace")
    if selected is None:
        return listing, manifest_text, None
    found = entries.get(selected)
    if found is None or found.kind == "directory":
        return listing, manifest_text, None
    if found.kind == "symlink":
        target = _clean(posixpath.join(posixpath.dirname(found.path), found.target or ""))
        link_to = target if target in entries and entries[target].kind != "directory" else None
        why = f"A symbolic link to {found.target}."
        return listing, manifest_text, Shown(found, None, why, link_to)
    text, why_not = _describe(contents.get(selected, b""), found.size)
    return listing, manifest_text, Shown(found, text, why_not)


# --- helpers --------------------------------------------------------------------------


def show(value: Any) -> str:
    """A manifest value as it would be written in ``stockade.yaml``."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if value == "":
        return '""'
    return str(value)


async def _usernames(services: Services, actor: Actor, ids: Iterable[str]) -> dict[str, str]:
    """The usernames of ``ids`` that ``actor`` may read (members may read only
    themselves; the others stay unnamed)."""
    names: dict[str, str] = {}
    for user_id in set(ids):
        try:
            names[user_id] = (await services.users.get(actor, user_id)).username
        except NotFound:
            continue
    return names


def _parsed(version: types.TemplateVersion) -> Manifest | None:
    """The stored manifest as the model the services use (``None`` if a
    schema change made it unreadable: the raw file is still shown)."""
    try:
        return Manifest.model_validate(version.manifest)
    except ValidationError:
        return None


async def several_orgs(services: Services) -> bool:
    """Whether the deployment has more than one organization: lists then say
    which one each template or workspace belongs to."""
    async with services.db.session() as session:
        count = await session.execute(select(func.count()).select_from(Organization))
        return count.scalar_one() > 1


async def find(services: Services, actor: Actor, name: str, org: str | None) -> types.Template:
    """The template a page is about. Without ``org``, a name in several
    organizations is the default organization's (its pages' URLs name none)."""
    try:
        return await services.templates.get(actor, name, org)
    except Conflict as exc:
        if org is not None or exc.reason != "template_ambiguous":
            raise
        try:
            return await services.templates.get(actor, name, DEFAULT_ORG)
        except NotFound:
            raise exc from None


# --- pages ----------------------------------------------------------------------------


@router.get("/templates")
async def list_templates(
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    archived: Annotated[bool, Query()] = False,
) -> Response:
    listing = await services.templates.list(actor, include_archived=archived)
    counts: dict[str, int] = {}
    for template in listing.templates:
        versions = await services.templates.versions(actor, template.name, template.organization)
        counts[template.id] = len(versions.versions)
    return render(
        request,
        "templates/list.html",
        {
            "templates": listing.templates,
            "counts": counts,
            "show_archived": archived,
            "admin": await services.templates.administers_any(actor),
            "several_orgs": await several_orgs(services),
        },
    )


async def _detail(
    request: Request,
    actor: Actor,
    services: Services,
    name: str,
    org: str | None,
    *,
    status_code: int = 200,
    **context: object,
) -> Response:
    template = await find(services, actor, name, org)
    org = template.organization
    versions = (await services.templates.versions(actor, name, org)).versions
    pushers = await _usernames(services, actor, (v.created_by for v in versions))
    admin = await services.templates.access_of(actor, name, org) == TemplateAccess.ADMIN
    acl: types.TemplateAcl | None = None
    with contextlib.suppress(Forbidden):  # who may only use it does not see who else may
        acl = await services.templates.acl(actor, name, org)
    groups: list[str] = []
    if admin:
        listed = await services.orgs.groups(actor, org)
        groups = [g.name for g in listed.groups]
    return render(
        request,
        "templates/detail.html",
        {
            "template": template,
            "versions": list(reversed(versions)),  # newest first
            "latest": versions[-1].number if versions else None,
            "pushers": pushers,
            "admin": admin,
            "acl": acl,
            "acl_roles": ACL_ROLES,
            "groups": groups,
            "acl_values": {"kind": "group", "name": "", "role": "use"},
            **context,
        },
        status_code=status_code,
    )


@router.get("/templates/{name}")
async def template_page(
    name: Name, request: Request, actor: PageActor, services: ServicesDep, org: Org = None
) -> Response:
    return await _detail(request, actor, services, name, org)


@router.post("/templates/{name}/active")
async def set_active(
    name: Name,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
    org: Org = None,
) -> Response:
    form = await read_form(request, actor)
    try:
        org = (await find(services, actor, name, org)).organization
        body = types.ActivateTemplateVersionRequest.model_validate({"version": form.get("version")})
        await services.templates.set_active(actor, name, body.version, record, org)
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        if "version" in errors.fields:
            errors.message = "Choose a version: its number, a whole number from 1."
        return await _detail(
            request, actor, services, name, org, status_code=errors.status, activate_errors=errors
        )
    return redirect(
        template_url(name, org),
        f"Version {body.version} of {name} is now active: new workspaces and updates use it.",
    )


@router.post("/templates/{name}/archive")
async def archive(
    name: Name,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
    org: Org = None,
) -> Response:
    await read_form(request, actor)
    try:
        org = (await find(services, actor, name, org)).organization
        await services.templates.archive(actor, name, record, org)
    except StockadeError as exc:
        errors = FormErrors.of(exc)
        return await _detail(
            request, actor, services, name, org, status_code=errors.status, archive_errors=errors
        )
    return redirect(
        template_url(name, org),
        f"{name} is archived: members no longer see it, and it takes no new workspaces, "
        "pushes or activations.",
    )


# Service refusals that are about the name typed in the Access form.
_NAME_REASONS = ("not_a_member", "group_not_found", "user_not_found")


@router.post("/templates/{name}/acl")
async def set_acl(
    name: Name,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    record: AuditDep,
    org: Org = None,
) -> Response:
    """Add, change (``role``: use or admin) or remove (``role``: none) one
    entry of the template's ACL: ``kind`` user or group, and its ``name``."""
    form = await read_form(request, actor)
    values = {key: field(form, key).strip() for key in ("kind", "name", "role")}
    kind, who, role = values["kind"], values["name"], values["role"]
    try:
        org = (await find(services, actor, name, org)).organization
        problems = []
        if kind not in ("user", "group"):
            problems.append({"field": "kind", "message": "Choose a user or a group."})
        if not who:
            problems.append({"field": "name", "message": "Name the user or the group."})
        if role not in (*ACL_ROLES, "none"):
            problems.append({"field": "role", "message": "Choose use, admin or none."})
        if problems:
            raise InvalidInput(
                "Choose who (a user or a group, by name) and what they may do.", detail=problems
            )
        entry = {who: None if role == "none" else role}
        body = types.UpdateTemplateAclRequest.model_validate(
            {"users" if kind == "user" else "groups": entry}
        )
        await services.templates.update_acl(actor, name, body, record, org)
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        if isinstance(exc, ValidationError) or exc.reason in _NAME_REASONS:
            errors.fields.setdefault("name", errors.message)
        return await _detail(
            request, actor, services, name, org,
            status_code=errors.status, acl_errors=errors, acl_values=values,
        )  # fmt: skip
    if role == "none":
        notice = f"The {kind} {who} is off the access list of {name}."
    else:
        notice = f"The {kind} {who} may now {'administer' if role == 'admin' else 'use'} {name}."
    return redirect(template_url(name, org), notice)


@router.get("/templates/{name}/versions/{number}")
async def version_page(
    name: Name,
    number: Number,
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    selected: FilePath = None,
    org: Org = None,
) -> Response:
    template = await find(services, actor, name, org)
    org = template.organization
    archive_data, sha256 = await services.templates.archive_of(actor, name, number, org)
    versions = (await services.templates.versions(actor, name, org)).versions
    version = next((v for v in versions if v.number == number), None)
    if version is None:  # deleted between the two reads: not possible today
        raise NotFound(
            f"template {name!r} has no version {number}", reason="template_version_not_found"
        )
    path = _clean(selected) if selected else None
    entries, manifest_text, shown = await asyncio.to_thread(_inspect, archive_data, path)
    if path is not None and shown is None:
        # Archives need not list their directories: "a/b" makes "a" one too.
        directory = any(
            (e.path == path and e.kind == "directory") or e.path.startswith(path + "/")
            for e in entries
        )
        raise NotFound(
            f"{path!r} is a directory of version {number} of {name}; choose a file in it"
            if directory
            else f"version {number} of {name} has no file {path!r}",
            reason="template_file_not_found",
        )
    pushers = await _usernames(services, actor, [version.created_by])
    return render(
        request,
        "templates/version.html",
        {
            "template": template,
            "tpl_version": version,  # not "version": base.html shows the server's
            "sha256": sha256,
            "manifest": _parsed(version),
            "manifest_text": manifest_text,
            "entries": entries,
            "files": sum(1 for e in entries if e.kind != "directory"),
            "shown": shown,
            "pushers": pushers,
            "admin": await services.templates.access_of(actor, name, org) == TemplateAccess.ADMIN,
            "show": show,
        },
    )
