"""Sign-in pages: login, first-user setup, logout; the account page with the
password change and API tokens."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import ValidationError

from stockade.sdk import types
from stockade.server.deps import AuditDep, ServicesDep
from stockade.server.errors import InvalidInput, StockadeError
from stockade.server.middleware import SESSION_COOKIE, set_session_cookie
from stockade.server.web.core import (
    FormErrors,
    PageActor,
    field,
    read_form,
    redirect,
    render,
    safe_next,
)

if TYPE_CHECKING:
    from stockade.server.services import Services

router = APIRouter(include_in_schema=False)  # pages, not API

NextPath = Annotated[str | None, Query(alias="next", max_length=2048)]


@router.get("/")
async def home(request: Request, services: ServicesDep) -> Response:
    if request.state.actor is not None:
        return redirect("/workspaces")
    if await services.users.first_user_required():
        return redirect("/setup")
    return redirect("/login")


@router.get("/login")
async def login_page(
    request: Request, services: ServicesDep, next_path: NextPath = None
) -> Response:
    if request.state.actor is not None:
        return redirect(safe_next(next_path))
    if await services.users.first_user_required():
        return redirect("/setup")
    return render(request, "login.html", _login_context(services, safe_next(next_path), ""))


def _login_context(services: Services, next_path: str, username: str) -> dict[str, object]:
    """What the login page shows: the form, and the single sign-on button
    when it is set up."""
    methods = services.oidc.auth_methods().oidc
    return {
        "next": next_path,
        "username": username,
        "oidc_button": methods.sign_in_text if methods.enabled else "",
        "oidc_url": methods.login_url,
    }


@router.post("/login")
async def login(request: Request, services: ServicesDep, record: AuditDep) -> Response:
    form = await read_form(request, None)
    username, next_path = field(form, "username"), safe_next(field(form, "next"))
    try:
        body = types.LoginRequest(username=username, password=field(form, "password"))
        token, _, _ = await services.auth.login(
            body.username, body.password, ip=record.ip or "unknown", record=record
        )
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        context = {**_login_context(services, next_path, username), "errors": errors}
        return render(request, "login.html", context, status_code=errors.status)
    response = redirect(next_path)
    set_session_cookie(response, token, services.settings)
    return response


@router.get("/setup")
async def setup_page(request: Request, services: ServicesDep) -> Response:
    if not await services.users.first_user_required():
        return redirect("/login")
    return render(request, "setup.html", {"values": {}})


@router.post("/setup")
async def setup(request: Request, services: ServicesDep, record: AuditDep) -> Response:
    form = await read_form(request, None)
    values = {name: field(form, name) for name in ("username", "email", "name")}
    try:
        if field(form, "password") != field(form, "password_again"):
            return render(
                request,
                "setup.html",
                {
                    "values": values,
                    "errors": FormErrors(
                        "The two passwords differ.",
                        {"password_again": "Type the same password twice."},
                    ),
                },
                status_code=400,
            )
        body = types.FirstUserRequest(**values, password=field(form, "password"))
        await services.users.create_first_user(body, record)
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        context = {"values": values, "errors": errors}
        return render(request, "setup.html", context, status_code=errors.status)
    return redirect("/login", f"Welcome, {body.username}: your owner account is ready. Sign in.")


@router.post("/logout")
async def logout(
    request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    await read_form(request, actor)
    await services.auth.logout(actor, record)
    response = redirect("/login", "You are signed out.")
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def _account(
    request: Request,
    actor: PageActor,
    services: ServicesDep,
    *,
    status_code: int = 200,
    **context: object,
) -> Response:
    user = await services.users.get(actor, actor.user_id)
    tokens = await services.auth.list_tokens(actor, actor.user_id)
    return render(
        request,
        "account.html",
        {
            "user": user,
            "tokens": tokens,
            "max_token_days": services.settings.max_token_lifetime_seconds // 86400,
            "default_token_days": services.settings.default_token_lifetime_seconds // 86400,
            **context,
        },
        status_code=status_code,
    )


@router.get("/account")
async def account(request: Request, actor: PageActor, services: ServicesDep) -> Response:
    return await _account(request, actor, services)


@router.post("/account/password")
async def change_password(
    request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    form = await read_form(request, actor)
    try:
        if field(form, "password") != field(form, "password_again"):
            errors = FormErrors(
                "The two new passwords differ.", {"password_again": "Type the same password twice."}
            )
            return await _account(request, actor, services, status_code=400, password_errors=errors)
        body = types.UpdatePasswordRequest(
            old_password=field(form, "old_password") or None, password=field(form, "password")
        )
        await services.users.change_password(actor, actor.user_id, body, record)
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        return await _account(
            request, actor, services, status_code=errors.status, password_errors=errors
        )
    return redirect("/account", "Your password is changed.")


@router.post("/account/tokens")
async def create_token(
    request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    form = await read_form(request, actor)
    name, days = field(form, "name").strip(), field(form, "days").strip()
    most = services.settings.max_token_lifetime_seconds // 86400
    try:
        if days and not (days.isdecimal() and 1 <= int(days) <= most):
            # The form asks for days, so the message must too (the API speaks seconds).
            message = f"Days must be a whole number from 1 to {most}."
            raise InvalidInput(message, detail=[{"field": "days", "message": message}])
        lifetime = int(days) * 86400 if days else None
        body = types.CreateTokenRequest(name=name, lifetime_seconds=lifetime)
        created = await services.auth.create_token(actor, actor.user_id, body, record)
    except (StockadeError, ValidationError) as exc:
        errors = FormErrors.of(exc)
        return await _account(
            request, actor, services, status_code=errors.status, token_errors=errors,
            token_values={"name": name, "days": days},
        )  # fmt: skip
    # Rendered, not redirected: the secret is shown on this response only.
    return await _account(request, actor, services, status_code=201, created=created)


@router.post("/account/tokens/{token_id}/delete")
async def revoke_token(
    token_id: str, request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    await read_form(request, actor)
    await services.auth.revoke_token(actor, actor.user_id, token_id, record)
    return redirect("/account", "The token is revoked.")
