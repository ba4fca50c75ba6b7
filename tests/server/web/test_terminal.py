"""The web terminal page: xterm.js in headless Chromium on a real workspace's
reconnecting PTY (a local workspace built by the shared server's provisioner,
its agent a real process), through the tunnel WebSocket with the browser's
session cookie. Typing, a reload that resumes the same shell, a resize that
reaches the shell, a take-over by another tab, all under the CSP (the
``chromium`` fixture fails the test on any violation); and the page's refusals.

The commands print markers the shell computes (``$((6*7))``) so that the
terminal's echo of what was typed never matches them."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from playwright.sync_api import Page, WebSocketRoute

from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from stockade.sdk.templates import build_archive
from tests.builds import wait_for_agent, wait_for_build
from tests.conftest import PASSWORD, UserFactory, unique
from tests.server.web.conftest import Chromium, WebClient

SQLITE_ONLY = "pages call the same services the API tests cover on both databases"

TIMEOUT = 30.0
T = TypeVar("T")
FOREGROUND = "rgb(214, 221, 227)"  # the theme's, in static/js/terminal.js


class Workspaces:
    """The module's workspaces on the shared server: one running with a ready
    agent, one stopped."""

    def __init__(self, running: str, stopped: str) -> None:
        self.running = running
        self.stopped = stopped

    @staticmethod
    def page(name: str) -> str:
        return f"/workspaces/owner/{name}/terminal"


@pytest.fixture(scope="module")
def workspaces(
    server: ServerProcess, owner: Client, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Workspaces]:
    directory = tmp_path_factory.mktemp("terminal-template")
    template = unique("term-t")
    (directory / "stockade.yaml").write_text(f"name: {template}\nbackend: local\n")
    owner.push_template(template, build_archive(directory))
    running, stopped = unique("term"), unique("term-off")
    owner.create_workspace(running, template)
    owner.create_workspace(stopped, template)
    try:
        wait_for_build(owner, "owner", stopped, 1, ("succeeded",))
        owner.create_build("owner", stopped, "stop")
        ws = wait_for_agent(owner, "owner", running)
        assert ws.agent is not None and ws.agent.lifecycle_state == "ready", ws.agent
        wait_for_build(owner, "owner", stopped, 2, ("succeeded",))
        yield Workspaces(running, stopped)
    finally:
        for name in (running, stopped):
            owner.create_build("owner", name, "delete", cancel_running=True)


def poll(what: str, check: Callable[[], T | None]) -> T:
    """``check()``'s first truthy answer, within the deadline."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def screen(page: Page) -> list[str]:
    """The terminal's rows as rendered (the DOM renderer's text)."""
    return [
        row.replace("\xa0", " ").rstrip()
        for row in page.locator(".xterm-rows > div").all_inner_texts()
    ]


def wait_for_output(page: Page, pattern: str) -> str:
    """The first group of ``pattern`` (a regex) once a row of the screen matches it."""
    regex = re.compile(pattern)

    def check() -> str | None:
        for row in screen(page):
            found = regex.search(row)
            if found:
                return found.group(1) if found.groups() else found.group(0)
        return None

    try:
        return poll(f"{pattern!r} on the terminal", check)
    except AssertionError:
        raise AssertionError(f"no {pattern!r} on the terminal: {screen(page)}") from None


def run(page: Page, command: str) -> None:
    """Type ``command`` into the terminal and press Enter, as a person does."""
    page.locator(".xterm-helper-textarea").focus()
    page.keyboard.type(command)
    page.keyboard.press("Enter")


def wait_connected(page: Page) -> None:
    status = page.locator("#term-status")
    poll("the terminal to connect", lambda: status.get_attribute("data-state") == "connected")


def test_typing_reload_resize_and_take_over_in_chromium(
    chromium: Chromium, workspaces: Workspaces
) -> None:
    page = chromium.page
    response = page.goto(chromium.base_url + Workspaces.page(workspaces.running))
    assert response is not None and response.status == 200
    # The page put the terminal's id in its address, for a reload to find.
    session = poll(
        "?session= in the address", lambda: re.search(r"\?session=([0-9a-f]+)$", page.url)
    )[1]
    wait_connected(page)
    assert "Connected" in page.locator("#term-status").inner_text()

    run(page, "echo $((6*7))")
    wait_for_output(page, r"^42$")
    run(page, 'export STOCKADE_MARK=kept; echo "pid=$(($$+0))."')
    pid = wait_for_output(page, r"^pid=(\d+)\.$")
    # xterm drew with the theme it wrote as a style sheet, which the CSP shim
    # adopted (without it the text has the page's colour, dark on dark).
    colour = page.locator(".xterm-rows").evaluate("e => getComputedStyle(e).color")
    assert colour == FOREGROUND, colour
    run(page, "printf '\\033[38;2;255;100;0mtrue-colour %s\\033[0m\\n' $((7*6))")
    wait_for_output(page, r"^true-colour 42$")
    chromium.screenshot("terminal-page")
    span = page.locator(".xterm-rows span", has_text=re.compile(r"^true-colour 42$"))
    assert span.evaluate("e => getComputedStyle(e).color") == "rgb(255, 100, 0)"

    # From here the page's WebSocket goes through Playwright, to be cut below.
    sockets: list[WebSocketRoute] = []

    def relay(ws: WebSocketRoute) -> None:
        ws.connect_to_server()
        sockets.append(ws)

    page.route_web_socket(re.compile(r".*/tunnel\?kind=pty&.*"), relay)

    # A reload attaches to the same shell: its recent output is replayed and
    # what was set in it is still there.
    page.reload()
    assert page.url.endswith(f"?session={session}")
    wait_connected(page)
    wait_for_output(page, r"^true-colour 42$")
    run(page, 'echo "again=$(($$+0)) mark=$STOCKADE_MARK-$((1+1))."')
    assert wait_for_output(page, r"^again=(\d+ mark=\S+)\.$") == f"{pid} mark=kept-2"

    # The connection breaks (a server restart, say): the page says so and
    # comes back by itself to the same shell, its screen not shown twice.
    run(page, 'echo "before=$((4*4))"')
    wait_for_output(page, r"^before=16$")
    assert len(sockets) == 1
    sockets[0].close(code=1012, reason="restarting")
    status = page.locator("#term-status")
    poll("the page to notice", lambda: status.get_attribute("data-state") == "waiting")
    assert "Reconnecting in" in status.inner_text()
    wait_connected(page)
    assert len(sockets) == 2
    wait_for_output(page, r"^before=16$")
    assert screen(page).count("before=16") == 1
    run(page, 'echo "back=$(($$+0))."')
    assert wait_for_output(page, r"^back=(\d+)\.$") == pid

    # Back to the terminal's plain address in this tab (from the workspace's
    # page, say): the tab remembers its terminal.
    page.goto(chromium.base_url + Workspaces.page(workspaces.running))
    poll("the same terminal", lambda: page.url.endswith(f"?session={session}"))
    wait_connected(page)
    wait_for_output(page, r"^back=(\d+)\.$")

    # A smaller window: the fit add-on resizes the terminal and the shell sees it.
    run(page, 'echo "size=$(stty size)."')
    rows, cols = map(int, wait_for_output(page, r"^size=(\d+ \d+)\.$").split())
    assert rows == page.locator(".xterm-rows > div").count() and cols > 80
    page.set_viewport_size({"width": 800, "height": 520})
    poll("fewer rows", lambda: page.locator(".xterm-rows > div").count() < rows)
    run(page, "clear")
    run(page, 'echo "resized=$(stty size)."')
    new_rows, new_cols = map(int, wait_for_output(page, r"^resized=(\d+ \d+)\.$").split())
    assert new_rows == page.locator(".xterm-rows > div").count() < rows
    assert 40 < new_cols < cols

    # Another tab takes the terminal over; this one says so and stays off
    # (coming back by itself would steal it back, and so on).
    other = chromium.context.new_page()
    other.goto(page.url)
    wait_connected(other)
    poll("the take-over", lambda: status.get_attribute("data-state") == "taken")
    assert "another tab" in status.inner_text()
    assert page.locator("#term-action").inner_text() == "Use it here"
    run(other, 'echo "other=$(($$+0))."')
    assert wait_for_output(other, r"^other=(\d+)\.$") == pid
    assert status.get_attribute("data-state") == "taken"
    other.close()

    # A new terminal is another shell.
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(
        chromium.base_url + (page.locator("a", has_text="New terminal").get_attribute("href") or "")
    )
    wait_connected(page)
    assert page.url.rsplit("=", 1)[1] != session
    run(page, 'echo "new=$(($$+0))."')
    new_pid = wait_for_output(page, r"^new=(\d+)\.$")
    assert new_pid != pid

    # The shell exits: the page says so and Enter starts another.
    run(page, "exit")
    status = page.locator("#term-status")
    poll("the end of the shell", lambda: status.get_attribute("data-state") == "ended")
    assert "Press Enter to reconnect" in "\n".join(screen(page))
    page.keyboard.press("Enter")
    wait_connected(page)
    run(page, 'echo "after=$(($$+0))."')
    assert wait_for_output(page, r"^after=(\d+)\.$") not in (pid, new_pid)

    # No terminal for a stopped workspace: a message that says what to do.
    response = page.goto(chromium.base_url + Workspaces.page(workspaces.stopped))
    assert response is not None and response.status == 200
    assert "start it from its page" in page.locator(".term-unavailable").inner_text()
    assert page.locator(".xterm").count() == 0
    chromium.screenshot("terminal-stopped")

    response = page.goto(chromium.base_url + Workspaces.page("no-such-workspace"))
    assert response is not None and response.status == 404
    assert page.locator("h1").inner_text() == "Not found"


def test_terminal_page_refusals(
    web: WebClient, server: ServerProcess, workspaces: Workspaces, make_user: UserFactory
) -> None:
    page = web.get(Workspaces.page(workspaces.running))
    assert page.status_code == 200
    assert f'data-tunnel="/api/v2/workspaces/owner/{workspaces.running}/tunnel"' in page.text
    assert re.search(r'data-proposed="[0-9a-f]{16}"', page.text)
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "an inline script"
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', page.text)
    # The CSP shim runs before xterm creates its style elements.
    assert assets.index("/static/js/terminal-csp.js") < assets.index(
        "/static/vendor/xterm-6.0.0/xterm.js"
    )
    for asset in assets:
        assert web.http.get(asset).status_code == 200, asset
    kept = web.get(Workspaces.page(workspaces.running) + "?session=my-shell.1")
    assert 'data-session="my-shell.1"' in kept.text

    missing = web.get(Workspaces.page("no-such-workspace"))
    assert missing.status_code == 404 and "Not found" in missing.text
    for bad in ("a%20b", "x" * 65, "a/b", ""):
        refused = web.get(Workspaces.page(workspaces.running) + f"?session={bad}")
        assert refused.status_code == 400, (bad, refused.text)
        assert "1 to 64 letters" in refused.text
    long_name = web.get(Workspaces.page("w" * 40))
    assert long_name.status_code == 400 and "<h1>" in long_name.text

    stopped = web.get(Workspaces.page(workspaces.stopped))
    assert stopped.status_code == 200
    assert "is stopped, so it has no terminal" in stopped.text
    assert 'id="terminal"' not in stopped.text and "xterm.js" not in stopped.text

    # Someone else's workspace does not exist, as far as a member can tell.
    _, username = make_user()
    member = WebClient(server)
    try:
        member.login(username, PASSWORD)
        hidden = member.get(Workspaces.page(workspaces.running))
        assert hidden.status_code == 404 and "Not found" in hidden.text
        assert workspaces.running not in hidden.text
    finally:
        member.close()

    signed_out = WebClient(server)
    try:
        away = signed_out.http.get(Workspaces.page(workspaces.running))
        assert away.status_code == 303
        assert away.headers["location"].startswith("/login?next=%2Fworkspaces%2Fowner%2F")
    finally:
        signed_out.close()
