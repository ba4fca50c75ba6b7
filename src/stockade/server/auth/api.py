"""Login, logout and API-token endpoints."""

from __future__ import annotations

from fastapi import APIRouter, Response

from stockade.sdk import types
from stockade.server.authz import public, signed_in
from stockade.server.deps import ActorDep, AuditDep, ServicesDep
from stockade.server.middleware import SESSION_COOKIE, set_session_cookie
from stockade.server.users.service import to_api

router = APIRouter(prefix="/api/v2")


@router.post(
    "/users/login",
    dependencies=[public()],
    responses={401: {"model": types.ApiError}, 429: {"model": types.ApiError}},
)
async def login(
    body: types.LoginRequest,
    response: Response,
    services: ServicesDep,
    record: AuditDep,
) -> types.LoginResponse:
    """Sign in with a password. Sets the session cookie and returns the same
    token for clients that send it as ``Authorization: Bearer``."""
    token, expires_at, user = await services.auth.login(
        body.username, body.password, ip=record.ip or "unknown", record=record
    )
    set_session_cookie(response, token, services.settings)
    return types.LoginResponse(session_token=token, expires_at=expires_at, user=to_api(user))


@router.post("/users/logout", dependencies=[signed_in()], status_code=204)
async def logout(
    response: Response, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> None:
    """End the current session (an API token is revoked with DELETE .../tokens/{token})."""
    await services.auth.logout(actor, record)
    response.delete_cookie(SESSION_COOKIE, path="/")


@router.post("/users/{user}/tokens", dependencies=[signed_in()], status_code=201)
async def create_token(
    user: str,
    body: types.CreateTokenRequest,
    actor: ActorDep,
    services: ServicesDep,
    record: AuditDep,
) -> types.CreatedToken:
    """Create an API token. The secret is in this response only."""
    return await services.auth.create_token(actor, user, body, record)


@router.get("/users/{user}/tokens", dependencies=[signed_in()])
async def list_tokens(user: str, actor: ActorDep, services: ServicesDep) -> types.TokenList:
    """A user's API tokens, without their secrets."""
    return types.TokenList(tokens=await services.auth.list_tokens(actor, user))


@router.delete("/users/{user}/tokens/{token}", dependencies=[signed_in()], status_code=204)
async def revoke_token(
    user: str, token: str, actor: ActorDep, services: ServicesDep, record: AuditDep
) -> None:
    """Revoke a token by id or name; it stops working at once."""
    await services.auth.revoke_token(actor, user, token, record)
