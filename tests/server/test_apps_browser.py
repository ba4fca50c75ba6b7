"""code-server (the browser VS Code) through the app proxy, in headless
Chromium: the subdomain sign-in redirects, the workbench, and its WebSocket
to the server inside the workspace.

The "workspace" is the test machine (as in test_apps): code-server listens on
loopback and the agent reaches it there. Chromium maps *.apps.localhost to
127.0.0.1 itself (--host-resolver-rules), so nothing is ever resolved, and
every request the page makes is checked to stay on this deployment's hosts.

Needs Chromium and code-server: ``scripts/install-code-server.sh`` (CI runs
it; the npm install is cached in ~/.cache/stockade/code-server)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Request, Route, WebSocket, sync_playwright

from stockade.devtools.ports import free_port
from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from tests.agents import agent_workspace
from tests.conftest import OWNER_PASSWORD, RELAXED_LIMITS, require, stop_workspaces
from tests.server.web.conftest import CHROMIUM, CHROMIUM_ARGS

CACHE = Path(
    os.environ.get("STOCKADE_CACHE_DIR")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stockade"
)
CODE_SERVER = CACHE / "code-server" / "node_modules" / ".bin" / "code-server"
INSTALL = "run scripts/install-code-server.sh"


@pytest.fixture
def code_server(tmp_path: Path) -> Iterator[int]:
    require("code-server", CODE_SERVER.exists(), INSTALL)
    port = free_port()
    project = tmp_path / "project"
    project.mkdir()
    (project / "hello-from-the-workspace.txt").write_text("hello\n")
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path / "cs-home"),
        # No extension gallery: the page must not try to reach a marketplace.
        "EXTENSIONS_GALLERY": "{}",
    }
    proc = subprocess.Popen(
        [str(CODE_SERVER), "--auth", "none", "--disable-telemetry", "--disable-update-check",
         "--disable-workspace-trust", "--disable-getting-started-override",
         "--bind-addr", f"127.0.0.1:{port}", "--user-data-dir", str(tmp_path / "cs-data"),
         "--extensions-dir", str(tmp_path / "cs-ext"), str(project)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        # Its own process group: code-server forks an extension host that
        # outlives it when only the parent is told to stop.
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
            assert time.monotonic() < deadline, "code-server did not start"
            time.sleep(0.2)
        yield port
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group is left
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """One server on SQLite: the browser test runs once (the proxy's database
    use is covered on both databases by test_apps)."""
    proc = ServerProcess(
        data_dir=tmp_path / "server",
        env={
            **RELAXED_LIMITS,
            "STOCKADE_PROVISIONER_WORKERS": "0",
            "STOCKADE_WILDCARD_ACCESS_URL": "*.apps.localhost",
        },
    ).start()
    yield proc
    proc.stop()
    stop_workspaces(proc)


def test_code_server_in_chromium_through_a_subdomain_app(
    server: ServerProcess, tmp_path: Path, code_server: int
) -> None:
    require("Chromium", Path(CHROMIUM).exists(), "apt-get install chromium; " + INSTALL)
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    manifest = (
        f"name: t\nbackend: local\napps:\n  - slug: code\n    display_name: VS Code\n"
        f"    port: {code_server}\n    health_check: {{url: /healthz, interval: 1}}\n"
    )
    with agent_workspace(server.url, client, manifest, tmp_path / "home"):
        apps = client.request("GET", "/api/v2/workspaces/owner/w/apps").json()["apps"]
        url = apps[0]["url"]
        port = urlsplit(server.url).port
        assert url == f"http://code--w--owner.apps.localhost:{port}/"
        app_host = urlsplit(url).netloc
        dashboard_host = urlsplit(server.url).netloc
        requests: list[str] = []
        outside: list[str] = []
        sockets: list[str] = []
        closed_sockets: list[str] = []

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=[*CHROMIUM_ARGS, "--host-resolver-rules=MAP *.apps.localhost 127.0.0.1"],
            )
            context = browser.new_context()
            # Signed in to the dashboard: its session cookie, on its host only.
            context.add_cookies(
                [{"name": "stockade_session", "value": client.token or "", "url": server.url}]
            )

            def ours(url: str) -> bool:
                return url.startswith(("data:", "blob:")) or urlsplit(url).netloc in (
                    app_host,
                    dashboard_host,
                )

            def guard(route: Route) -> None:
                # Anything else is stopped before it leaves the machine.
                if ours(route.request.url):
                    route.continue_()
                else:
                    route.abort()

            def seen(request: Request) -> None:
                # Redirect hops too (routes see only each chain's first request).
                requests.append(request.url)
                if not ours(request.url):
                    outside.append(request.url)

            context.route("**/*", guard)
            context.on("request", seen)
            page = context.new_page()

            def on_socket(ws: WebSocket) -> None:
                sockets.append(ws.url)
                ws.on("close", lambda _: closed_sockets.append(ws.url))

            page.on("websocket", on_socket)
            page.goto(url, timeout=90_000)
            # The redirects went through the sign-in and back, and the app
            # cookie is the app host's alone.
            assert urlsplit(page.url).netloc == app_host and "stockade_app_token" not in page.url
            cookies = {(c["name"], c["domain"]) for c in context.cookies()}
            assert ("stockade_app_token", "code--w--owner.apps.localhost") in cookies
            assert all(
                not (name == "stockade_session" and domain != "127.0.0.1")
                for name, domain in cookies
            )
            page.wait_for_selector(".monaco-workbench", timeout=90_000)
            # The explorer lists the folder: read over the WebSocket to the
            # code-server inside the workspace.
            page.wait_for_selector("text=hello-from-the-workspace.txt", timeout=90_000)
            page.wait_for_timeout(2000)
            assert any(urlsplit(s).netloc == app_host for s in sockets), sockets
            assert not closed_sockets, closed_sockets
            assert page.locator("text=/reconnect/i").count() == 0
            browser.close()
        assert not outside, f"the page tried to leave the deployment: {outside[:5]}"
        assert any(urlsplit(r).netloc == dashboard_host for r in requests)  # the sign-in
        connections = client.workspace_connections("owner", "w")
        assert any(c.kind == "app" and c.target == "code" for c in connections), connections
    client.close()
