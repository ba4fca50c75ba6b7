"""User accounts. Every method takes the acting user and checks the policy
itself, so the API and the web pages share one set of rules."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import bindparam, delete, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from stockade.sdk import types
from stockade.server.audit.service import AuditRecord, diff_fields, redact
from stockade.server.auth import passwords
from stockade.server.auth.ratelimit import SlidingWindow, account_key
from stockade.server.authz import Actor, Perm, Role, assignable_roles, authorize, can
from stockade.server.db import ApiKey, Database, User
from stockade.server.db.models import SetupState, Workspace, utcnow
from stockade.server.errors import Conflict, Forbidden, InvalidInput, NotFound, TooManyRequests

# Names that are also words in the API's paths (/users/me, /users/first...).
RESERVED_USERNAMES = frozenset(
    {"me", "first", "login", "logout", "admin-api", "system", "authmethods", "oidc"}
)


def _check_username(username: str) -> None:
    if username in RESERVED_USERNAMES:
        raise InvalidInput(
            f"the username {username!r} is reserved; choose another", reason="username_reserved"
        )


def to_api(user: User) -> types.User:
    return types.User.model_validate(user)


_USER_BY_REF = select(User).where(
    or_(User.id == bindparam("ref"), User.username == bindparam("name"))
)
# Lists read plain columns (no ORM objects) and validate them in one call: the
# per-row cost is what decides how a 1,000-row page performs.
_API_COLUMNS = [getattr(User, name) for name in types.User.model_fields]
_USER_ROWS = TypeAdapter(list[types.User])


def _snapshot(user: User) -> dict[str, Any]:
    return {
        "username": user.username,
        "email": user.email,
        "name": user.name,
        "status": user.status,
        "roles": sorted(user.roles),
    }


async def resolve_user(session: AsyncSession, actor: Actor, ref: str) -> User:
    """Find a user by id, username or ``me``. A user the actor may not read is
    reported exactly like one that does not exist."""
    if ref == "me":
        ref = actor.user_id
    user = (
        await session.execute(_USER_BY_REF, {"ref": ref, "name": ref.lower()})
    ).scalar_one_or_none()
    if user is None or not can(actor, Perm.USER_READ, owner_id=user.id):
        raise NotFound(f"user {ref!r} not found", reason="user_not_found")
    return user


def check_may_manage(actor: Actor, target: User) -> None:
    """A user-admin may not act on an owner: that would let them take over
    the account (reset its password) and so become one."""
    held = {Role(r) for r in target.roles}
    if not held <= assignable_roles(actor) and actor.user_id != target.id:
        raise Forbidden(
            f"you cannot change {target.username}: they hold roles you cannot assign "
            f"({', '.join(sorted(held - assignable_roles(actor)))})",
            reason="insufficient_role",
        )


class UserService:
    def __init__(self, db: Database, password_guesses: SlidingWindow) -> None:
        self.db = db
        # Shared with login: a stolen session must not be a way around the
        # login rate limit for guessing the account's password.
        self.password_guesses = password_guesses

    async def first_user_required(self) -> bool:
        async with self.db.session() as session:
            return (await session.get(SetupState, 1)) is None

    async def create_first_user(self, body: types.FirstUserRequest, record: AuditRecord) -> User:
        record.describe("user.create_first", "user", resource_name=body.username)
        closed = Conflict(
            "the first user already exists; sign in instead", reason="first_user_exists"
        )
        if not await self.first_user_required():  # before hashing: argon2 is not free
            raise closed
        _check_username(body.username)
        passwords.check_policy(body.password, username=body.username, email=body.email)
        hashed = await passwords.hash_password(body.password)
        try:
            async with self.db.transaction() as session:
                if await session.get(SetupState, 1) is not None:
                    raise closed
                user = User(
                    username=body.username,
                    email=body.email.lower(),
                    name=body.name,
                    hashed_password=hashed,
                    roles=[Role.OWNER.value],
                )
                session.add(user)
                await session.flush()
                session.add(SetupState(id=1, first_user_id=user.id))
                await session.flush()
        except IntegrityError as exc:  # a concurrent first-user request won
            raise closed from exc
        record.resource_id = record.user_id = user.id
        record.username = user.username
        record.diff = diff_fields({}, redact({**_snapshot(user), "password": "x"}))
        return user

    async def create(
        self, actor: Actor, body: types.CreateUserRequest, record: AuditRecord
    ) -> User:
        record.describe("user.create", "user", resource_name=body.username)
        authorize(actor, Perm.USER_CREATE, owner_id=None, kind="user")
        _check_username(body.username)
        roles = sorted(set(body.roles))
        self._check_may_assign(actor, set(), set(roles))
        passwords.check_policy(body.password, username=body.username, email=body.email)
        hashed = await passwords.hash_password(body.password)
        try:
            async with self.db.transaction() as session:
                await self._check_unique(session, body.username, body.email.lower())
                user = User(
                    username=body.username,
                    email=body.email.lower(),
                    name=body.name,
                    hashed_password=hashed,
                    roles=roles,
                )
                session.add(user)
                await session.flush()
        except IntegrityError as exc:
            raise Conflict(
                "a user with this username or email already exists", reason="user_exists"
            ) from exc
        record.resource_id = user.id
        record.diff = diff_fields({}, redact({**_snapshot(user), "password": "x"}))
        return user

    async def _check_unique(self, session: AsyncSession, username: str, email: str) -> None:
        taken = (
            await session.execute(
                select(User.username, User.email).where(
                    or_(User.username == username, User.email == email)
                )
            )
        ).first()
        if taken is not None:
            what = "username" if taken.username == username else "email"
            raise Conflict(f"that {what} is already taken", reason=f"{what}_taken")

    async def search(
        self, actor: Actor, *, q: str | None, status: str | None, limit: int, offset: int
    ) -> tuple[list[types.User], int]:
        authorize(actor, Perm.USER_READ, owner_id=None, kind="user")
        query = select(*_API_COLUMNS)
        if q:
            text = q.lower()
            query = query.where(
                or_(
                    User.username.contains(text, autoescape=True),
                    User.email.contains(text, autoescape=True),
                    func.lower(User.name).contains(text, autoescape=True),
                )
            )
        if status:
            query = query.where(User.status == status)
        async with self.db.read() as conn:
            count = (
                await conn.execute(select(func.count()).select_from(query.subquery()))
            ).scalar_one()
            rows = await conn.execute(query.order_by(User.username).limit(limit).offset(offset))
            names = list(rows.keys())
            # Plain dicts: pydantic validates those in Rust, RowMapping in Python.
            page = [dict(zip(names, row, strict=True)) for row in rows]
            return _USER_ROWS.validate_python(page), int(count)

    async def get(self, actor: Actor, ref: str) -> User:
        async with self.db.session() as session:
            return await resolve_user(session, actor, ref)

    async def set_status(self, actor: Actor, ref: str, status: str, record: AuditRecord) -> User:
        verb = "suspend" if status == "suspended" else "activate"
        async with self.db.transaction() as session:
            user = await resolve_user(session, actor, ref)
            record.describe(f"user.{verb}", "user", user.id, user.username)
            authorize(actor, Perm.USER_UPDATE, owner_id=None, kind="user")
            check_may_manage(actor, user)
            if user.id == actor.user_id:
                raise InvalidInput(f"you cannot {verb} yourself", reason="self_status")
            if status == "suspended" and Role.OWNER.value in user.roles:
                await self._keep_an_owner(session, user)
            before = _snapshot(user)
            user.status = status
            user.updated_at = utcnow()
            record.diff = diff_fields(before, _snapshot(user))
            return user

    async def set_roles(
        self, actor: Actor, ref: str, roles: list[str], record: AuditRecord
    ) -> User:
        async with self.db.transaction() as session:
            user = await resolve_user(session, actor, ref)
            record.describe("user.roles", "user", user.id, user.username)
            authorize(actor, Perm.USER_ROLES, owner_id=None, kind="user")
            if user.id == actor.user_id:
                raise Forbidden(
                    "you cannot change your own roles; ask another owner", reason="self_roles"
                )
            check_may_manage(actor, user)
            old, new = set(user.roles), set(roles)
            self._check_may_assign(actor, old, new)
            if Role.OWNER.value in old - new:
                await self._keep_an_owner(session, user)
            before = _snapshot(user)
            user.roles = sorted(new)
            user.updated_at = utcnow()
            record.diff = diff_fields(before, _snapshot(user))
            return user

    @staticmethod
    def _check_may_assign(actor: Actor, old: set[str], new: set[str]) -> None:
        changed = {Role(r) for r in old ^ new}
        refused = changed - assignable_roles(actor)
        if refused:
            raise Forbidden(
                f"you cannot grant or remove the role(s): {', '.join(sorted(refused))}",
                reason="insufficient_role",
            )

    @staticmethod
    async def _keep_an_owner(session: AsyncSession, leaving: User) -> None:
        others = (
            await session.execute(
                # FOR UPDATE (PostgreSQL): two owners demoting each other at once
                # are serialised, and the second sees the first's change.
                select(User.roles)
                .where(User.id != leaving.id, User.status == "active")
                .with_for_update()
            )
        ).scalars()
        if not any(Role.OWNER.value in roles for roles in others):
            raise Conflict(
                f"{leaving.username} is the last active owner; make another user an owner first",
                reason="last_owner",
            )

    async def change_password(
        self,
        actor: Actor,
        ref: str,
        body: types.UpdatePasswordRequest,
        record: AuditRecord,
    ) -> None:
        async with self.db.session() as session:
            user = await resolve_user(session, actor, ref)
        record.describe("user.password", "user", user.id, user.username)
        authorize(actor, Perm.USER_PASSWORD, owner_id=user.id, kind="user")
        check_may_manage(actor, user)
        if user.id == actor.user_id:
            if not body.old_password:
                raise InvalidInput(
                    "old_password is required to change your own password",
                    reason="old_password_required",
                )
            budget = account_key(user.id)
            wait = self.password_guesses.retry_after(budget)
            if wait:
                raise TooManyRequests(
                    f"too many wrong passwords for this account; try again in {wait} s",
                    retry_after=wait,
                )
            self.password_guesses.hit(budget)
            if not await passwords.verify_password(user.hashed_password, body.old_password):
                raise InvalidInput("old_password is incorrect", reason="old_password_wrong")
            self.password_guesses.reset(budget)
        passwords.check_policy(body.password, username=user.username, email=user.email)
        hashed = await passwords.hash_password(body.password)
        async with self.db.transaction() as session:
            fresh = await session.get(User, user.id)
            if fresh is None:
                raise NotFound(f"user {ref!r} not found", reason="user_not_found")
            fresh.hashed_password = hashed
            fresh.updated_at = utcnow()
            # Other sessions end; API tokens (explicitly created) stay.
            await session.execute(
                delete(ApiKey).where(
                    ApiKey.user_id == user.id,
                    ApiKey.login_type == "password",
                    ApiKey.id != actor.api_key_id,
                )
            )
        record.diff = {"password": ["[redacted]", "[redacted]"]}

    async def delete(self, actor: Actor, ref: str, record: AuditRecord) -> None:
        async with self.db.transaction() as session:
            user = await resolve_user(session, actor, ref)
            record.describe("user.delete", "user", user.id, user.username)
            authorize(actor, Perm.USER_DELETE, owner_id=None, kind="user")
            check_may_manage(actor, user)
            if user.id == actor.user_id:
                raise InvalidInput("you cannot delete yourself", reason="self_delete")
            if Role.OWNER.value in user.roles:
                await self._keep_an_owner(session, user)
            owned = (
                await session.execute(
                    select(func.count()).where(
                        Workspace.owner_id == user.id, Workspace.deleted.is_(False)
                    )
                )
            ).scalar_one()
            if owned:
                raise Conflict(
                    f"{user.username} still has {owned} workspace(s); delete them first "
                    f"(stockade list --owner {user.username}), or suspend the user instead",
                    reason="user_has_workspaces",
                )
            record.diff = diff_fields(_snapshot(user), {})
            await session.execute(delete(ApiKey).where(ApiKey.user_id == user.id))
            # Deleted workspaces keep their rows (and builds) until their owner
            # goes; the audit log keeps what happened to them.
            await session.execute(delete(Workspace).where(Workspace.owner_id == user.id))
            await session.delete(user)
