"""The one middleware every request passes: request id, authentication,
audit, metrics and the access log. Pure ASGI, so streaming responses pass
through untouched."""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote_to_bytes, urlsplit

import structlog
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stockade.sdk.templates import MAX_ARCHIVE_BYTES
from stockade.server.audit.service import AuditRecord, write_record
from stockade.server.errors import PayloadTooLarge
from stockade.server.observability import get_logger

if TYPE_CHECKING:
    from starlette.responses import Response

    from stockade.server.services import Services
    from stockade.server.settings import Settings

log = get_logger("stockade.http")

SESSION_COOKIE = "stockade_session"
TOKEN_HEADER = "stockade-session-token"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PROVISIONERD_PREFIX = "/api/v2/provisionerd/"
# API bodies are small JSON documents; routes that take uploads will set their own.
API_BODY_LIMIT = 1024 * 1024
# Routes that take uploads, with their own limit: (method, path pattern, bytes).
AIBRIDGE_PREFIX = "/api/v2/aibridge/"
# The provider routes, where clients send model requests: the only place a
# workspace's bridge-only key (and Anthropic's x-api-key header) counts. The
# records under /api/v2/aibridge/interceptions are not among them.
AIBRIDGE_PROVIDER_ROUTES = re.compile(r"^/api/v2/aibridge/(openai|anthropic)/")
# A coding agent's request carries its whole conversation and tool output.
AIBRIDGE_BODY_LIMIT = 32 * 1024 * 1024
# A provisioner daemon's build result carries the workspace's backend state,
# a whole Terraform state among them.
BUILD_STATE_LIMIT = 64 * 1024 * 1024
UPLOAD_LIMITS = (
    ("POST", re.compile(r"^/api/v2/templates/[^/]+/versions$"), MAX_ARCHIVE_BYTES),
    ("POST", re.compile(r"^/api/v2/aibridge/[a-z]+/v1/"), AIBRIDGE_BODY_LIMIT),
    ("POST", re.compile(r"^/api/v2/provisionerd/jobs/[^/]+/complete$"), BUILD_STATE_LIMIT),
)
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
STATIC_PREFIX = "/static/"
# Every response of the API and the dashboard (workspace apps, served before
# this middleware, keep their own): nothing but this origin, no inline script,
# no framing by another site.
SECURITY_HEADERS = (
    (
        "content-security-policy",
        "default-src 'self'; base-uri 'self'; form-action 'self'; frame-ancestors 'self'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "same-origin"),
    ("x-frame-options", "SAMEORIGIN"),
)


def presented_token(headers: Headers, *, bridge: bool = False) -> tuple[str, bool] | None:
    """The credential a client sent, and whether it came in the session cookie:
    ``Authorization: Bearer``, our header, or the cookie (in that order); on
    the AI bridge also ``x-api-key``, where Anthropic's clients send theirs."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip(), False
    if headers.get(TOKEN_HEADER):
        return headers[TOKEN_HEADER].strip(), False
    if bridge and headers.get("x-api-key", "").strip():
        return headers["x-api-key"].strip(), False
    for part in headers.get("cookie", "").split(";"):
        name, _, value = part.strip().partition("=")
        if name == SESSION_COOKIE and value:
            return value, True
    return None


def session_cookie(token: str, max_age: int, *, secure: bool) -> str:
    """The Set-Cookie value for a session (the login endpoint sets the same)."""
    return f"{SESSION_COOKIE}={token}; HttpOnly; Max-Age={max_age}; Path=/; SameSite=lax" + (
        "; Secure" if secure else ""
    )


def set_session_cookie(response: Response, token: str, settings: Settings) -> None:
    """Give the browser the session just signed in (the API's login and the
    dashboard's)."""
    secure = bool(settings.secure_cookies)
    response.headers.append(
        "set-cookie", session_cookie(token, settings.session_lifetime_seconds, secure=secure)
    )


def _has_nul(scope: Scope) -> bool:
    # PostgreSQL cannot store or compare text holding NUL; refuse it before any
    # query so both databases answer the same.
    query = unquote_to_bytes(scope.get("query_string", b""))
    return "\x00" in scope["path"] or b"\x00" in query


async def _reject(
    send: Send | Any, status: int, message: str, reason: str, request_id: str
) -> None:
    body = json.dumps({"message": message, "reason": reason, "request_id": request_id}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-request-id", request_id.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def body_limit(method: str, path: str) -> int:
    for upload_method, pattern, limit in UPLOAD_LIMITS:
        if method == upload_method and pattern.match(path):
            return limit
    return API_BODY_LIMIT


def _limit_body(receive: Receive, limit: int) -> Receive:
    """Refuse bodies over ``limit`` bytes whether or not Content-Length says so;
    the error reaches the app's handlers and becomes a JSON 413."""
    seen = 0

    async def limited() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"the request body is too large: the limit is {limit} bytes")
        return message

    return limited


class RequestMiddleware:
    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services
        access = urlsplit(services.settings.access_url)
        self.origin = f"{access.scheme}://{access.netloc}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        incoming_id = headers.get("x-request-id", "")
        request_id = incoming_id if _REQUEST_ID.match(incoming_id) else uuid.uuid4().hex
        client = scope.get("client")
        ip = client[0] if client else None
        method: str = scope["method"]
        path: str = scope["path"]
        structlog.contextvars.bind_contextvars(request_id=request_id)

        if _has_nul(scope):
            await _reject(send, 400, "the URL must not contain a NUL character",
                          "invalid_input", request_id)  # fmt: skip
            return

        state = scope.setdefault("state", {})
        record = AuditRecord(ip=ip, user_agent=headers.get("user-agent"), request_id=request_id)
        state["audit"] = record
        state["request_id"] = request_id
        state["actor"] = None
        bridge = AIBRIDGE_PROVIDER_ROUTES.match(path) is not None
        presented = presented_token(headers, bridge=bridge)
        refreshed_cookie: str | None = None
        unsafe = method not in _SAFE_METHODS
        if unsafe and (not path.startswith("/api/") or (presented and presented[1])):
            # Browsers send Origin with every POST: a form or script of another
            # site (a workspace app on a sibling subdomain included) must not
            # act with this site's session cookie. Pages check a CSRF token too.
            origin = headers.get("origin")
            if origin is not None and origin != self.origin:
                await _reject(
                    send, 403,
                    f"request refused: it came from {origin[:100]}, not from this site "
                    f"({self.origin}). Open Stockade at its access URL and try again.",
                    "cross_site", request_id,
                )  # fmt: skip
                return
        if presented is not None and not path.startswith(STATIC_PREFIX):
            token, from_cookie = presented
            auth = await self.services.auth.authenticate(token, ip, bridge=bridge)
            if from_cookie and auth.slid_for:
                # The server-side expiry slid; the browser's copy must follow.
                secure = bool(self.services.settings.secure_cookies)
                refreshed_cookie = session_cookie(token, auth.slid_for, secure=secure)
            state["actor"] = auth.actor
            state["auth_problem"] = auth.problem
            if auth.actor is not None:
                record.user_id, record.username = auth.actor.user_id, auth.actor.username
                structlog.contextvars.bind_contextvars(user=auth.actor.username)

        # Provisioner daemons' heartbeats and log batches are not user actions;
        # the builds they finish are audited by the build queue itself. The AI
        # bridge keeps a richer record of its own calls.
        audited = (
            unsafe
            and not path.startswith(PROVISIONERD_PREFIX)
            and not bridge
            and not path.startswith(STATIC_PREFIX)
        )
        status = 500
        receive = _limit_body(receive, body_limit(method, path))

        started_response = False

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                response_headers = MutableHeaders(scope=message)
                response_headers["x-request-id"] = request_id
                for name, value in SECURITY_HEADERS:
                    response_headers.setdefault(name, value)
                sets_session = any(
                    v.startswith(f"{SESSION_COOKIE}=")
                    for v in response_headers.getlist("set-cookie")
                )
                if refreshed_cookie and not sets_session:  # logout's deletion wins
                    response_headers.append("set-cookie", refreshed_cookie)
                if audited:
                    await self._audit(scope, record, status)
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # Handled here rather than by Starlette's outermost handler so that
            # the 500 carries the request id, is logged with it, and is audited.
            log.exception("unhandled_error", method=method, path=path)
            self.services.metrics.errors.labels("internal").inc()
            if started_response:
                raise
            message = (
                "internal error; an administrator can find it in the server log by its "
                f"request id {request_id}"
            )
            await _reject(send_wrapper, 500, message, "internal", request_id)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            elapsed = time.perf_counter() - started
            metrics = self.services.metrics
            metrics.requests.labels(method, template, str(status)).inc()
            metrics.latency.labels(method, template).observe(elapsed)
            log.info(
                "request",
                method=method,
                path=path,
                route=template,
                status=status,
                duration_ms=round(elapsed * 1000, 2),
                ip=ip,
            )
            structlog.contextvars.unbind_contextvars("request_id", "user")

    async def _audit(self, scope: Scope, record: AuditRecord, status: int) -> None:
        if record.action is None:
            # The handler did not describe itself (refused before it ran, or no
            # such route): name the route template, never the raw path, which
            # the client controls and may be of any length.
            route: Any = scope.get("route")
            template = getattr(route, "path", None)
            record.action = f"{scope['method']} {template or 'unmatched'}"[:64]
            if template is None:
                record.details["path"] = scope["path"][:256]
        try:
            await write_record(self.services.db, record, status, key=self.services.audit_key)
        except Exception:
            # The action itself already happened; losing its audit entry must be
            # loud, but turning the answer into an error would mislead the client.
            log.exception("audit_write_failed", action=record.action)
