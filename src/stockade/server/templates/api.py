"""Template endpoints: thin wrappers over ``TemplateService``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import Response

from stockade.sdk import types
from stockade.server.authz import signed_in
from stockade.server.deps import ActorDep, AuditDep, ServicesDep
from stockade.server.errors import InvalidInput

router = APIRouter(prefix="/api/v2")

ARCHIVE_TYPES = frozenset({"application/gzip", "application/x-gzip", "application/octet-stream"})
Name = Annotated[str, Path(max_length=64, description="template name")]
Number = Annotated[int, Path(ge=1, le=2**31 - 1, description="version number")]
Org = Annotated[
    str | None,
    Query(
        max_length=32,
        description="the template's organization (needed only when the name is in several; "
        "for a new template, where to create it: default, the default organization)",
    ),
]


@router.get("/templates", dependencies=[signed_in()])
async def list_templates(
    actor: ActorDep,
    services: ServicesDep,
    include_archived: Annotated[
        bool, Query(description="also archived templates (template admins)")
    ] = False,
    org: Org = None,
) -> types.TemplateList:
    """Templates the caller can see, by name: all of them for template admins;
    for members, those their organizations' ACLs let them use (with an active
    version, not archived)."""
    return await services.templates.list(actor, include_archived=include_archived, org=org)


@router.get("/templates/{name}", dependencies=[signed_in()])
async def get_template(
    name: Name, actor: ActorDep, services: ServicesDep, org: Org = None
) -> types.Template:
    return await services.templates.get(actor, name, org)


@router.get("/templates/{name}/versions", dependencies=[signed_in()])
async def list_versions(
    name: Name, actor: ActorDep, services: ServicesDep, org: Org = None
) -> types.TemplateVersionList:
    """Every version of a template, oldest first (without the archives)."""
    return await services.templates.versions(actor, name, org)


@router.post(
    "/templates/{name}/versions",
    dependencies=[signed_in()],
    status_code=201,
    responses={400: {"model": types.ApiError}, 413: {"model": types.ApiError}},
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def push_version(
    name: Name,
    request: Request,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
    activate: Annotated[bool, Query(description="make the new version active")] = True,
    message: Annotated[str, Query(max_length=1024, description="what changed")] = "",
    org: Org = None,
) -> types.TemplateVersion:
    """Push a new immutable version: the template directory as a .tar.gz body
    (Content-Type: application/gzip, at most 10 MiB) holding ``stockade.yaml``
    at its top. The template is created on its first push."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in ARCHIVE_TYPES:
        raise InvalidInput(
            "send the template as a .tar.gz body with Content-Type: application/gzip "
            f"(got {content_type or 'no Content-Type'})",
            reason="invalid_content_type",
        )
    data = await request.body()
    return await services.templates.push(
        actor, name, data, activate=activate, message=message, record=record, org=org
    )


@router.get(
    "/templates/{name}/versions/{number}/archive",
    dependencies=[signed_in()],
    response_class=Response,
    responses={200: {"content": {"application/gzip": {}}}},
)
async def download_version(
    name: Name, number: Number, actor: ActorDep, services: ServicesDep, org: Org = None
) -> Response:
    """The version's archive exactly as it was pushed."""
    data, sha256 = await services.templates.archive_of(actor, name, number, org)
    return Response(
        data,
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{name}-v{number}.tar.gz"',
            "X-Stockade-Sha256": sha256,
        },
    )


@router.put("/templates/{name}/active", dependencies=[signed_in()])
async def set_active_version(
    name: Name,
    body: types.ActivateTemplateVersionRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
    org: Org = None,
) -> types.Template:
    """Make an existing version the active one (new workspaces use it)."""
    return await services.templates.set_active(actor, name, body.version, record, org)


@router.post("/templates/{name}/archive", dependencies=[signed_in()])
async def archive_template(
    name: Name, actor: ActorDep, services: ServicesDep, record: AuditDep, org: Org = None
) -> types.Template:
    """Hide a template from everyone but template admins; no new pushes."""
    return await services.templates.archive(actor, name, record, org)


@router.get("/templates/{name}/acl", dependencies=[signed_in()])
async def get_template_acl(
    name: Name, actor: ActorDep, services: ServicesDep, org: Org = None
) -> types.TemplateAcl:
    """Which users and groups may use or administer the template (its admins,
    auditors and user-admins may read this)."""
    return await services.templates.acl(actor, name, org)


@router.patch(
    "/templates/{name}/acl",
    dependencies=[signed_in()],
    responses={400: {"model": types.ApiError}},
)
async def update_template_acl(
    name: Name,
    body: types.UpdateTemplateAclRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
    org: Org = None,
) -> types.TemplateAcl:
    """Set (``use`` or ``admin``) or remove (``null``) entries for users and
    groups of the template's organization."""
    return await services.templates.update_acl(actor, name, body, record, org)
