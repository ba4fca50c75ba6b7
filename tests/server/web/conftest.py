"""Fixtures for the dashboard's tests: a signed-in HTML client (httpx, as a
browser posts forms) and a signed-in headless Chromium page that refuses any
request leaving the deployment and records CSP violations and script errors.

Screenshots go to ``test-artifacts/screenshots`` at the repository root (or
``$STOCKADE_TEST_ARTIFACTS/screenshots``)."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from html import unescape
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Request, Route, sync_playwright

from stockade.devtools.server import ServerProcess
from tests.conftest import OWNER_PASSWORD, require

CHROMIUM = "/usr/bin/chromium"
# As the brief says to run it as root, with nothing of its own reaching out.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(
    os.environ.get("STOCKADE_TEST_ARTIFACTS") or Path(__file__).parents[3] / "test-artifacts"
)
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    found = _CSRF.search(html)
    assert found, "the page has no form with a CSRF token"
    return unescape(found.group(1))


class WebClient:
    """A browser-like HTML client: the session cookie, the Origin header a
    browser sends with a form post, and the CSRF token read off the page."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.http = httpx.Client(
            base_url=server.url, timeout=30, trust_env=False, headers={"origin": server.url}
        )
        self.csrf = ""

    def get(self, path: str, **kwargs: object) -> httpx.Response:
        response = self.http.get(path, **kwargs)  # type: ignore[arg-type]
        if "csrf_token" in response.text:
            self.csrf = csrf_of(response.text)
        return response

    def post(
        self, path: str, data: dict[str, str] | None = None, *, csrf: bool = True
    ) -> httpx.Response:
        form = {**(data or {})}
        if csrf:
            form.setdefault("csrf_token", self.csrf)
        response = self.http.post(path, data=form)
        if "csrf_token" in response.text:
            self.csrf = csrf_of(response.text)
        return response

    def login(self, username: str, password: str) -> None:
        response = self.post("/login", {"username": username, "password": password}, csrf=False)
        assert response.status_code == 303, response.text
        self.get("/account")  # a page with a form: its CSRF token

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def web(server: ServerProcess, owner: object) -> Iterator[WebClient]:
    """The owner, signed in through the login form (a session of its own)."""
    client = WebClient(server)
    client.login("owner", OWNER_PASSWORD)
    yield client
    client.close()


@dataclass
class Watched:
    """What a page did that it must not: requests to other hosts, CSP
    violations, uncaught script errors."""

    outside: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def assert_clean(self) -> None:
        assert not self.outside, f"requests that left the deployment: {self.outside[:5]}"
        assert not self.problems, f"CSP violations or script errors: {self.problems[:5]}"


@dataclass
class Chromium:
    browser: Browser
    context: BrowserContext
    page: Page
    watched: Watched
    base_url: str

    def screenshot(self, name: str) -> Path:
        """Save a full-page screenshot to the test artifacts."""
        path = ARTIFACTS / "screenshots" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path

    def sign_in(self, username: str, password: str) -> None:
        self.page.goto(self.base_url + "/login")
        self.page.fill("#f-username", username)
        self.page.fill("#f-password", password)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(re.compile(r".*/workspaces.*"))


def watch(context: BrowserContext, base_url: str) -> Watched:
    """Abort and record every request to another host; record CSP violations
    and script errors of every page of ``context``."""
    watched = Watched()
    host = urlsplit(base_url).netloc

    def ours(url: str) -> bool:
        return url.startswith(("data:", "blob:")) or urlsplit(url).netloc == host

    def guard(route: Route) -> None:
        if ours(route.request.url):
            route.continue_()
        else:
            route.abort()

    def seen(request: Request) -> None:
        if not ours(request.url):
            watched.outside.append(request.url)

    def on_page(page: Page) -> None:
        page.on("pageerror", lambda exc: watched.problems.append(f"{page.url}: {exc}"))
        page.on(
            "console",
            lambda msg: (
                watched.problems.append(f"{page.url}: {msg.text}")
                if "Content Security Policy" in msg.text
                or (msg.type == "error" and "Refused" in msg.text)
                else None
            ),
        )

    context.route("**/*", guard)
    context.on("request", seen)
    context.on("page", on_page)
    return watched


@pytest.fixture
def chromium(server: ServerProcess, owner: object) -> Iterator[Chromium]:
    """Headless Chromium signed in as the owner, watched (see ``Watched``);
    the test fails at teardown if the page did what it must not."""
    require("Chromium", Path(CHROMIUM).exists(), "apt-get install chromium")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        watched = watch(context, server.url)
        page = context.new_page()
        session = Chromium(browser, context, page, watched, server.url)
        session.sign_in("owner", OWNER_PASSWORD)
        yield session
        browser.close()
    watched.assert_clean()
