"""Authorization: roles, permissions and the one deny-by-default policy.

Every API route declares exactly one policy dependency (``public()``,
``signed_in()`` or ``requires(permission)``); ``check_routes`` refuses to build
an app with a route that has none. Object-level decisions (is this token the
caller's own? may a user-admin touch an owner?) go through ``can`` / ``authorize``
in the service layer, so the same rules serve the API and the web pages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from stockade.server.errors import Forbidden, NotFound, Unauthenticated


class Role(StrEnum):
    OWNER = "owner"
    USER_ADMIN = "user-admin"
    TEMPLATE_ADMIN = "template-admin"
    AUDITOR = "auditor"
    MEMBER = "member"  # implicit: every user has it; never stored


ASSIGNABLE_ROLES = (Role.OWNER, Role.USER_ADMIN, Role.TEMPLATE_ADMIN, Role.AUDITOR)


class Perm(StrEnum):
    USER_READ = "user.read"
    USER_CREATE = "user.create"
    USER_UPDATE = "user.update"  # profile and status (suspend / activate)
    USER_DELETE = "user.delete"
    USER_ROLES = "user.roles"
    USER_PASSWORD = "user.password"
    API_KEY_READ = "api_key.read"
    API_KEY_CREATE = "api_key.create"
    API_KEY_DELETE = "api_key.delete"
    AUDIT_READ = "audit.read"
    DEPLOYMENT_READ = "deployment.read"
    EGRESS_READ = "egress.read"  # the egress report: owners and auditors
    TEMPLATE_READ = "template.read"  # active, non-archived templates
    TEMPLATE_WRITE = "template.write"  # push, activate, archive; see archived ones
    WORKSPACE_READ = "workspace.read"
    WORKSPACE_CREATE = "workspace.create"
    WORKSPACE_BUILD = "workspace.build"  # start, stop, restart, update, delete, cancel
    # ssh, port-forward, apps and terminals: the workspace owner (and site
    # owners); user-admins manage workspaces but do not get into them.
    WORKSPACE_CONNECT = "workspace.connect"
    PROVISIONER_ADMIN = "provisioner.admin"  # provisioner keys
    ORGANIZATION_CREATE = "organization.create"  # create and delete organizations
    AIBRIDGE_READ = "aibridge.read"  # everyone's AI bridge records: owners and auditors


_USER_ADMIN = {
    Perm.USER_READ,
    Perm.USER_CREATE,
    Perm.USER_UPDATE,
    Perm.USER_DELETE,
    Perm.USER_ROLES,
    Perm.USER_PASSWORD,
    Perm.API_KEY_READ,
    Perm.API_KEY_DELETE,
    Perm.WORKSPACE_READ,
    Perm.WORKSPACE_CREATE,
    Perm.WORKSPACE_BUILD,
}

# Permissions a role grants on every object of the site.
SITE_PERMISSIONS: dict[Role, frozenset[Perm]] = {
    Role.OWNER: frozenset(Perm),
    Role.USER_ADMIN: frozenset({*_USER_ADMIN, Perm.TEMPLATE_READ}),
    Role.TEMPLATE_ADMIN: frozenset({Perm.USER_READ, Perm.TEMPLATE_READ, Perm.TEMPLATE_WRITE}),
    Role.AUDITOR: frozenset(
        {
            Perm.USER_READ,
            Perm.AUDIT_READ,
            Perm.EGRESS_READ,
            Perm.TEMPLATE_READ,
            Perm.AIBRIDGE_READ,
        }
    ),
    # Members see templates through their organizations' ACLs (orgs.access).
    Role.MEMBER: frozenset(),
}

# Permissions every user has on what is their own (their user, their tokens).
OWNED_PERMISSIONS = frozenset(
    {
        Perm.USER_READ,
        Perm.USER_PASSWORD,
        Perm.API_KEY_READ,
        Perm.API_KEY_CREATE,
        Perm.API_KEY_DELETE,
        Perm.WORKSPACE_READ,
        Perm.WORKSPACE_CREATE,
        Perm.WORKSPACE_BUILD,
        Perm.WORKSPACE_CONNECT,
    }
)

# Which roles each role may grant or take away. A user may act on another user
# only when it could assign every role that user holds: a user-admin can
# therefore neither make an owner nor reset an owner's or an auditor's
# password. Granting user-admin or auditor is for owners alone, otherwise a
# user-admin could hand itself the audit log.
ASSIGNABLE_BY: dict[Role, frozenset[Role]] = {
    Role.OWNER: frozenset(ASSIGNABLE_ROLES),
    Role.USER_ADMIN: frozenset({Role.TEMPLATE_ADMIN}),
}

# The read permission that decides between 404 and 403 for an object.
_READ_OF = {
    "user": Perm.USER_READ,
    "api_key": Perm.API_KEY_READ,
    "template": Perm.TEMPLATE_READ,
    "workspace": Perm.WORKSPACE_READ,
}


@dataclass(frozen=True)
class Actor:
    """Who is making the request."""

    user_id: str
    username: str
    roles: frozenset[Role]
    api_key_id: str
    login_type: str
    # The workspace whose AI bridge key this is ("" for sessions and tokens).
    workspace_id: str = ""


def actor_for(
    user_id: str,
    username: str,
    roles: Iterable[str],
    *,
    api_key_id: str = "",
    login_type: str = "",
    workspace_id: str = "",
) -> Actor:
    """The Actor of a user (every user holds the implicit member role)."""
    return Actor(
        user_id=user_id,
        username=username,
        roles=frozenset(Role(r) for r in roles) | {Role.MEMBER},
        api_key_id=api_key_id,
        login_type=login_type,
        workspace_id=workspace_id,
    )


def site_permissions(roles: Iterable[Role]) -> frozenset[Perm]:
    perms: set[Perm] = set()
    for role in roles:
        perms |= SITE_PERMISSIONS.get(role, frozenset())
    return frozenset(perms)


def assignable_roles(actor: Actor) -> frozenset[Role]:
    roles: set[Role] = set()
    for role in actor.roles:
        roles |= ASSIGNABLE_BY.get(role, frozenset())
    return frozenset(roles)


def can(actor: Actor, perm: Perm, *, owner_id: str | None = None) -> bool:
    """Whether ``actor`` holds ``perm`` on an object owned by ``owner_id``
    (``None``: a site-wide action such as listing all users)."""
    if perm in site_permissions(actor.roles):
        return True
    return owner_id is not None and owner_id == actor.user_id and perm in OWNED_PERMISSIONS


def authorize(actor: Actor, perm: Perm, *, owner_id: str | None, kind: str) -> None:
    """Raise unless allowed. A caller who may not even see the object gets the
    same 404 as for an object that does not exist, so denials leak nothing."""
    if can(actor, perm, owner_id=owner_id):
        return
    read = _READ_OF.get(kind)
    if read is not None and not can(actor, read, owner_id=owner_id):
        raise NotFound(f"{kind.replace('_', ' ')} not found", reason=f"{kind}_not_found")
    raise Forbidden(
        f"you do not have permission to {perm.value.split('.')[1]} this {kind.replace('_', ' ')}",
        reason="forbidden",
        log_message=f"{actor.username} lacks {perm} on {kind} owned by {owner_id}",
    )


# --- Route policies ---------------------------------------------------------

_POLICY_MARK = "__stockade_policy__"


@dataclass
class RoutePolicy:
    """What a route requires; attached to the route as a dependency."""

    kind: str  # "public", "signed_in", "provisioner" or "permission"
    permission: Perm | None = None


def _mark(fn: Callable[..., Any], policy: RoutePolicy) -> Any:
    setattr(fn, _POLICY_MARK, policy)
    return Depends(fn)


def current_actor(request: Request) -> Actor:
    """The authenticated caller, or 401 saying why a credential was refused."""
    actor: Actor | None = getattr(request.state, "actor", None)
    if actor is None:
        problem = getattr(request.state, "auth_problem", None)
        raise Unauthenticated(problem or "sign in first: no valid session or API token was sent")
    return actor


def public() -> Any:
    """Anyone, signed in or not (login, first-user setup, health)."""

    async def _public(request: Request) -> None:
        return None

    return _mark(_public, RoutePolicy("public"))


def signed_in() -> Any:
    """Any signed-in user; the service decides per object."""

    async def _signed_in(request: Request) -> None:
        current_actor(request)

    return _mark(_signed_in, RoutePolicy("signed_in"))


PROVISIONER_KEY_HEADER = "Stockade-Provisioner-Key"


def provisioner() -> Any:
    """A provisioner daemon, authenticated by a provisioner key header."""

    async def _provisioner(request: Request) -> None:
        token = request.headers.get(PROVISIONER_KEY_HEADER, "")
        request.state.provisioner_key = (
            await request.app.state.services.provisioning.authenticate_key(token)
        )

    return _mark(_provisioner, RoutePolicy("provisioner"))


def requires(perm: Perm) -> Any:
    """A site-wide permission (for example ``audit.read``)."""

    async def _requires(request: Request) -> None:
        actor = current_actor(request)
        if not can(actor, perm):
            raise Forbidden(
                f"you do not have permission for this ({perm.value})",
                log_message=f"{actor.username} lacks {perm}",
            )

    return _mark(_requires, RoutePolicy("permission", perm))


def policy_of(route: APIRoute) -> RoutePolicy | None:
    for dep in route.dependant.dependencies:
        policy = getattr(dep.call, _POLICY_MARK, None)
        if isinstance(policy, RoutePolicy):
            return policy
    return None


def check_routes(routes: Iterable[BaseRoute], prefix: str = "/api/") -> None:
    """Refuse to start with an API route that declares no policy."""
    missing = [
        f"{sorted(r.methods or ())} {r.path}"
        for r in routes
        if isinstance(r, APIRoute) and r.path.startswith(prefix) and policy_of(r) is None
    ]
    if missing:
        raise RuntimeError(f"API routes without an authorization policy: {missing}")
