"""The page ``stockade login URL --sso`` sends people to: once signed in
(with single sign-on or a password), it creates an API token for the CLI and
shows it once, to be pasted into the waiting terminal."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import Response

from stockade.sdk import types
from stockade.server.deps import AuditDep, ServicesDep
from stockade.server.web.core import PageActor, read_form, render

router = APIRouter(include_in_schema=False)  # pages, not API

CLI_AUTH_PATH = "/cli-auth"


@router.get(CLI_AUTH_PATH)
async def cli_auth_page(request: Request, actor: PageActor, services: ServicesDep) -> Response:
    # A GET creates nothing: the token is made by the form's POST (CSRF-checked).
    return render(request, "cli_auth.html", {"created": None})


@router.post(CLI_AUTH_PATH)
async def cli_auth_create(
    request: Request, actor: PageActor, services: ServicesDep, record: AuditDep
) -> Response:
    await read_form(request, actor)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    body = types.CreateTokenRequest(name=f"cli-{stamp}-{secrets.token_hex(2)}")
    created = await services.auth.create_token(actor, actor.user_id, body, record)
    days = (created.expires_at - created.created_at).days
    # Rendered, not redirected: the secret is on this response only.
    return render(request, "cli_auth.html", {"created": created, "days": days}, status_code=201)
