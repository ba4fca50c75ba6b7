"""Organization, member and group endpoints: thin wrappers over ``OrgService``.
Who may do what is decided by the service (see its docstring)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import Response

from stockade.sdk import types
from stockade.server.authz import signed_in
from stockade.server.deps import ActorDep, AuditDep, ServicesDep

router = APIRouter(prefix="/api/v2")

OrgPath = Annotated[str, Path(max_length=64, description="organization name")]
GroupPath = Annotated[str, Path(max_length=64, description="group name")]
UserPath = Annotated[str, Path(max_length=64, description="username")]


@router.get("/organizations", dependencies=[signed_in()])
async def list_organizations(actor: ActorDep, services: ServicesDep) -> types.OrganizationList:
    """The organizations the caller is a member of (all of them for owners,
    user-admins, template-admins and auditors)."""
    return await services.orgs.list(actor)


@router.post("/organizations", dependencies=[signed_in()], status_code=201)
async def create_organization(
    body: types.CreateOrganizationRequest, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> types.Organization:
    """Create an organization (site owners). It starts with no members but its
    admins-to-be, added with PUT .../members/{user}."""
    return await services.orgs.create(actor, body, record)


@router.get("/organizations/{org}", dependencies=[signed_in()])
async def get_organization(
    org: OrgPath, actor: ActorDep, services: ServicesDep
) -> types.Organization:
    return await services.orgs.get(actor, org)


@router.patch("/organizations/{org}", dependencies=[signed_in()])
async def update_organization(
    org: OrgPath,
    body: types.UpdateOrganizationRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> types.Organization:
    return await services.orgs.update(actor, org, body, record)


@router.delete("/organizations/{org}", dependencies=[signed_in()], status_code=204)
async def delete_organization(
    org: OrgPath, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> Response:
    """Delete an empty organization (no templates, no workspaces); site owners."""
    await services.orgs.delete(actor, org, record)
    return Response(status_code=204)


@router.get("/organizations/{org}/members", dependencies=[signed_in()])
async def list_members(
    org: OrgPath, actor: ActorDep, services: ServicesDep
) -> types.OrganizationMemberList:
    return await services.orgs.members(actor, org)


@router.put("/organizations/{org}/members/{user}", dependencies=[signed_in()])
async def set_member(
    org: OrgPath,
    user: UserPath,
    body: types.UpdateMemberRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> types.OrganizationMember:
    """Add a user to the organization, or set their org roles (``org-admin``)."""
    return await services.orgs.set_member(actor, org, user, body, record)


@router.delete("/organizations/{org}/members/{user}", dependencies=[signed_in()], status_code=204)
async def remove_member(
    org: OrgPath, user: UserPath, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> Response:
    await services.orgs.remove_member(actor, org, user, record)
    return Response(status_code=204)


@router.get("/organizations/{org}/groups", dependencies=[signed_in()])
async def list_groups(org: OrgPath, actor: ActorDep, services: ServicesDep) -> types.GroupList:
    return await services.orgs.groups(actor, org)


@router.post("/organizations/{org}/groups", dependencies=[signed_in()], status_code=201)
async def create_group(
    org: OrgPath,
    body: types.CreateGroupRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> types.Group:
    return await services.orgs.create_group(actor, org, body, record)


@router.get("/organizations/{org}/groups/{group}", dependencies=[signed_in()])
async def get_group(
    org: OrgPath, group: GroupPath, actor: ActorDep, services: ServicesDep
) -> types.Group:
    return await services.orgs.group(actor, org, group)


@router.patch("/organizations/{org}/groups/{group}", dependencies=[signed_in()])
async def update_group(
    org: OrgPath,
    group: GroupPath,
    body: types.UpdateGroupRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> types.Group:
    """Rename (display name) and add or remove members."""
    return await services.orgs.update_group(actor, org, group, body, record)


@router.delete("/organizations/{org}/groups/{group}", dependencies=[signed_in()], status_code=204)
async def delete_group(
    org: OrgPath, group: GroupPath, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> Response:
    await services.orgs.delete_group(actor, org, group, record)
    return Response(status_code=204)
