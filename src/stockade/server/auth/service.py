"""Login, sessions and API tokens."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from stockade.sdk import types
from stockade.server.audit.service import AuditRecord
from stockade.server.auth import keys, passwords
from stockade.server.auth.ratelimit import SlidingWindow, account_key
from stockade.server.authz import Actor, Perm, actor_for, authorize
from stockade.server.db import ApiKey, Database, User
from stockade.server.db.models import utcnow
from stockade.server.errors import (
    Conflict,
    Forbidden,
    InvalidInput,
    NotFound,
    TooManyRequests,
    Unauthenticated,
)
from stockade.server.settings import Settings
from stockade.server.users.service import check_may_manage, resolve_user

LOGIN_FAILED = "incorrect username or password"
# Writes of last-used time and sliding expiry happen at most this often per key.
_TOUCH_INTERVAL = timedelta(seconds=60)


_KEY_WITH_USER = (
    select(
        ApiKey.id,
        ApiKey.hashed_secret,
        ApiKey.user_id,
        ApiKey.login_type,
        ApiKey.lifetime_seconds,
        ApiKey.expires_at,
        ApiKey.last_used_at,
        ApiKey.workspace_id,
        User.username,
        User.status,
        User.roles,
    )
    .join(User, User.id == ApiKey.user_id)
    .where(ApiKey.id == bindparam("key_id"))
)


@dataclass(frozen=True)
class Authentication:
    actor: Actor | None
    problem: str | None = None  # why a presented credential was refused
    slid_for: int | None = None  # a session's new lifetime, when this use extended it


class AuthService:
    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.settings = settings
        self.ip_attempts = SlidingWindow(settings.login_rate_per_ip, 60)
        self.user_failures = SlidingWindow(settings.login_failures_per_user, 15 * 60)

    # --- requests -----------------------------------------------------------

    async def authenticate(
        self, token: str, ip: str | None = None, *, bridge: bool = False
    ) -> Authentication:
        """The actor a token stands for. A workspace's AI bridge key is good
        only where ``bridge`` says the request is for the AI bridge."""
        parts = keys.split(token)
        if parts is None:
            return Authentication(None, "the session token or API token is malformed")
        key_id, secret = parts
        # Every authenticated request runs this: one prepared Core query.
        async with self.db.read() as conn:
            key = (await conn.execute(_KEY_WITH_USER, {"key_id": key_id})).one_or_none()
        if key is None or not keys.matches(secret, key.hashed_secret):
            return Authentication(None, "the session or API token is invalid or was revoked")
        now = utcnow()
        if key.expires_at <= now:
            return Authentication(None, "the session or API token has expired; sign in again")
        if key.status != "active":
            return Authentication(None, "your account is suspended; ask an administrator")
        if key.login_type == keys.AIBRIDGE_LOGIN_TYPE and not bridge:
            return Authentication(
                None, "this token is only good for the AI bridge (/api/v2/aibridge/)"
            )
        sliding = None
        if key.last_used_at is None or now - key.last_used_at > _TOUCH_INTERVAL:
            sliding = key.lifetime_seconds if key.login_type == "password" else None
            await self._touch(key.id, key.user_id, sliding, now, ip)
        return Authentication(
            actor_for(
                key.user_id,
                key.username,
                key.roles,
                api_key_id=key.id,
                login_type=key.login_type,
                workspace_id=key.workspace_id or "",
            ),
            slid_for=sliding,
        )

    async def _touch(
        self, key_id: str, user_id: str, sliding: int | None, now: datetime, ip: str | None
    ) -> None:
        """Record use; sessions (``sliding`` = their lifetime) also move their expiry."""
        values: dict[str, object] = {"last_used_at": now}
        if ip:
            values["ip_address"] = ip
        if sliding is not None:
            values["expires_at"] = now + timedelta(seconds=sliding)
        async with self.db.transaction() as session:
            await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(**values))
            await session.execute(update(User).where(User.id == user_id).values(last_seen_at=now))

    # --- login / logout -----------------------------------------------------

    async def login(
        self, username: str, password: str, *, ip: str, record: AuditRecord
    ) -> tuple[str, datetime, User]:
        ident = username.strip().lower()
        record.describe("user.login", "user", username=ident)
        ip_wait = self.ip_attempts.retry_after(ip)
        if ip_wait:
            record.details["result"] = "rate_limited_ip"
            raise TooManyRequests(
                f"too many login attempts from your address; try again in {ip_wait} s",
                retry_after=ip_wait,
            )
        self.ip_attempts.hit(ip)

        async with self.db.session() as session:
            user = (
                await session.execute(
                    select(User).where(or_(User.username == ident, User.email == ident))
                )
            ).scalar_one_or_none()
        # One budget per account however it is named (username or email), and
        # the attempt counts before the password is checked, so concurrent
        # guesses cannot all slip in before the first failure is recorded.
        budget = account_key(user.id) if user else f"name:{ident}"
        user_wait = self.user_failures.retry_after(budget)
        if user_wait:
            record.details["result"] = "rate_limited_user"
            raise TooManyRequests(
                f"too many failed logins for this username; try again in {user_wait} s",
                retry_after=user_wait,
            )
        self.user_failures.hit(budget)
        if not await passwords.verify_password(user.hashed_password if user else None, password):
            # An SSO user without a password lands here too: the same answer
            # as a wrong password, so nobody learns how an account signs in.
            record.details["result"] = "failure"
            if user is not None:
                record.resource_id, record.resource_name = user.id, user.username
            raise Unauthenticated(LOGIN_FAILED, reason="login_failed")
        assert user is not None
        if user.login_type == "oidc" and self.settings.disable_password_auth_for_oidc_users:
            # Said only to who knows the password.
            record.details["result"] = "password_login_disabled"
            record.resource_id, record.resource_name = user.id, user.username
            raise Forbidden(
                f"{user.username} signs in with single sign-on, not a password: use "
                f"'{self.settings.oidc_sign_in_text}' on the login page, or "
                "`stockade login URL --sso`",
                reason="password_login_disabled",
            )
        record.resource_id, record.resource_name = user.id, user.username
        record.user_id, record.username = user.id, user.username
        if user.status != "active":
            record.details["result"] = "suspended"
            raise Forbidden("your account is suspended; ask an administrator", reason="suspended")
        self.user_failures.reset(budget)
        record.details["result"] = "success"

        async with self.db.transaction() as session:
            if user.hashed_password and passwords.needs_rehash(user.hashed_password):
                await session.execute(
                    update(User)
                    .where(User.id == user.id)
                    .values(hashed_password=await passwords.hash_password(password))
                )
            token, expires_at = await self.new_session(session, user_id=user.id, ip=ip)
        return token, expires_at, user

    async def new_session(
        self, session: AsyncSession, *, user_id: str, ip: str | None
    ) -> tuple[str, datetime]:
        """Start a session for a user who just proved who they are (password
        or single sign-on), inside the caller's transaction: the token and
        its expiry."""
        key, token = await self._new_key(
            session,
            user_id=user_id,
            login_type="password",  # a session (sliding expiry), however it was signed in
            lifetime=self.settings.session_lifetime_seconds,
            ip=ip,
        )
        await session.execute(update(User).where(User.id == user_id).values(last_seen_at=utcnow()))
        return token, key.expires_at

    async def logout(self, actor: Actor, record: AuditRecord) -> None:
        record.describe("user.logout", "user", actor.user_id, actor.username)
        if actor.login_type != "password":
            raise InvalidInput(
                "this request used an API token, not a session: revoke tokens with "
                "`stockade tokens revoke`",
                reason="logout_with_token",
            )
        async with self.db.transaction() as session:
            await session.execute(delete(ApiKey).where(ApiKey.id == actor.api_key_id))

    async def _new_key(
        self,
        session: AsyncSession,
        *,
        user_id: str,
        login_type: str,
        lifetime: int,
        ip: str | None = None,
        name: str | None = None,
    ) -> tuple[ApiKey, str]:
        key_id, token, hashed = keys.generate()
        now = utcnow()
        key = ApiKey(
            id=key_id,
            hashed_secret=hashed,
            user_id=user_id,
            login_type=login_type,
            token_name=name,
            lifetime_seconds=lifetime,
            created_at=now,
            expires_at=now + timedelta(seconds=lifetime),
            # A new session counts as used now; a token stays unused until it is.
            last_used_at=now if login_type == "password" else None,
            ip_address=ip,
        )
        session.add(key)
        await session.flush()
        return key, token

    # --- API tokens ---------------------------------------------------------

    async def create_token(
        self, actor: Actor, user_ref: str, body: types.CreateTokenRequest, record: AuditRecord
    ) -> types.CreatedToken:
        lifetime = body.lifetime_seconds or self.settings.default_token_lifetime_seconds
        if lifetime > self.settings.max_token_lifetime_seconds:
            raise InvalidInput(
                f"lifetime_seconds is too long: the maximum is "
                f"{self.settings.max_token_lifetime_seconds} s "
                f"({self.settings.max_token_lifetime_seconds // 86400} days)",
                reason="token_lifetime_too_long",
            )
        if actor.login_type != "password":
            # A leaked token must not be able to mint longer-lived ones.
            raise Forbidden(
                "API tokens can only be created from a signed-in session (stockade login), "
                "not with another API token",
                reason="token_from_token",
            )
        async with self.db.transaction() as session:
            user = await resolve_user(session, actor, user_ref)
            authorize(actor, Perm.API_KEY_CREATE, owner_id=user.id, kind="api_key")
            check_may_manage(actor, user)
            exists = (
                await session.execute(
                    select(func.count())
                    .select_from(ApiKey)
                    .where(ApiKey.user_id == user.id, ApiKey.token_name == body.name)
                )
            ).scalar_one()
            if exists:
                raise Conflict(
                    f"{user.username} already has a token named {body.name!r}; revoke it or "
                    "choose another name",
                    reason="token_name_taken",
                )
            key, token = await self._new_key(
                session, user_id=user.id, login_type="token", lifetime=lifetime, name=body.name
            )
            record.describe(
                "token.create",
                "api_key",
                key.id,
                body.name,
                diff={"name": [None, body.name], "lifetime_seconds": [None, lifetime]},
                owner=user.username,
            )
            return types.CreatedToken(**_token(key).model_dump(), token=token)

    async def list_tokens(self, actor: Actor, user_ref: str) -> list[types.Token]:
        async with self.db.session() as session:
            user = await resolve_user(session, actor, user_ref)
            authorize(actor, Perm.API_KEY_READ, owner_id=user.id, kind="api_key")
            rows = (
                await session.execute(
                    select(ApiKey)
                    .where(ApiKey.user_id == user.id, ApiKey.login_type == "token")
                    .order_by(ApiKey.created_at)
                )
            ).scalars()
            return [_token(row) for row in rows]

    async def revoke_token(
        self, actor: Actor, user_ref: str, token_ref: str, record: AuditRecord
    ) -> None:
        async with self.db.transaction() as session:
            user = await resolve_user(session, actor, user_ref)
            authorize(actor, Perm.API_KEY_DELETE, owner_id=user.id, kind="api_key")
            check_may_manage(actor, user)
            tokens = select(ApiKey).where(ApiKey.user_id == user.id, ApiKey.login_type == "token")
            # By id first: a token may be named like another token's id.
            key = (
                await session.execute(tokens.where(ApiKey.id == token_ref))
            ).scalar_one_or_none() or (
                await session.execute(tokens.where(ApiKey.token_name == token_ref))
            ).scalar_one_or_none()
            if key is None:
                raise NotFound(
                    f"no token {token_ref!r} for {user.username}", reason="token_not_found"
                )
            record.describe("token.revoke", "api_key", key.id, key.token_name, owner=user.username)
            await session.execute(delete(ApiKey).where(ApiKey.id == key.id))


def _token(key: ApiKey) -> types.Token:
    return types.Token(
        id=key.id,
        name=key.token_name or "",
        user_id=key.user_id,
        created_at=key.created_at,
        expires_at=key.expires_at,
        last_used_at=key.last_used_at,
    )
