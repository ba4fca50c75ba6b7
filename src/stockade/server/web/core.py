"""What every dashboard page shares: rendering, the signed-in user, CSRF,
flash notices, and HTML error pages.

Pages are thin: they read the form, call the same services the API calls
(which check permissions), and render a template or redirect. A failed form
is rendered again with the service's message next to the field it names,
with the status code the API would have used.

CSRF: every form carries ``csrf_token``, an HMAC of the session's key id, so
it is worthless to another session and changes with each login; the request
middleware also refuses unsafe requests whose ``Origin`` is another site.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote, unquote, urlsplit

from fastapi import Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import ValidationError
from starlette.datastructures import FormData
from starlette.templating import Jinja2Templates

import stockade
from stockade.server.authz import Actor, Perm, Role, can
from stockade.server.errors import Forbidden, StockadeError
from stockade.server.validation import describe_validation_errors

if TYPE_CHECKING:
    from stockade.server.services import Services

WEB_DIR = Path(__file__).parent
TEMPLATES_DIR = WEB_DIR / "templates"
STATIC_DIR = WEB_DIR / "static"
STATIC_PREFIX = "/static"
FLASH_COOKIE = "stockade_flash"
CSRF_FIELD = "csrf_token"
# Forms are small; anything bigger is not a person typing (template uploads go
# through the API).
MAX_FORM_FIELDS = 200
# The organization every user belongs to (its name cannot change). Pages of
# its templates need no ``?org=``.
DEFAULT_ORG = "default"


def org_query(org: str | None, sep: str = "?") -> str:
    """``?org=NAME`` (or ``&org=...``) for an organization other than the
    default one, else nothing."""
    return f"{sep}org={quote(org, safe='')}" if org and org != DEFAULT_ORG else ""


def template_url(name: str, org: str | None = None, suffix: str = "") -> str:
    """The page of template ``name`` (``suffix``: a page under it), naming its
    organization when it is not the default one."""
    return f"/templates/{quote(name, safe='')}{suffix}{org_query(org)}"


templates = Jinja2Templates(directory=TEMPLATES_DIR)
templates.env.globals["version"] = stockade.__version__
templates.env.globals["Perm"] = Perm
templates.env.filters["unquote"] = unquote
templates.env.globals["template_url"] = template_url
templates.env.globals["org_query"] = org_query


class LoginRequired(Exception):
    """A page needs a signed-in user; the handler redirects to the login page
    and back to ``next_path`` afterwards."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def page_actor(request: Request) -> Actor:
    """The signed-in user of a page (the request middleware authenticated
    the session cookie), or a redirect to the login page."""
    actor: Actor | None = request.state.actor
    if actor is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired(target)
    return actor


PageActor = Annotated[Actor, Depends(page_actor)]


def csrf_token(services: Services, actor: Actor) -> str:
    """The CSRF token of ``actor``'s session (an HMAC, so nothing is stored)."""
    key = hashlib.sha256(b"stockade-csrf\0" + services.audit_key).digest()
    return hmac.new(key, actor.api_key_id.encode(), hashlib.sha256).hexdigest()


def safe_next(target: str | None, default: str = "/workspaces") -> str:
    """Only local paths may be redirected to after a login (no open redirect)."""
    if not target or not target.startswith("/") or target.startswith("//"):
        return default
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or "\\" in target:
        return default
    return target


@dataclass
class Nav:
    """What the navigation shows the signed-in user."""

    templates: bool
    orgs: bool
    users: bool
    audit: bool
    deployment: bool
    egress: bool
    aibridge: bool

    @classmethod
    def of(cls, actor: Actor) -> Nav:
        return cls(
            # Every user sees the templates their organizations let them use.
            templates=True,
            # Every user is a member of an organization or more, and may see them.
            orgs=True,
            users=can(actor, Perm.USER_READ) and bool(actor.roles - {Role.MEMBER}),
            audit=can(actor, Perm.AUDIT_READ),
            deployment=can(actor, Perm.DEPLOYMENT_READ),
            egress=can(actor, Perm.EGRESS_READ),
            # Everyone has their own AI bridge requests to look at.
            aibridge=True,
        )


def render(
    request: Request,
    template: str,
    context: Mapping[str, Any] | None = None,
    *,
    status_code: int = 200,
) -> HTMLResponse:
    """Render ``template`` with what every page needs: the user, the
    navigation, the CSRF token, and a notice left by the previous request."""
    services = _services(request)
    actor: Actor | None = request.state.actor
    flash = request.cookies.get(FLASH_COOKIE)
    full: dict[str, Any] = {
        "actor": actor,
        "nav": Nav.of(actor) if actor else None,
        "csrf": csrf_token(services, actor) if actor else "",
        "flash": flash,
        "access_url": services.settings.access_url,
        "path": request.url.path,
        **(context or {}),
    }
    response = templates.TemplateResponse(request, template, full, status_code=status_code)
    if flash is not None:
        response.delete_cookie(FLASH_COOKIE, path="/")
    # Pages show live state; a back button must not show a stale copy.
    response.headers["cache-control"] = "no-store"
    return response


def redirect(url: str, notice: str | None = None) -> RedirectResponse:
    """303 to ``url`` (a GET after a POST), with a one-time notice for the
    next page."""
    response = RedirectResponse(url, status_code=303)
    if notice:
        response.set_cookie(FLASH_COOKIE, quote(notice), path="/", httponly=True, samesite="lax")
    return response


async def read_form(request: Request, actor: Actor | None) -> FormData:
    """The posted form, after checking its CSRF token when a user is signed in
    (the login and first-user forms have no session yet; the middleware's
    Origin check covers them)."""
    form = await request.form(max_files=0, max_fields=MAX_FORM_FIELDS)
    if actor is not None:
        sent = form.get(CSRF_FIELD)
        expected = csrf_token(_services(request), actor)
        if not isinstance(sent, str) or not hmac.compare_digest(sent, expected):
            raise Forbidden(
                "This form has expired or came from another page. Reload the page and try again.",
                reason="csrf_failed",
            )
    return form


def field(form: FormData, name: str) -> str:
    """A text field of ``form`` ("" when absent)."""
    value = form.get(name)
    return value if isinstance(value, str) else ""


@dataclass
class FormErrors:
    """What went wrong with a posted form: one message, and per-field messages
    to show next to the fields."""

    message: str
    fields: dict[str, str]
    status: int = 400  # the status the page is rendered with, as the API's

    @classmethod
    def of(cls, exc: StockadeError | ValidationError) -> FormErrors:
        status = 400
        if isinstance(exc, ValidationError):
            message, detail = describe_validation_errors(exc.errors())
            message = message.removeprefix("invalid request: ")
        else:
            message, detail, status = exc.message, exc.detail or [], exc.status_code
        fields: dict[str, str] = {}
        for item in detail:
            name = str(item.get("field", "")).rsplit(".", 1)[-1]
            if name and name not in fields:
                fields[name] = str(item.get("message", ""))
        return cls(message=message[:1].upper() + message[1:], fields=fields, status=status)


def error_page(request: Request, status: int, message: str, reason: str) -> Response:
    """The HTML answer to an error on a page (the API answers JSON)."""
    titles = {
        400: "That did not work",
        401: "Please sign in",
        403: "Not allowed",
        404: "Not found",
        409: "Conflict",
        413: "Too large",
        429: "Slow down",
    }
    return render(
        request,
        "error.html",
        {
            "title": titles.get(status, "Something went wrong"),
            "status": status,
            "message": message,
            "reason": reason,
            "request_id": getattr(request.state, "request_id", None),
        },
        status_code=status,
    )


def login_redirect(exc: LoginRequired) -> Response:
    return RedirectResponse(f"/login?next={quote(exc.next_path, safe='')}", status_code=303)
