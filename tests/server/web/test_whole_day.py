"""A developer's and an admin's whole day in the browser, on a new server,
without the CLI: first-user setup, a user made on the users page, sign-in,
a workspace created from the template's form and watched until its agent is
ready, a command in the web terminal, the workspace's app opened, the
workspace stopped, and all of it found on the audit page.

Only the template comes from outside the browser: a platform team pushes it
with the CLI (here its SDK), as the templates page tells them to. The
workspace is a real local (bubblewrap) one; its startup script serves the
app with Python's http.server on a free loopback port."""

from __future__ import annotations

import re
from pathlib import Path

from playwright.sync_api import Page, sync_playwright

from stockade.devtools.ports import free_port
from stockade.sdk import Client
from stockade.sdk.templates import build_archive
from tests.conftest import OWNER_PASSWORD, PASSWORD, ServerFactory, require
from tests.server.web.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, watch
from tests.server.web.test_terminal import poll, run, wait_connected, wait_for_output

SQLITE_ONLY = "pages call the same services the API tests cover on both databases"
MARK = "hello-from-the-workspace-app"


def template_dir(directory: Path, port: int) -> Path:
    directory.mkdir()
    (directory / "stockade.yaml").write_text(
        "name: starter\n"
        "display_name: Starter\n"
        "description: A shell and a small web app.\n"
        "backend: local\n"
        "parameters:\n"
        "  - name: greeting\n"
        "    type: string\n"
        "    default: hello\n"
        "    validation: {regex: '^[a-z]+$'}\n"
        "agent:\n"
        "  startup_script: |\n"
        '    mkdir -p "$HOME/site"\n'
        f"    echo '<h1>{MARK}</h1>' > \"$HOME/site/index.html\"\n"
        f'    nohup python3 -m http.server {port} --bind 127.0.0.1 --directory "$HOME/site"'
        " >/dev/null 2>&1 &\n"
        '    echo "startup says $STOCKADE_PARAMETER_GREETING"\n'
        "apps:\n"
        "  - slug: site\n"
        "    display_name: Site\n"
        f"    port: {port}\n"
        "    subdomain: false\n"
    )
    return directory


def shot(page: Page, name: str) -> None:
    path = ARTIFACTS / "screenshots" / f"day-{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)


def sign_in(page: Page, base: str, username: str, password: str) -> None:
    page.goto(base + "/login")
    page.fill("#f-username", username)
    page.fill("#f-password", password)
    page.click("button[type=submit]")
    page.wait_for_url(re.compile(r".*/workspaces$"))


def test_a_whole_day_in_the_browser(start_server: ServerFactory, tmp_path: Path) -> None:
    require("Chromium", Path(CHROMIUM).exists(), "apt-get install chromium")
    server = start_server()
    base = server.url
    port = free_port()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 800})
        watched = watch(context, base)
        page = context.new_page()

        # Morning, the admin: the first visit sets up the owner account.
        page.goto(base + "/")
        page.wait_for_url(re.compile(r".*/setup$"))
        page.fill("#f-username", "boss")
        page.fill("#f-email", "boss@example.com")
        page.fill("#f-password", OWNER_PASSWORD)
        page.fill("#f-password_again", OWNER_PASSWORD)
        page.click("button[type=submit]")
        page.wait_for_url(re.compile(r".*/login$"))
        sign_in(page, base, "boss", OWNER_PASSWORD)

        # ...and adds a developer on the users page.
        page.goto(base + "/admin/users")
        page.fill("#f-username", "dev")
        page.fill("#f-email", "dev@example.com")
        page.fill("#f-password", PASSWORD)
        page.click("text=Create user")
        page.wait_for_load_state()
        assert "dev@example.com" in page.content()

        # The platform team pushes a template with the CLI.
        with Client(base) as platform:
            platform.login("boss", OWNER_PASSWORD)
            platform.push_template(
                "starter", build_archive(template_dir(tmp_path / "starter", port))
            )
        page.click("text=Sign out")
        page.wait_for_url(re.compile(r".*/login$"))

        # The developer: no workspace yet, the page says what to do.
        sign_in(page, base, "dev", PASSWORD)
        assert "No workspaces yet" in page.content()
        shot(page, "1-empty-list")
        page.goto(base + "/workspaces/new")
        page.click("text=Use")
        page.wait_for_url(re.compile(r".*/workspaces/new\?template=starter$"))

        # A bad parameter is refused next to its field; nothing is created.
        page.fill("#f-name", "day")
        page.fill("#f-param-greeting", "Not Lowercase!")
        page.click("text=Create workspace")
        error = page.locator("#e-param-greeting")
        error.wait_for()
        shot(page, "2-create-form-error")
        page.fill("#f-param-greeting", "morning")
        page.click("text=Create workspace")
        page.wait_for_url(re.compile(r".*/workspaces/dev/day$"))

        # The page follows the build and the agent without a reload.
        poll("the agent to be ready", lambda: "ready" in page.locator("main").inner_text())
        terminal_link = page.locator("a", has_text="Terminal")
        terminal_link.wait_for()
        assert "startup says morning" in page.content()
        shot(page, "3-workspace-ready")

        # A command in the web terminal.
        terminal_link.click()
        page.wait_for_url(re.compile(r".*/workspaces/dev/day/terminal\?session=.*"))
        wait_connected(page)
        wait_for_output(page, r"^(\$)$")  # the prompt: typed-ahead keys would echo before it
        run(page, 'echo "sum=$((20+22)) user=$(whoami | wc -c)"')
        wait_for_output(page, r"^sum=42 user=\d+$")
        shot(page, "4-terminal")

        # The app, opened from the workspace page in a new tab.
        page.goto(base + "/workspaces/dev/day")
        open_app = page.locator("a", has_text="Open")
        poll("the app's Open button", lambda: open_app.count() > 0)
        with context.expect_page() as opened:
            open_app.first.click()
        app = opened.value
        app.wait_for_load_state()
        poll("the app's page", lambda: MARK in app.content())
        link = page.locator("code[id^=app-url-]").first.text_content() or ""
        assert link == f"{base}/@dev/day/apps/site/", link  # what Copy link copies
        shot(app, "5-app")
        app.close()

        # Evening: stop the workspace and watch it stop.
        page.click("button:has-text('Stop')")
        poll("the workspace to stop", lambda: "stopped" in page.locator("h1").inner_text())
        shot(page, "6-stopped")
        page.click("text=Sign out")

        # The auditor's view: all of it, on the audit page.
        sign_in(page, base, "boss", OWNER_PASSWORD)
        page.goto(base + "/admin/audit?actor=dev")
        table = page.locator("table").inner_text()
        for action in ("user.login", "workspace.create", "workspace.connect", "workspace.stop"):
            assert action in table, (action, table[:2000])
        page.goto(base + "/admin/audit?actor=dev&action=workspace.connect")
        kinds = page.locator("table").text_content() or ""
        assert "pty" in kinds and "app" in kinds, kinds[:2000]
        assert "Chain verified" in page.content()
        shot(page, "7-audit")
        browser.close()
    watched.assert_clean()
