"""Workspace apps through a real server and a real agent process: the app
proxy by path and by subdomain (bodies streamed both ways, chunked
responses, WebSockets), share levels, the subdomain app-token cookie flow,
health checks, and bad inputs.

The "workspace" is the test machine itself (as in test_tunnel): a tiny
HTTP + WebSocket app (raw ASGI on uvicorn) listens on loopback and the agent
reaches it there. Subdomain hosts are under *.apps.localhost and are never
resolved: requests go to 127.0.0.1 with the Host header set."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from stockade.devtools.ports import free_port
from stockade.sdk import Client, types
from stockade.sdk.client import ApiError
from stockade.sdk.templates import ManifestError, build_archive, parse_manifest
from tests.agents import agent_workspace
from tests.conftest import OWNER_PASSWORD, ServerFactory

SQLITE_ONLY = "the app proxy works beyond the database; its records are plain inserts"

WILDCARD = "*.apps.localhost"

APP_SOURCE = r"""
import json

CHUNK = bytes(range(256)) * 256  # 64 KiB


async def app(scope, receive, send):
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        offered = scope.get("subprotocols") or []
        await send({"type": "websocket.accept", "subprotocol": offered[0] if offered else None})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": "echo:" + message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message["bytes"]})
    if scope["type"] != "http":
        return
    path = scope["path"]
    if path == "/health":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    elif path == "/echo":
        # Answers at once and streams the body back as it arrives.
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")]})
        while True:
            message = await receive()
            body = message.get("body", b"")
            if body:
                await send({"type": "http.response.body", "body": body, "more_body": True})
            if not message.get("more_body"):
                break
        await send({"type": "http.response.body", "body": b""})
    elif path == "/big":
        size = int(scope["query_string"].decode().split("=")[1])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        sent = 0
        while sent < size:
            piece = CHUNK[: min(len(CHUNK), size - sent)]
            sent += len(piece)
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    else:
        while (await receive()).get("more_body"):
            pass
        info = {
            "method": scope["method"],
            "path": scope["path"],
            "raw_path": scope["raw_path"].decode(),
            "query": scope["query_string"].decode(),
            "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
            "client_port": scope["client"][1],
        }
        body = json.dumps(info).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"set-cookie", b"appcookie=1; Path=/"),
                                (b"set-cookie", b"stockade_session=planted; Path=/")]})
        await send({"type": "http.response.body", "body": body})
"""


def template(app_port: int, closed_port: int) -> str:
    return f"""\
name: t
backend: local
apps:
  - slug: web
    display_name: Web
    port: {app_port}
    health_check: {{url: /health, interval: 1, threshold: 2}}
  - slug: shared
    url: http://127.0.0.1:{app_port}/
    share: authenticated
  - slug: pub
    port: {app_port}
    share: public
    subdomain: false
  - slug: down
    port: {closed_port}
    health_check: {{url: /health, interval: 1, threshold: 2}}
"""


@dataclass
class Env:
    url: str
    port: int  # the server's
    owner: Client
    member: Client
    app_port: int

    def host(self, label: str) -> str:
        return f"{label}--w--owner.apps.localhost:{self.port}"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, follow_redirects=False, timeout=60)


def start_app(tmp_path: Path) -> tuple[int, subprocess.Popen[bytes]]:
    (tmp_path / "testapp.py").write_text(APP_SOURCE)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "testapp:app", "--app-dir", str(tmp_path),
         "--port", str(port), "--lifespan", "off", "--no-access-log", "--log-level", "warning",
         "--timeout-keep-alive", "1", "--no-proxy-headers"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return port, proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, "the test app did not start"
        time.sleep(0.05)


@pytest.fixture
def env(start_server: ServerFactory, tmp_path: Path) -> Iterator[Env]:
    app_port, app = start_app(tmp_path)
    server = start_server(
        env={
            "STOCKADE_PROVISIONER_WORKERS": "0",
            "STOCKADE_WILDCARD_ACCESS_URL": WILDCARD,
            "STOCKADE_MAX_APP_SHARE_LEVEL": "public",
        }
    )
    owner = Client(server.url)
    owner.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    owner.login("owner", OWNER_PASSWORD)
    owner.create_user("alice", "alice@example.com", OWNER_PASSWORD)
    member = Client(server.url)
    member.login("alice", OWNER_PASSWORD)
    try:
        with agent_workspace(server.url, owner, template(app_port, free_port()), tmp_path / "home"):
            port = int(server.url.rsplit(":", 1)[1])
            yield Env(server.url, port, owner, member, app_port)
    finally:
        app.kill()
        app.wait()
        if app.stderr:
            app.stderr.close()
        owner.close()
        member.close()


def bearer(client: Client) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.token}"}


def session_cookie(client: Client) -> dict[str, str]:
    return {"Cookie": f"stockade_session={client.token}"}


def sign_in_to_app(env: Env, client: Client, label: str, path: str = "/info") -> str:
    """The subdomain flow as a browser follows it; returns the app cookie."""
    host = env.host(label)
    with env.http() as http:
        first = http.get(path, headers={"Host": host})
        assert first.status_code == 303, first.text
        authorize = first.headers["location"]
        assert authorize.startswith(f"{env.url}/api/v2/applications/authorize?redirect_uri=")
        back = http.get(authorize, headers=session_cookie(client))
        assert back.status_code == 303, back.text
        location = back.headers["location"]
        assert location.startswith(f"http://{host}{path}?stockade_app_token=")
        token_path = location.removeprefix(f"http://{host}")
        traded = http.get(token_path, headers={"Host": host})
        assert traded.status_code == 303, traded.text
        assert traded.headers["location"] == path
        cookie = traded.headers["set-cookie"]
        attributes = [part.strip().lower() for part in cookie.split(";")]
        assert "httponly" in attributes and "samesite=lax" in attributes and "path=/" in attributes
        assert not any(a.startswith("domain") for a in attributes)  # this one host only
        assert "secure" not in attributes  # plain http here
        # A redirect token is good once.
        again = http.get(token_path, headers={"Host": host})
        assert again.status_code == 400 and "invalid, used or expired" in again.json()["message"]
        return cookie.split(";", 1)[0].split("=", 1)[1]


def app_headers(response: httpx.Response) -> dict[str, str]:
    return dict(response.json()["headers"])


# --- path apps --------------------------------------------------------------------------


def test_path_app_streams_bodies_both_ways(env: Env) -> None:
    payload = bytes(range(251)) * 80_000  # ~20 MB
    chunks = [payload[i : i + 1_000_003] for i in range(0, len(payload), 1_000_003)]
    with env.http() as http:
        # The upload is chunked (no length) and the app answers while it arrives.
        digest = hashlib.sha256()
        total = 0
        with http.stream(
            "POST", "/@owner/w/apps/web/echo", content=iter(chunks), headers=bearer(env.owner)
        ) as response:
            assert response.status_code == 200
            for part in response.iter_bytes():
                digest.update(part)
                total += len(part)
        assert total == len(payload) and digest.digest() == hashlib.sha256(payload).digest()

        # A chunked download (the app sends no length), streamed.
        with http.stream(
            "GET", "/@owner/w/apps/web/big?n=30000000", headers=bearer(env.owner)
        ) as response:
            assert response.status_code == 200
            assert response.headers.get("transfer-encoding") == "chunked"
            assert sum(len(p) for p in response.iter_bytes()) == 30_000_000

        # The prefix is stripped; the app learns it from X-Forwarded-Prefix.
        info = http.get(
            "/@owner/w/apps/web/some/path%20x?a=1&b=2",
            headers={**bearer(env.owner), "Cookie": "mine=1", "X-Forwarded-For": "6.6.6.6"},
        )
        assert info.status_code == 200, info.text
        seen = info.json()
        assert seen["raw_path"] == "/some/path%20x" and seen["query"] == "a=1&b=2"
        headers = app_headers(info)
        assert headers["x-forwarded-prefix"] == "/@owner/w/apps/web"
        assert headers["x-forwarded-for"] == "127.0.0.1"  # the client's own is not believed
        assert headers["x-forwarded-proto"] == "http"
        assert headers["cookie"] == "mine=1"
        assert "authorization" not in headers  # the Stockade token stays here
        # The app's own cookie passes; one named like Stockade's never does.
        assert info.headers.get_list("set-cookie") == ["appcookie=1; Path=/"]

        # The session cookie works for the owner and never reaches the app.
        by_cookie = http.get(
            "/@owner/w/apps/web/info",
            headers={"Cookie": f"a=1; stockade_session={env.owner.token}; b=2"},
        )
        assert by_cookie.status_code == 200
        assert app_headers(by_cookie)["cookie"] == "a=1; b=2"

        # The bare prefix redirects to the directory, so relative links work.
        bare = http.get("/@owner/w/apps/web?x=1", headers=bearer(env.owner))
        assert bare.status_code == 303 and bare.headers["location"] == "/@owner/w/apps/web/?x=1"

        # Ports by path: the owner's.
        port = http.get(f"/@owner/w/ports/{env.app_port}/info", headers=bearer(env.owner))
        assert port.status_code == 200 and port.json()["path"] == "/info"


def test_streams_to_an_app_are_kept_alive_and_renewed(env: Env) -> None:
    with env.http() as http:

        def client_port() -> int:
            response = http.get("/@owner/w/apps/web/info", headers=bearer(env.owner))
            assert response.status_code == 200, response.text
            return int(response.json()["client_port"])

        # One connection from the agent to the app carries request after request...
        first = client_port()
        assert [client_port() for _ in range(5)] == [first] * 5
        # ...until the app closes it (its keep-alive timeout is 1 s here):
        # the next request goes on a new one, without an error.
        time.sleep(2.5)
        assert client_port() != first


def test_websockets_through_path_and_subdomain(env: Env) -> None:
    cookie = sign_in_to_app(env, env.owner, "web")

    async def echo(url: str, headers: dict[str, str], origin: str | None) -> None:
        async with websockets.connect(
            url,
            # Never resolved: the connection goes to the server on loopback.
            host="127.0.0.1",
            port=env.port,
            additional_headers=headers,
            subprotocols=[websockets.Subprotocol("chat")],
            origin=websockets.Origin(origin) if origin else None,
            max_size=None,
            compression=None,
        ) as ws:
            assert ws.subprotocol == "chat"
            await ws.send("hello")
            assert await ws.recv() == "echo:hello"
            blob = bytes(range(256)) * 8192  # 2 MiB
            await ws.send(blob)
            assert await ws.recv() == blob

    path_url = env.url.replace("http://", "ws://") + "/@owner/w/apps/web/ws"
    asyncio.run(echo(path_url, bearer(env.owner), None))
    # From the dashboard's own pages, with the session cookie.
    asyncio.run(echo(path_url, session_cookie(env.owner), env.url))

    host = env.host("web")
    sub_url = f"ws://{host}/ws"
    asyncio.run(echo(sub_url, {"Cookie": f"stockade_app_token={cookie}"}, f"http://{host}"))

    async def refused(url: str, headers: dict[str, str], origin: str) -> int:
        with pytest.raises(InvalidStatus) as caught:
            async with websockets.connect(
                url,
                host="127.0.0.1",
                port=env.port,
                additional_headers=headers,
                origin=websockets.Origin(origin),
            ):
                pass
        return caught.value.response.status_code

    # Another origin may not ride the app cookie (a sibling app is same-site)
    # nor the session cookie.
    other = f"http://{env.host('pub')}"
    sub_headers = {"Cookie": f"stockade_app_token={cookie}"}
    assert asyncio.run(refused(sub_url, sub_headers, other)) == 403
    assert asyncio.run(refused(path_url, session_cookie(env.owner), other)) == 403


# --- subdomain apps and their tokens ----------------------------------------------------


def test_subdomain_cookie_flow(env: Env) -> None:
    cookie = sign_in_to_app(env, env.owner, "web")
    host = env.host("web")
    with env.http() as http:
        info = http.get(
            "/a/b?c=d",
            headers={
                "Host": host,
                "Cookie": f"stockade_app_token={cookie}; x=y; stockade_session={env.owner.token}",
            },
        )
        assert info.status_code == 200, info.text
        seen = info.json()
        assert seen["path"] == "/a/b" and seen["query"] == "c=d"  # the path as it is
        headers = app_headers(info)
        assert headers["cookie"] == "x=y"  # neither the app token nor the session
        assert headers["host"] == host and headers["x-forwarded-host"] == host
        assert "x-forwarded-prefix" not in headers

        # The cookie is for that one host: another app's host does not take it.
        elsewhere = http.get(
            "/info", headers={"Host": env.host("shared"), "Cookie": f"stockade_app_token={cookie}"}
        )
        assert (
            elsewhere.status_code == 303
            and "/applications/authorize" in elsewhere.headers["location"]
        )
        # A tampered cookie is no cookie.
        forged = cookie[:-2] + ("AA" if not cookie.endswith("AA") else "BB")
        tampered = http.get(
            "/info", headers={"Host": host, "Cookie": f"stockade_app_token={forged}"}
        )
        assert tampered.status_code == 303
        # Without a browser page to redirect, a non-GET is a clear 401.
        posted = http.post("/echo", headers={"Host": host}, content=b"x")
        assert posted.status_code == 401 and "sign in" in posted.json()["message"]

    # A sign-in link cannot be turned into a redirect to another site.
    with env.http() as http:
        back = http.get(
            "/api/v2/applications/authorize",
            params={"redirect_uri": f"http://{host}//evil.example/x"},
            headers=session_cookie(env.owner),
        )
        assert back.status_code == 303
        # An absolute URL on loopback: "//evil.example" must never become a host here.
        sent_to = env.url + back.headers["location"].removeprefix(f"http://{host}")
        assert httpx.URL(sent_to).host == "127.0.0.1"
        traded = http.get(sent_to, headers={"Host": host})
        assert traded.status_code == 303 and traded.headers["location"] == "/evil.example/x"

    # The audit log has one workspace.connect for the app session.
    entries = env.owner.list_audit(action="workspace.connect").entries
    app_entries = [e for e in entries if (e.details or {}).get("kind") == "app"]
    assert any((e.details or {}).get("target") == "web" for e in app_entries)
    connections = env.owner.workspace_connections("owner", "w")
    assert any(c.kind == "app" and c.target == "web" and c.username == "owner" for c in connections)


def test_share_levels(env: Env) -> None:
    with env.http() as http:
        # A member: the owner's app is hidden like a missing one.
        hidden = http.get(
            "/api/v2/applications/authorize",
            params={"redirect_uri": f"http://{env.host('web')}/"},
            headers=session_cookie(env.member),
        )
        missing = http.get(
            "/api/v2/applications/authorize",
            params={"redirect_uri": f"http://{env.host('nope')}/"},
            headers=session_cookie(env.member),
        )
        assert hidden.status_code == missing.status_code == 404
        assert hidden.json()["message"] == missing.json()["message"]
    # Refusals are audited too.
    refused = [
        e
        for e in env.owner.list_audit(action="workspace.connect").entries
        if e.status_code == 404 and e.username == "alice"
    ]
    assert {(e.details or {}).get("target") for e in refused} >= {"web", "nope"}
    # ...an authenticated app opens for any signed-in user...
    cookie = sign_in_to_app(env, env.member, "shared")
    with env.http() as http:
        shared = http.get(
            "/info", headers={"Host": env.host("shared"), "Cookie": f"stockade_app_token={cookie}"}
        )
        assert shared.status_code == 200
        # ...and a public one for anyone, signed in or not.
        public = http.get("/info", headers={"Host": env.host("pub")})
        assert public.status_code == 200
        anonymous = http.get("/info", headers={"Host": env.host("shared")})
        assert anonymous.status_code == 303

        # By path (the dashboard's origin) an app is the owner's alone, whatever its share.
        for slug in ("web", "shared", "pub"):
            by_member = http.get(f"/@owner/w/apps/{slug}/info", headers=bearer(env.member))
            assert by_member.status_code == 404, slug
        assert http.get("/@owner/w/apps/pub/info").status_code == 401
        port = http.get(f"/@owner/w/ports/{env.app_port}/info", headers=bearer(env.member))
        assert port.status_code == 404
        port_host = f"{env.app_port}--w--owner.apps.localhost:{env.port}"
        assert http.get("/info", headers={"Host": port_host}).status_code == 303
    # The owner's port by subdomain works after the sign-in.
    port_cookie = sign_in_to_app(env, env.owner, str(env.app_port))
    with env.http() as http:
        port_host = f"{env.app_port}--w--owner.apps.localhost:{env.port}"
        ok = http.get(
            "/info", headers={"Host": port_host, "Cookie": f"stockade_app_token={port_cookie}"}
        )
        assert ok.status_code == 200
    # The anonymous visit of the public app is an app session too.
    connections = env.owner.workspace_connections("owner", "w")
    assert any(c.target == "pub" and c.username is None for c in connections)
    assert any(c.kind == "port" and c.target == str(env.app_port) for c in connections)


def test_app_list_urls_and_health(env: Env) -> None:
    def apps() -> dict[str, types.WorkspaceApp]:
        response = env.owner.request("GET", "/api/v2/workspaces/owner/w/apps")
        listed = types.WorkspaceAppList.model_validate(response.json())
        return {app.slug: app for app in listed.apps}

    deadline = time.monotonic() + 30
    while True:
        found = apps()
        if found["web"].health == "healthy" and found["down"].health == "unhealthy":
            break
        assert time.monotonic() < deadline, found
        time.sleep(0.2)
    web, shared, pub = found["web"], found["shared"], found["pub"]
    assert web.subdomain_url == f"http://{env.host('web')}/" and web.url == web.subdomain_url
    assert web.path_url == f"{env.url}/@owner/w/apps/web/"
    assert pub.url == pub.path_url  # subdomain: false
    assert shared.health == "disabled" and shared.effective_share == "authenticated"
    assert pub.share == pub.effective_share == "public"
    # A member does not see the workspace at all.
    with pytest.raises(ApiError) as caught:
        env.member.request("GET", "/api/v2/workspaces/owner/w/apps")
    assert caught.value.status == 404


def test_bad_inputs_get_clear_4xx(env: Env) -> None:
    with env.http() as http:
        owner = session_cookie(env.owner)
        cases = [
            ("/api/v2/applications/authorize", {}, 400),
            ("/api/v2/applications/authorize", {"redirect_uri": "http://evil.example/"}, 400),
            ("/api/v2/applications/authorize", {"redirect_uri": "javascript:alert(1)"}, 400),
            ("/api/v2/applications/authorize", {"redirect_uri": "http://[::1/"}, 400),
            (
                "/api/v2/applications/authorize",
                {"redirect_uri": f"http://web--w--owner.apps.localhost:{env.port + 1}/"},
                400,
            ),
        ]
        for path, params, status in cases:
            response = http.get(path, params=params, headers=owner)
            assert response.status_code == status, (params, response.text)
            assert response.json()["message"]
        unauthenticated = http.get(
            "/api/v2/applications/authorize", params={"redirect_uri": f"http://{env.host('web')}/"}
        )
        assert unauthenticated.status_code == 401

        for path in (
            "/@owner/w/apps/NOPE/",
            "/@owner/w/ports/70000/",
            "/@owner/w/ports/0/",
            "/@owner/w/things/x/",
            "/@owner/w/apps/ghost/",
            "/@owner/ghost/apps/web/",
            "/@nobody/w/apps/web/",
        ):
            response = http.get(path, headers=bearer(env.owner))
            assert response.status_code == 404, path
            assert response.json()["message"]

        down = http.get("/@owner/w/apps/down/", headers=bearer(env.owner))
        assert down.status_code == 502 and "could not connect" in down.json()["message"]

        bad_token = http.get("/?stockade_app_token=abc.def", headers={"Host": env.host("web")})
        assert bad_token.status_code == 400
        not_an_app = http.get("/", headers={"Host": f"a.b.apps.localhost:{env.port}"})
        assert not_an_app.status_code == 404


# --- templates and settings --------------------------------------------------------------


def test_app_manifest_fields() -> None:
    old = parse_manifest("name: t\nbackend: local\napps:\n  - slug: a\n    port: 80\n")
    assert old.apps[0].share == "owner" and old.apps[0].subdomain is True
    assert old.apps[0].health_check is None
    for bad, words in (
        ("  - slug: a--b\n    port: 80\n", "no '--'"),
        ("  - slug: '8080'\n    port: 80\n", "all digits"),
        ("  - slug: a\n    url: https://x/\n", "http://HOST"),
        ("  - slug: a\n    port: 80\n    share: world\n", "share"),
        ("  - slug: a\n    port: 80\n    health_check: {url: 'ftp://x'}\n", "health_check"),
    ):
        with pytest.raises(ManifestError) as caught:
            parse_manifest(f"name: t\nbackend: local\napps:\n{bad}")
        assert words in str(caught.value), (bad, str(caught.value))


def test_share_level_is_capped_and_subdomains_need_a_wildcard(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    server = start_server(env={"STOCKADE_PROVISIONER_WORKERS": "0"})
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    directory = tmp_path / "tpl"
    directory.mkdir()
    (directory / "stockade.yaml").write_text(template(free_port(), free_port()))
    client.push_template("t", build_archive(directory))
    client.create_workspace("w", "t")
    listed = types.WorkspaceAppList.model_validate(
        client.request("GET", "/api/v2/workspaces/me/w/apps").json()
    )
    pub = next(a for a in listed.apps if a.slug == "pub")
    assert pub.share == "public" and pub.effective_share == "owner"  # the default maximum
    web = next(a for a in listed.apps if a.slug == "web")
    assert web.subdomain_url is None and web.url == web.path_url
    with httpx.Client(base_url=server.url) as http:
        # Not running: a clear 502, not a hang.
        response = http.get("/@owner/w/apps/web/", headers=bearer(client))
        assert response.status_code == 502 and "not running" in response.json()["message"]
        # Without a wildcard no host is an app host; the API answers as usual.
        other = http.get("/healthz", headers={"Host": "web--w--owner.apps.localhost"})
        assert other.status_code == 200
        off = http.get(
            "/api/v2/applications/authorize",
            params={"redirect_uri": "http://web--w--owner.apps.localhost/"},
            headers=session_cookie(client),
        )
        assert off.status_code == 400 and "wildcard" in off.json()["message"]
    client.close()


def test_wildcard_setting_is_checked() -> None:
    from stockade.server.settings import Settings

    assert Settings(wildcard_access_url="*.Apps.Example.com:8443").wildcard_access_url == (
        "*.apps.example.com:8443"
    )
    with pytest.raises(ValueError, match="wildcard_access_url"):
        Settings(wildcard_access_url="apps.example.com")
    with pytest.raises(ValueError):
        Settings(max_app_share_level="everyone")
