"""Organizations, their members and groups, and group sync from the IdP.

Who may do what (besides site owners, who may do everything):

- list and read organizations: their members; user-admins, auditors and
  template-admins read every one;
- create and delete organizations: site owners only;
- change an organization, its members, their org roles and its groups:
  its ``org-admin``s and site user-admins.
"""

from __future__ import annotations

import builtins
import json
import re
from collections.abc import Iterable

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from stockade.sdk import types
from stockade.server.audit.service import AuditRecord, append, diff_fields
from stockade.server.authz import Actor, Perm, can
from stockade.server.db import Database
from stockade.server.db.models import (
    Group,
    GroupMember,
    Organization,
    OrganizationMember,
    Template,
    TemplateUserAcl,
    User,
    Workspace,
    utcnow,
)
from stockade.server.errors import Conflict, Forbidden, InvalidInput, NotFound
from stockade.server.orgs.access import (
    EVERYONE,
    default_org_id,
    find_org,
    is_member,
    standing,
)
from stockade.server.settings import Settings

_GROUP_NAME = re.compile(types.GROUP_NAME_PATTERN)


def _org_api(org: Organization) -> types.Organization:
    return types.Organization.model_validate(org, from_attributes=True)


def _group_not_found(name: str) -> NotFound:
    return NotFound(f"group {name!r} not found", reason="group_not_found")


class OrgService:
    def __init__(self, db: Database, settings: Settings, audit_key: bytes) -> None:
        self.db = db
        self.settings = settings
        self.audit_key = audit_key
        # Group sync's settings, parsed once (the settings checked them at start).
        self._group_mapping: dict[str, str] = json.loads(settings.oidc_group_mapping or "{}")
        self._group_filter = (
            re.compile(settings.oidc_group_regex_filter)
            if settings.oidc_group_regex_filter
            else None
        )

    # --- permission helpers -------------------------------------------------------

    @staticmethod
    async def _check_may_manage(session: AsyncSession, actor: Actor, org: Organization) -> None:
        """Org-admins and site user-admins manage an organization's members
        and groups; a member who may only look is told so (403)."""
        if can(actor, Perm.USER_UPDATE):
            return
        if (await standing(session, actor)).is_org_admin(org.id):
            return
        raise Forbidden(
            f"only the admins of organization {org.name!r} can change it",
            reason="forbidden",
            log_message=f"{actor.username} is not an org-admin of {org.name}",
        )

    @staticmethod
    async def _user(session: AsyncSession, username: str) -> User:
        user = (
            await session.execute(select(User).where(User.username == username.lower()))
        ).scalar_one_or_none()
        if user is None:
            raise InvalidInput(f"there is no user {username!r}", reason="user_not_found")
        return user

    # --- organizations -----------------------------------------------------------

    async def list(self, actor: Actor) -> types.OrganizationList:
        async with self.db.session() as session:
            query = select(Organization).order_by(Organization.name)
            if not can(actor, Perm.USER_READ):
                query = query.where(
                    Organization.id.in_(list((await standing(session, actor)).orgs))
                )
            orgs = [_org_api(o) for o in (await session.execute(query)).scalars()]
        return types.OrganizationList(organizations=orgs, count=len(orgs))

    async def get(self, actor: Actor, name: str) -> types.Organization:
        async with self.db.session() as session:
            return _org_api(await find_org(session, actor, name))

    async def create(
        self, actor: Actor, body: types.CreateOrganizationRequest, record: AuditRecord
    ) -> types.Organization:
        record.describe("organization.create", "organization", resource_name=body.name)
        if not can(actor, Perm.ORGANIZATION_CREATE):
            raise Forbidden("only site owners can create organizations", reason="forbidden")
        try:
            async with self.db.transaction() as session:
                org = Organization(
                    name=body.name,
                    display_name=body.display_name or body.name,
                    description=body.description,
                    is_default=False,
                )
                session.add(org)
                await session.flush()
                # The "everyone" group shares the organization's id (as in Coder).
                session.add(
                    Group(
                        id=org.id,
                        organization_id=org.id,
                        name=EVERYONE,
                        display_name="Everyone",
                        source=EVERYONE,
                    )
                )
                await session.flush()
                result = _org_api(org)
        except IntegrityError as exc:
            raise Conflict(
                f"an organization named {body.name!r} already exists; choose another name",
                reason="organization_exists",
            ) from exc
        record.resource_id = result.id
        return result

    async def update(
        self,
        actor: Actor,
        name: str,
        body: types.UpdateOrganizationRequest,
        record: AuditRecord,
    ) -> types.Organization:
        record.describe("organization.update", "organization", resource_name=name)
        async with self.db.transaction() as session:
            org = await find_org(session, actor, name)
            record.resource_id = org.id
            await self._check_may_manage(session, actor, org)
            before = {"display_name": org.display_name, "description": org.description}
            if body.display_name is not None:
                org.display_name = body.display_name
            if body.description is not None:
                org.description = body.description
            org.updated_at = utcnow()
            record.diff = diff_fields(
                before, {"display_name": org.display_name, "description": org.description}
            )
            return _org_api(org)

    async def delete(self, actor: Actor, name: str, record: AuditRecord) -> None:
        record.describe("organization.delete", "organization", resource_name=name)
        async with self.db.transaction() as session:
            org = await find_org(session, actor, name)
            record.resource_id = org.id
            if not can(actor, Perm.ORGANIZATION_CREATE):
                raise Forbidden("only site owners can delete organizations", reason="forbidden")
            if org.is_default:
                raise Conflict(
                    "the default organization cannot be deleted", reason="organization_default"
                )
            templates = (
                await session.execute(
                    select(func.count()).where(Template.organization_id == org.id)
                )
            ).scalar_one()
            workspaces = (
                await session.execute(
                    select(func.count()).where(
                        Workspace.organization_id == org.id, Workspace.deleted.is_(False)
                    )
                )
            ).scalar_one()
            if templates or workspaces:
                raise Conflict(
                    f"organization {name!r} still holds {templates} template(s) and "
                    f"{workspaces} workspace(s); delete those first",
                    reason="organization_not_empty",
                )
            await session.delete(org)

    # --- members -------------------------------------------------------------------

    async def members(self, actor: Actor, name: str) -> types.OrganizationMemberList:
        async with self.db.session() as session:
            org = await find_org(session, actor, name)
            roles = {
                user_id: builtins.list(r)
                for user_id, r in await session.execute(
                    select(OrganizationMember.user_id, OrganizationMember.roles).where(
                        OrganizationMember.organization_id == org.id
                    )
                )
            }
            query = select(User.id, User.username).order_by(User.username)
            if not org.is_default:
                query = query.where(User.id.in_(builtins.list(roles)))
            members = [
                types.OrganizationMember(
                    user_id=user_id,
                    username=username,
                    roles=sorted(roles.get(user_id, [])),
                    implicit=org.is_default,
                )
                for user_id, username in await session.execute(query)
            ]
        return types.OrganizationMemberList(members=members, count=len(members))

    async def set_member(
        self,
        actor: Actor,
        name: str,
        username: str,
        body: types.UpdateMemberRequest,
        record: AuditRecord,
    ) -> types.OrganizationMember:
        """Add a user to the organization, or change their org roles."""
        record.describe("organization.member", "organization", resource_name=name)
        async with self.db.transaction() as session:
            org = await find_org(session, actor, name)
            record.resource_id = org.id
            await self._check_may_manage(session, actor, org)
            user = await self._user(session, username)
            row = await session.get(OrganizationMember, (org.id, user.id))
            before = {
                "member": await is_member(session, org, user.id),
                "roles": sorted(row.roles) if row else [],
            }
            roles: builtins.list[str] = sorted(set(body.roles))
            if row is None:
                row = OrganizationMember(organization_id=org.id, user_id=user.id, roles=roles)
                session.add(row)
            else:
                row.roles = roles
            await session.flush()
            record.diff = diff_fields(before, {"member": True, "roles": roles})
            record.details["user"] = user.username
            return types.OrganizationMember(
                user_id=user.id, username=user.username, roles=roles, implicit=org.is_default
            )

    async def remove_member(
        self, actor: Actor, name: str, username: str, record: AuditRecord
    ) -> None:
        """Remove a user from a (non-default) organization, with their group
        memberships and template ACL entries there. Their workspaces stay;
        they can no longer start them from that organization's templates."""
        record.describe("organization.member_remove", "organization", resource_name=name)
        async with self.db.transaction() as session:
            org = await find_org(session, actor, name)
            record.resource_id = org.id
            await self._check_may_manage(session, actor, org)
            user = await self._user(session, username)
            record.details["user"] = user.username
            row = await session.get(OrganizationMember, (org.id, user.id))
            if org.is_default:
                if row is not None:  # only take away the org roles
                    await session.delete(row)
                    return
                raise Conflict(
                    "every user is a member of the default organization; suspend or delete "
                    "the user instead",
                    reason="organization_default",
                )
            if row is None:
                raise NotFound(
                    f"{user.username} is not a member of organization {name!r}",
                    reason="member_not_found",
                )
            await session.delete(row)
            group_ids = select(Group.id).where(Group.organization_id == org.id)
            await session.execute(
                delete(GroupMember).where(
                    GroupMember.user_id == user.id, GroupMember.group_id.in_(group_ids)
                )
            )
            template_ids = select(Template.id).where(Template.organization_id == org.id)
            await session.execute(
                delete(TemplateUserAcl).where(
                    TemplateUserAcl.user_id == user.id,
                    TemplateUserAcl.template_id.in_(template_ids),
                )
            )

    # --- groups --------------------------------------------------------------------

    @staticmethod
    async def _group_views(
        session: AsyncSession, org: Organization, groups: Iterable[Group]
    ) -> builtins.list[types.Group]:
        groups = builtins.list(groups)
        members: dict[str, builtins.list[str]] = {g.id: [] for g in groups}
        rows = await session.execute(
            select(GroupMember.group_id, User.username)
            .join(User, User.id == GroupMember.user_id)
            .where(GroupMember.group_id.in_(builtins.list(members)))
            .order_by(User.username)
        )
        for group_id, username in rows:
            members[group_id].append(username)
        return [
            types.Group(
                id=g.id,
                organization=org.name,
                name=g.name,
                display_name=g.display_name,
                source=g.source,
                members=members[g.id],
                created_at=g.created_at,
                updated_at=g.updated_at,
            )
            for g in groups
        ]

    @staticmethod
    async def _find_group(session: AsyncSession, org: Organization, name: str) -> Group:
        group = (
            await session.execute(
                select(Group).where(Group.organization_id == org.id, Group.name == name)
            )
        ).scalar_one_or_none()
        if group is None:
            raise _group_not_found(name)
        return group

    async def groups(self, actor: Actor, org_name: str) -> types.GroupList:
        async with self.db.session() as session:
            org = await find_org(session, actor, org_name)
            rows = (
                await session.execute(
                    select(Group).where(Group.organization_id == org.id).order_by(Group.name)
                )
            ).scalars()
            views = await self._group_views(session, org, rows)
        return types.GroupList(groups=views, count=len(views))

    async def group(self, actor: Actor, org_name: str, name: str) -> types.Group:
        async with self.db.session() as session:
            org = await find_org(session, actor, org_name)
            group = await self._find_group(session, org, name)
            return (await self._group_views(session, org, [group]))[0]

    async def _set_members(
        self,
        session: AsyncSession,
        org: Organization,
        group: Group,
        add: Iterable[str],
        remove: Iterable[str],
    ) -> None:
        add, remove = builtins.list(add), builtins.list(remove)
        if (add or remove) and group.source == EVERYONE:
            raise InvalidInput(
                "the everyone group holds every member of the organization; its members "
                "cannot be changed",
                reason="group_everyone",
            )
        for username in add:
            user = await self._user(session, username)
            if not await is_member(session, org, user.id):
                raise InvalidInput(
                    f"{user.username} is not a member of organization {org.name!r}; add them "
                    "to it first",
                    reason="not_a_member",
                )
            if await session.get(GroupMember, (group.id, user.id)) is None:
                session.add(GroupMember(group_id=group.id, user_id=user.id))
        for username in remove:
            user = await self._user(session, username)
            await session.execute(
                delete(GroupMember).where(
                    GroupMember.group_id == group.id, GroupMember.user_id == user.id
                )
            )

    async def create_group(
        self, actor: Actor, org_name: str, body: types.CreateGroupRequest, record: AuditRecord
    ) -> types.Group:
        record.describe("group.create", "group", resource_name=body.name)
        try:
            async with self.db.transaction() as session:
                org = await find_org(session, actor, org_name)
                await self._check_may_manage(session, actor, org)
                group = Group(
                    organization_id=org.id,
                    name=body.name,
                    display_name=body.display_name or body.name,
                    source="manual",
                )
                session.add(group)
                await session.flush()
                await self._set_members(session, org, group, body.members, [])
                await session.flush()
                record.resource_id = group.id
                record.details.update(organization=org.name, members=sorted(body.members))
                return (await self._group_views(session, org, [group]))[0]
        except IntegrityError as exc:
            raise Conflict(
                f"organization {org_name!r} already has a group named {body.name!r}",
                reason="group_exists",
            ) from exc

    async def update_group(
        self,
        actor: Actor,
        org_name: str,
        name: str,
        body: types.UpdateGroupRequest,
        record: AuditRecord,
    ) -> types.Group:
        record.describe("group.update", "group", resource_name=name)
        async with self.db.transaction() as session:
            org = await find_org(session, actor, org_name)
            group = await self._find_group(session, org, name)
            record.resource_id = group.id
            await self._check_may_manage(session, actor, org)
            before = (await self._group_views(session, org, [group]))[0]
            if body.display_name is not None:
                group.display_name = body.display_name
            await self._set_members(session, org, group, body.add_members, body.remove_members)
            group.updated_at = utcnow()
            await session.flush()
            after = (await self._group_views(session, org, [group]))[0]
            record.diff = diff_fields(
                {"display_name": before.display_name, "members": before.members},
                {"display_name": after.display_name, "members": after.members},
            )
            record.details["organization"] = org.name
            return after

    async def delete_group(
        self, actor: Actor, org_name: str, name: str, record: AuditRecord
    ) -> None:
        record.describe("group.delete", "group", resource_name=name)
        async with self.db.transaction() as session:
            org = await find_org(session, actor, org_name)
            group = await self._find_group(session, org, name)
            record.resource_id = group.id
            await self._check_may_manage(session, actor, org)
            if group.source == EVERYONE:
                raise Conflict(
                    "the everyone group cannot be deleted; change template ACLs instead",
                    reason="group_everyone",
                )
            record.details["organization"] = org.name
            await session.delete(group)

    # --- group sync ----------------------------------------------------------------

    def _synced_names(self, idp_groups: Iterable[str]) -> set[str]:
        """The Stockade group names the IdP's groups stand for: filtered by
        the regex, renamed by the mapping (unmapped ones keep their names)."""
        pattern = self._group_filter
        names = set()
        for idp_name in idp_groups:
            if not isinstance(idp_name, str) or (pattern and not pattern.search(idp_name)):
                continue
            name = self._group_mapping.get(idp_name, idp_name)
            if _GROUP_NAME.match(name) and name != EVERYONE:
                names.add(name)
        return names

    async def sync_user_groups(
        self, user_id: str, idp_groups: Iterable[str]
    ) -> types.GroupSyncResult:
        """Make a user's groups in the default organization follow the IdP,
        at each SSO login: add them to every group the claim names (created
        first when ``oidc_group_auto_create`` is on; skipped otherwise) and
        remove them from the groups that sync manages (``oidc`` ones, and
        any the mapping names) that the claim no longer names. Groups made
        by hand and not in the mapping are left alone. Changes are audited."""
        wanted = self._synced_names(idp_groups)
        managed_names = set(self._group_mapping.values())
        async with self.db.transaction() as session:
            org_id = await default_org_id(session)
            user = await session.get_one(User, user_id)
            groups = {
                g.name: g
                for g in (
                    await session.execute(select(Group).where(Group.organization_id == org_id))
                ).scalars()
            }
            created = []
            for name in sorted(wanted - set(groups)):
                if not self.settings.oidc_group_auto_create:
                    continue
                group = Group(organization_id=org_id, name=name, display_name=name, source="oidc")
                session.add(group)
                groups[name] = group
                created.append(name)
            await session.flush()
            current = set(
                (
                    await session.execute(
                        select(Group.name)
                        .join(GroupMember, GroupMember.group_id == Group.id)
                        .where(Group.organization_id == org_id, GroupMember.user_id == user_id)
                    )
                ).scalars()
            )
            added = sorted(n for n in wanted - current if n in groups)
            removed = sorted(
                n for n in current - wanted if groups[n].source == "oidc" or n in managed_names
            )
            for name in added:
                session.add(GroupMember(group_id=groups[name].id, user_id=user_id))
            if removed:
                await session.execute(
                    delete(GroupMember).where(
                        GroupMember.user_id == user_id,
                        GroupMember.group_id.in_([groups[n].id for n in removed]),
                    )
                )
            result = types.GroupSyncResult(added=added, removed=removed, created=created)
            if added or removed or created:
                await append(
                    session,
                    key=self.audit_key,
                    action="group.sync",
                    status_code=200,
                    user_id=user.id,
                    username=user.username,
                    resource_type="user",
                    resource_id=user.id,
                    resource_name=user.username,
                    diff={
                        "groups": [sorted(current), sorted((current - set(removed)) | set(added))]
                    },
                    details=result.model_dump(),
                )
        return result
