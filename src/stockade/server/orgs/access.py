"""Who may see and use what inside organizations: the queries every service
that holds org-scoped objects (templates, workspaces) asks.

The rules, in one place:

- Site roles reach every organization: owners and template-admins administer
  every template; auditors and user-admins read every template.
- Every user is a member of the default organization; other memberships are
  rows. An organization a user is not a member of does not exist for them
  (404, never 403).
- ``org-admin`` administers everything in its organization: templates,
  workspaces (not getting into them), members, groups.
- Inside an organization, a template is visible to a member only through its
  ACL: a ``use`` or ``admin`` entry for the user, or for a group the user is
  in (the ``everyone`` group, whose id is the organization's, holds every
  member).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import IntEnum
from typing import get_args

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from stockade.sdk import types
from stockade.server.authz import Actor, Perm, can
from stockade.server.db.models import (
    GroupMember,
    Organization,
    OrganizationMember,
    TemplateGroupAcl,
    TemplateUserAcl,
)
from stockade.server.errors import NotFound

ORG_ADMIN = "org-admin"
EVERYONE = "everyone"


class TemplateAccess(IntEnum):
    """What a user may do with a template, in increasing order."""

    NONE = 0
    READ = 1  # see it (auditors, user-admins)
    USE = 2  # see it and build workspaces from it
    ADMIN = 3  # push, activate, archive, change its ACL

    @classmethod
    def of(cls, role: str) -> TemplateAccess:
        return cls.ADMIN if role == "admin" else cls.USE


ACL_ROLES: tuple[str, ...] = get_args(types.TemplateRole)


def org_not_found(name: str) -> NotFound:
    return NotFound(f"organization {name!r} not found", reason="organization_not_found")


@dataclass(frozen=True)
class Standing:
    """One user's organizations (id -> org roles held there) and groups."""

    user_id: str
    orgs: dict[str, frozenset[str]]
    group_ids: frozenset[str]
    site_wide_read: bool  # site roles that read every organization
    site_template_admin: bool

    def is_org_admin(self, org_id: str) -> bool:
        return ORG_ADMIN in self.orgs.get(org_id, frozenset())

    def admin_org_ids(self) -> set[str]:
        return {org for org, roles in self.orgs.items() if ORG_ADMIN in roles}


async def default_org_id(session: AsyncSession) -> str:
    return (
        await session.execute(select(Organization.id).where(Organization.is_default.is_(True)))
    ).scalar_one()


async def is_member(session: AsyncSession, org: Organization, user_id: str) -> bool:
    """Whether the user is in the organization (everyone is in the default one)."""
    if org.is_default:
        return True
    return await session.get(OrganizationMember, (org.id, user_id)) is not None


async def standing(session: AsyncSession, actor: Actor) -> Standing:
    """The actor's memberships and groups: two small queries."""
    rows = (
        await session.execute(
            select(OrganizationMember.organization_id, OrganizationMember.roles).where(
                OrganizationMember.user_id == actor.user_id
            )
        )
    ).all()
    orgs = {org_id: frozenset(roles) for org_id, roles in rows}
    orgs.setdefault(await default_org_id(session), frozenset())
    group_ids = frozenset(
        (
            await session.execute(
                select(GroupMember.group_id).where(GroupMember.user_id == actor.user_id)
            )
        ).scalars()
    )
    return Standing(
        user_id=actor.user_id,
        orgs=orgs,
        # Every "everyone" group shares its organization's id.
        group_ids=group_ids | frozenset(orgs),
        site_wide_read=can(actor, Perm.TEMPLATE_READ),
        site_template_admin=can(actor, Perm.TEMPLATE_WRITE),
    )


async def find_org(session: AsyncSession, actor: Actor, name: str) -> Organization:
    """An organization by name, or the same 404 as for one that does not
    exist when the actor is not a member."""
    org = (
        await session.execute(select(Organization).where(Organization.name == name))
    ).scalar_one_or_none()
    if org is None:
        raise org_not_found(name)
    if can(actor, Perm.USER_READ):
        return org  # owners, user-admins, auditors and template-admins see every one
    mine = (await standing(session, actor)).orgs
    if org.id not in mine:
        raise org_not_found(name)
    return org


async def template_access(
    session: AsyncSession, who: Standing, templates: Iterable[tuple[str, str]]
) -> dict[str, TemplateAccess]:
    """Access to each (template id, organization id), in one query per ACL table."""
    pairs = list(templates)
    result: dict[str, TemplateAccess] = {}
    undecided: list[str] = []
    for template_id, org_id in pairs:
        if who.site_template_admin or who.is_org_admin(org_id):
            result[template_id] = TemplateAccess.ADMIN
        else:
            result[template_id] = TemplateAccess.READ if who.site_wide_read else TemplateAccess.NONE
            if org_id in who.orgs:
                undecided.append(template_id)
    if not undecided:
        return result
    user_rows = await session.execute(
        select(TemplateUserAcl.template_id, TemplateUserAcl.role).where(
            TemplateUserAcl.template_id.in_(undecided), TemplateUserAcl.user_id == who.user_id
        )
    )
    group_rows = await session.execute(
        select(TemplateGroupAcl.template_id, TemplateGroupAcl.role).where(
            TemplateGroupAcl.template_id.in_(undecided),
            TemplateGroupAcl.group_id.in_(who.group_ids),
        )
    )
    for template_id, role in [*user_rows.all(), *group_rows.all()]:
        result[template_id] = max(result[template_id], TemplateAccess.of(role))
    return result


async def may_read_workspace(
    session: AsyncSession, actor: Actor, owner_id: str, organization_id: str
) -> bool:
    """Its owner, site owners and user-admins, and its organization's admins
    (who manage workspaces but, like user-admins, do not get into them)."""
    if can(actor, Perm.WORKSPACE_READ, owner_id=owner_id):
        return True
    return organization_id in (await standing(session, actor)).admin_org_ids()
