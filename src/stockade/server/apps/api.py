"""Workspace apps over HTTP: the app proxy (an ASGI middleware, because
subdomain apps are chosen by ``Host`` before any route), the workspace's app
list and the subdomain sign-in redirect. Rules: :mod:`stockade.server.apps.service`."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl, urlencode

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import RedirectResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from stockade.sdk import types
from stockade.server.apps.proxy import (
    AgentStream,
    AppUnreachable,
    Counters,
    new_client_websocket,
    open_websocket,
    proxy_http,
    relay_websocket,
)
from stockade.server.apps.service import (
    APP_COOKIE,
    AUTHORIZE_PATH,
    TOKEN_QUERY,
    AppService,
    AppSession,
    ResolvedApp,
    parse_path,
)
from stockade.server.auth import keys
from stockade.server.authz import Actor, signed_in
from stockade.server.connections.service import ClientInfo
from stockade.server.deps import ActorDep, ServicesDep
from stockade.server.errors import StockadeError
from stockade.server.middleware import SESSION_COOKIE, TOKEN_HEADER, presented_token
from stockade.server.observability import get_logger

if TYPE_CHECKING:
    from stockade.server.services import Services

log = get_logger("stockade.apps")

router = APIRouter()

Owner = Annotated[str, Path(max_length=32, description="the owner's username, or me")]
Name = Annotated[str, Path(max_length=32, description="workspace name")]

# Credentials of this deployment never reach an app.
_STRIPPED_COOKIES = frozenset({SESSION_COOKIE, APP_COOKIE})
# Headers the proxy sets itself (a client's own would be believed by the app).
_OWN_HEADERS = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-prefix",
        b"forwarded",
        b"x-real-ip",
        TOKEN_HEADER.encode(),
    }
)
# Headers wsproto writes for the app-side WebSocket handshake.
_WS_HANDSHAKE = frozenset(
    {
        b"host",
        b"upgrade",
        b"connection",
        b"sec-websocket-key",
        b"sec-websocket-version",
        b"sec-websocket-extensions",
        b"sec-websocket-protocol",
    }
)


@router.get("/api/v2/workspaces/{owner}/{name}/apps", dependencies=[signed_in()])
async def list_apps(
    owner: Owner, name: Name, actor: ActorDep, services: ServicesDep
) -> types.WorkspaceAppList:
    """The workspace's apps: where to open each (subdomain and path URLs),
    its share level (as asked and as in force) and its health."""
    return await services.apps.list_apps(actor, owner, name)


@router.get(AUTHORIZE_PATH, dependencies=[signed_in()], response_class=RedirectResponse)
async def authorize(
    request: Request,
    actor: ActorDep,
    services: ServicesDep,
    redirect_uri: Annotated[
        str, Query(max_length=4096, description="the subdomain app URL to return to")
    ],
) -> RedirectResponse:
    """Subdomain app sign-in: redirects back to ``redirect_uri`` (an app URL
    under the wildcard) with a short-lived single-use app token, once the
    signed-in user may open that app (404 otherwise, as for a missing app)."""
    client = request.client
    info = ClientInfo(client.host if client else None, request.headers.get("user-agent"))
    location = await services.apps.authorize(actor, redirect_uri, info)
    return RedirectResponse(location, status_code=303, headers={"Cache-Control": "no-store"})


# --- the proxy -------------------------------------------------------------------------


async def _answer(
    scope: Scope,
    send: Send,
    status: int,
    message: str,
    reason: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An error (or redirect) from the proxy itself: JSON over HTTP, a close
    before the handshake (HTTP 403) over WebSocket."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 4000 + status if status < 1000 else 1008})
        return
    body = json.dumps({"message": message, "reason": reason}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _redirect(
    scope: Scope, send: Send, location: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [(b"location", location.encode()), *(extra or [])]
    await _answer(scope, send, 303, "see the Location header", "redirect", headers)


def _cookies(headers: Headers) -> dict[str, str]:
    found: dict[str, str] = {}
    for header in headers.getlist("cookie"):
        for part in header.split(";"):
            name, _, value = part.strip().partition("=")
            if name and name not in found:
                found[name] = value
    return found


def _is_stockade_bearer(value: bytes) -> bool:
    scheme, _, token = value.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and keys.split(token.strip()) is not None


def forwarded_headers(scope: Scope, *, host: str, prefix: str | None) -> list[tuple[bytes, bytes]]:
    """The browser's headers as the app gets them: no Stockade credentials,
    X-Forwarded-* set by us (never the client's)."""
    out: list[tuple[bytes, bytes]] = []
    for name, value in scope["headers"]:
        lower = name.lower()
        if lower in _OWN_HEADERS:
            continue
        if lower == b"authorization" and _is_stockade_bearer(value):
            continue
        if lower == b"cookie":
            kept = [
                part.strip()
                for part in value.decode("latin-1").split(";")
                if part.strip() and part.strip().partition("=")[0] not in _STRIPPED_COOKIES
            ]
            if kept:
                out.append((b"cookie", "; ".join(kept).encode("latin-1")))
            continue
        out.append((lower, value))
    client = scope.get("client")
    scheme = "https" if scope.get("scheme") in ("https", "wss") else "http"
    if client:
        out.append((b"x-forwarded-for", client[0].encode()))
    out.append((b"x-forwarded-proto", scheme.encode()))
    out.append((b"x-forwarded-host", host.encode("latin-1")))
    if prefix is not None:
        out.append((b"x-forwarded-prefix", prefix.encode()))
    return out


class AppProxyMiddleware:
    """Serves app requests (subdomain hosts, ``/@...`` paths) before the
    API's routing; passes everything else on."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services

    @property
    def apps(self) -> AppService:
        return self.services.apps

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        try:
            if self.apps.is_app_host(host):
                await self._subdomain(scope, receive, send, headers, host)
                return
            if scope["path"].startswith("/@"):
                await self._path(scope, receive, send, headers, host)
                return
        except StockadeError as exc:
            await _answer(scope, send, exc.status_code, exc.message, exc.reason)
            return
        await self.app(scope, receive, send)

    async def _subdomain(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, host: str
    ) -> None:
        apps = self.apps
        host = host.lower()
        address = apps.subdomain_address(host)
        if address is None or host != apps.subdomain_host(address):
            await _answer(scope, send, 404, f"no app at {host[:100]}", "app_not_found")
            return
        raw_path = _raw_path(scope)
        query = scope.get("query_string", b"").decode("latin-1")
        params = parse_qsl(query, keep_blank_values=True)
        token = next((v for k, v in params if k == TOKEN_QUERY), None)
        if token is not None and scope["type"] == "http":
            claims = apps.tokens.verify(token, "redirect", host)
            if claims is None:
                await _answer(
                    scope,
                    send,
                    400,
                    "this app sign-in link is invalid, used or "
                    "expired: open the app again from its URL",
                    "invalid_app_token",
                )
                return
            cookie = f"{APP_COOKIE}={apps.cookie_token(claims)}; Path=/; HttpOnly; SameSite=Lax"
            cookie += f"; Max-Age={apps.settings.app_token_lifetime_seconds}"
            if apps.scheme == "https":
                cookie += "; Secure"
            rest = urlencode([(k, v) for k, v in params if k != TOKEN_QUERY])
            # Never "//host" or "/\\host": browsers read those as another site.
            raw_path = "/" + raw_path.lstrip("/\\")
            await _redirect(
                scope,
                send,
                raw_path + (f"?{rest}" if rest else ""),
                [(b"set-cookie", cookie.encode()), (b"referrer-policy", b"no-referrer")],
            )
            return
        actor: Actor | None = None
        cookie_token = _cookies(headers).get(APP_COOKIE)
        if cookie_token:
            claims = apps.tokens.verify(cookie_token, "cookie", host)
            if claims is not None:
                actor = await apps.actor_for_key(claims.user_id, claims.key_id)
        resolved = await apps.resolve(address)
        if resolved is None or not apps.allowed(actor, resolved, by_path=False):
            if actor is not None:
                await _answer(
                    scope, send, 404, "app not found (or you may not open it)", "app_not_found"
                )
            elif scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
                here = f"{apps.scheme}://{host}{raw_path}" + (f"?{query}" if query else "")
                await _redirect(scope, send, apps.authorize_url(here))
            else:
                await _answer(
                    scope,
                    send,
                    401,
                    "sign in first: open the app's URL in a browser signed in to Stockade",
                    "unauthenticated",
                )
            return
        if scope["type"] == "websocket":
            origin = headers.get("origin")
            if origin is not None and origin.lower() != f"{apps.scheme}://{host}":
                # A sibling app's page (same site) must not ride this app's cookie.
                await _answer(scope, send, 403, "cross-origin WebSocket refused", "forbidden")
                return
        target = resolved.target.base_path + raw_path + (f"?{query}" if query else "")
        await self._proxy(scope, receive, send, resolved, actor, target, host, None, "subdomain")

    async def _path(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers, host: str
    ) -> None:
        apps = self.apps
        raw_path = _raw_path(scope)
        parsed = parse_path(raw_path)
        if parsed is None:
            await _answer(
                scope,
                send,
                404,
                "not an app address: use /@USER/WORKSPACE/apps/SLUG/ "
                "or /@USER/WORKSPACE/ports/PORT/",
                "app_not_found",
            )
            return
        query = scope.get("query_string", b"").decode("latin-1")
        if parsed.rest is None:
            if scope["type"] == "websocket":
                await _answer(scope, send, 404, "app not found", "app_not_found")
                return
            # Relative links resolve against the directory: /.../SLUG/ it is.
            await _redirect(scope, send, parsed.prefix + "/" + (f"?{query}" if query else ""))
            return
        actor: Actor | None = None
        presented = presented_token(headers)
        if presented is not None:
            token, from_cookie = presented
            if from_cookie and scope["type"] == "websocket":
                origin = headers.get("origin")
                if origin is not None and origin != apps.access_origin:
                    await _answer(scope, send, 403, "cross-origin WebSocket refused", "forbidden")
                    return
            client = scope.get("client")
            actor = await apps.actor_for_token(token, client[0] if client else None)
        resolved = await apps.resolve(parsed.address)
        if resolved is None or not apps.allowed(actor, resolved, by_path=True):
            if actor is None:
                await _answer(
                    scope, send, 401, "sign in first (at this site's login page)", "unauthenticated"
                )
            else:
                await _answer(
                    scope, send, 404, "app not found (or you may not open it)", "app_not_found"
                )
            return
        target = resolved.target.base_path + parsed.rest + (f"?{query}" if query else "")
        await self._proxy(
            scope, receive, send, resolved, actor, target, host, parsed.prefix, "path"
        )

    async def _proxy(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        resolved: ResolvedApp,
        actor: Actor | None,
        target: str,
        host: str,
        prefix: str | None,
        via: str,
    ) -> None:
        apps = self.apps
        headers = Headers(scope=scope)
        client = scope.get("client")
        info = ClientInfo(client[0] if client else None, headers.get("user-agent"))
        session = await apps.session(actor, info, resolved, via=via)
        forwarded = forwarded_headers(scope, host=host, prefix=prefix)
        try:
            if scope["type"] == "http":
                await self._exchange(scope, receive, send, resolved, target, forwarded, session)
                return
            connect = await receive()
            if connect["type"] != "websocket.connect":
                return
            agent_ws, pending = await apps.dial(resolved)
            stream = AgentStream(agent_ws, pending, session.counters)
        finally:
            session.last_used = time.monotonic()
        try:
            ws = new_client_websocket()
            try:
                upgrade = await open_websocket(
                    stream,
                    ws,
                    host=host,
                    target=target,
                    subprotocols=list(scope.get("subprotocols") or []),
                    headers=[(n, v) for n, v in forwarded if n not in _WS_HANDSHAKE],
                )
            except AppUnreachable:
                await send({"type": "websocket.close", "code": 1011})
                return
            if not upgrade.accepted:
                await send({"type": "websocket.close", "code": 1008})
                return
            accept: dict[str, Any] = {"type": "websocket.accept"}
            if upgrade.subprotocol:
                accept["subprotocol"] = upgrade.subprotocol
            await send(accept)
            await relay_websocket(receive, send, stream, ws, upgrade)
        finally:
            await stream.close()
            session.last_used = time.monotonic()

    async def _exchange(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        resolved: ResolvedApp,
        target: str,
        forwarded: list[tuple[bytes, bytes]],
        session: AppSession,
    ) -> None:
        """One HTTP exchange on a kept-alive stream; a request without a body
        is tried once more on a new stream when a reused one turns out closed."""
        apps = self.apps
        has_body = any(n in (b"content-length", b"transfer-encoding") for n, _ in forwarded)
        for attempt in (1, 2):
            lease = await apps.lease(resolved, fresh=attempt > 1)
            lease.stream.counters = session.counters
            kept = False
            try:
                kept = await proxy_http(
                    scope,
                    receive if attempt == 1 else _no_body,
                    send,
                    lease.stream,
                    target.encode("latin-1"),
                    forwarded,
                    conn=lease.conn,
                    blocked_cookies=_STRIPPED_COOKIES,
                )
                return
            except AppUnreachable as exc:
                if lease.reused and not has_body and attempt == 1:
                    continue
                message = f"{resolved.address.label}: {exc}"
                await _answer(scope, send, 502, message, "app_unreachable")
                return
            finally:
                lease.stream.counters = Counters()
                if not (kept and apps.pool.release(lease)):
                    await lease.stream.close()


async def _no_body() -> Message:
    """The request of a retried exchange: it had no body (already read once)."""
    return {"type": "http.request", "body": b"", "more_body": False}


def _raw_path(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if raw:
        return str(raw.decode("latin-1")).split("?", 1)[0]
    return str(scope["path"])
