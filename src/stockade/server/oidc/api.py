"""Single sign-on endpoints: thin wrappers over ``OidcService``.

The login and callback are visited by the browser, so they answer with
redirects and, when something goes wrong, with an HTML page of the dashboard
that says what happened (the service logs why); a client that does not ask
for HTML gets the API's JSON error instead."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response

from stockade.sdk import types
from stockade.server.authz import public
from stockade.server.deps import AuditDep, ServicesDep
from stockade.server.middleware import set_session_cookie
from stockade.server.oidc.service import LOGIN_PATH, STATE_LIFETIME, OidcError
from stockade.server.settings import Settings
from stockade.server.web.core import render

router = APIRouter(prefix="/api/v2")

STATE_COOKIE = "stockade_oidc_state"
# The state cookie goes only to the two single sign-on routes.
STATE_COOKIE_PATH = "/api/v2/users/oidc/"
# Query parameters the callback reads, and the most of each it reads.
_CALLBACK_PARAMS = {
    "state": 512,
    "code": 4096,
    "error": 256,
    "error_description": 1024,
    "iss": 2048,
}


def _sso_error(request: Request, exc: OidcError) -> Response:
    """A browser (which asks for HTML) gets a dashboard page saying what went
    wrong; a script gets the API's JSON error."""
    response: Response
    if "text/html" not in request.headers.get("accept", ""):
        body = types.ApiError(
            message=exc.message,
            reason=exc.reason,
            request_id=getattr(request.state, "request_id", None),
        )
        response = JSONResponse(body.model_dump(exclude_none=True), status_code=exc.status)
        response.delete_cookie(STATE_COOKIE, path=STATE_COOKIE_PATH)
        return response
    response = render(
        request,
        "sso_error.html",
        {
            "title": "Single sign-on did not work",
            "status": exc.status,
            "message": exc.message,
            "reason": exc.reason,
            "retry": exc.status not in (403, 404),
            "login_url": LOGIN_PATH,
            "request_id": getattr(request.state, "request_id", None),
        },
        status_code=exc.status,
    )
    response.delete_cookie(STATE_COOKIE, path=STATE_COOKIE_PATH)
    return response


def _set_state_cookie(response: Response, state: str, settings: Settings) -> None:
    # Lax: the identity provider's redirect back is a top-level GET, which
    # carries it; HttpOnly: no script reads it.
    response.set_cookie(
        STATE_COOKIE,
        state,
        max_age=int(STATE_LIFETIME.total_seconds()),
        path=STATE_COOKIE_PATH,
        httponly=True,
        samesite="lax",
        secure=bool(settings.secure_cookies),
    )


@router.get("/users/authmethods", dependencies=[public()])
async def auth_methods(services: ServicesDep) -> types.AuthMethods:
    """How users may sign in: password, and single sign-on with its button label."""
    return services.oidc.auth_methods()


@router.get(
    "/users/oidc/login",
    dependencies=[public()],
    response_class=RedirectResponse,
    status_code=303,
    responses={303: {"description": "to the identity provider"}},
)
async def oidc_login(request: Request, services: ServicesDep, record: AuditDep) -> Response:
    """Start single sign-on: redirects to the identity provider. ``redirect``
    (a path of this site) is where the browser lands after signing in."""
    redirect = request.query_params.get("redirect")
    try:
        url, state = await services.oidc.begin(redirect, ip=record.ip or "unknown")
    except OidcError as exc:
        services.oidc.log_failure(exc, record)
        return _sso_error(request, exc)
    response = RedirectResponse(url, status_code=303)
    _set_state_cookie(response, state, services.settings)
    return response


@router.get(
    "/users/oidc/callback",
    dependencies=[public()],
    response_class=RedirectResponse,
    status_code=303,
    responses={303: {"description": "to the dashboard, signed in"}},
)
async def oidc_callback(request: Request, services: ServicesDep, record: AuditDep) -> Response:
    """Where the identity provider sends the browser back (register
    ``ACCESS_URL/api/v2/users/oidc/callback`` there). Signs the user in with
    the same session cookie as a password login."""
    params = {
        name: value[:limit]
        for name, limit in _CALLBACK_PARAMS.items()
        if (value := request.query_params.get(name)) is not None
    }
    try:
        result = await services.oidc.finish(
            params, browser_state=request.cookies.get(STATE_COOKIE), record=record
        )
    except OidcError as exc:
        return _sso_error(request, exc)
    response = RedirectResponse(result.redirect, status_code=303)
    set_session_cookie(response, result.token, services.settings)
    response.delete_cookie(STATE_COOKIE, path=STATE_COOKIE_PATH)
    return response
