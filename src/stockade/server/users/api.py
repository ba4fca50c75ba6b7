"""User endpoints: thin wrappers over ``UserService``."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from stockade.sdk import types
from stockade.server.authz import Perm, public, requires, signed_in
from stockade.server.deps import ActorDep, AuditDep, Limit, Offset, ServicesDep
from stockade.server.users.service import to_api

router = APIRouter(prefix="/api/v2")


@router.get("/users/first", dependencies=[public()])
async def first_user_status(services: ServicesDep) -> types.FirstUserStatus:
    """Whether the deployment still needs its first user."""
    return types.FirstUserStatus(first_user_required=await services.users.first_user_required())


@router.post(
    "/users/first",
    dependencies=[public()],
    status_code=201,
    responses={409: {"model": types.ApiError}},
)
async def create_first_user(
    body: types.FirstUserRequest, services: ServicesDep, record: AuditDep
) -> types.User:
    """Create the first user, as owner. Closed for good once a user exists."""
    return to_api(await services.users.create_first_user(body, record))


@router.get("/users", dependencies=[requires(Perm.USER_READ)])
async def list_users(
    actor: ActorDep,
    services: ServicesDep,
    limit: Limit = 100,
    offset: Offset = 0,
    q: Annotated[str | None, Query(max_length=128, description="search text")] = None,
    status: Literal["active", "suspended"] | None = None,
) -> types.UserList:
    """Users, ordered by username, searchable by username, email or name."""
    users, count = await services.users.search(
        actor, q=q, status=status, limit=limit, offset=offset
    )
    return types.UserList(users=users, count=count)


@router.post("/users", dependencies=[requires(Perm.USER_CREATE)], status_code=201)
async def create_user(
    body: types.CreateUserRequest, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> types.User:
    return to_api(await services.users.create(actor, body, record))


@router.get("/users/{user}", dependencies=[signed_in()])
async def get_user(user: str, actor: ActorDep, services: ServicesDep) -> types.User:
    """A user by id, username or ``me``."""
    return to_api(await services.users.get(actor, user))


@router.put("/users/{user}/status/suspend", dependencies=[requires(Perm.USER_UPDATE)])
async def suspend_user(
    user: str, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> types.User:
    """Suspend: the user's sessions and tokens stop working on their next request."""
    return to_api(await services.users.set_status(actor, user, "suspended", record))


@router.put("/users/{user}/status/activate", dependencies=[requires(Perm.USER_UPDATE)])
async def activate_user(
    user: str, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> types.User:
    return to_api(await services.users.set_status(actor, user, "active", record))


@router.put("/users/{user}/roles", dependencies=[requires(Perm.USER_ROLES)])
async def set_roles(
    user: str,
    body: types.UpdateRolesRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> types.User:
    """Replace the user's roles (``member`` is implicit)."""
    return to_api(await services.users.set_roles(actor, user, list(body.roles), record))


@router.put("/users/{user}/password", dependencies=[signed_in()], status_code=204)
async def change_password(
    user: str,
    body: types.UpdatePasswordRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> None:
    """Change a password; your own needs ``old_password``. Other sessions end."""
    await services.users.change_password(actor, user, body, record)


@router.delete("/users/{user}", dependencies=[requires(Perm.USER_DELETE)], status_code=204)
async def delete_user(user: str, actor: ActorDep, services: ServicesDep, record: AuditDep) -> None:
    await services.users.delete(actor, user, record)
