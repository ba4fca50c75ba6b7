"""The workspace pages: the list and its empty state, creation through the
form generated from a template's parameters (errors next to the field they
concern), a workspace's page and its actions, a build's page, the live
fragments, who may see what, and, in Chromium, a workspace followed live."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from html import unescape
from pathlib import Path

import httpx

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client, types
from stockade.sdk.templates import build_archive
from tests.builds import wait_for_agent, wait_for_build, workspace_lock
from tests.conftest import PASSWORD, UserFactory, unique
from tests.server.web.conftest import Chromium, WebClient

SQLITE_ONLY = "pages call the same services the API tests cover on both databases"

TEMPLATE = """\
name: {name}
backend: local
parameters:
  - name: greeting
    display_name: Greeting
    description: What the startup script says.
    type: string
    default: hello
    validation: {{regex: "^[a-z ]+$"}}
    mutable: true
  - name: cores
    type: number
    default: 1
    validation: {{min: 1, max: 4}}
  - name: region
    type: string
    options: [north, south]
    default: north
  - name: tools
    type: list(string)
    default: [git]
  - name: debug
    type: bool
    default: false
    mutable: true
compute:
  cpu: ${{cores}}
apps:
  - slug: notes
    display_name: Notes
    port: 8080
    subdomain: false
agent:
  startup_script: |
    echo "greeting is $STOCKADE_PARAMETER_GREETING"
"""
FINAL = {"running", "stopped", "failed", "canceled"}


def push(owner: Client, tmp_path: Path) -> str:
    name = unique("tpl")
    directory = tmp_path / name
    directory.mkdir()
    (directory / "stockade.yaml").write_text(TEMPLATE.format(name=name))
    owner.push_template(name, build_archive(directory))
    return name


def until(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def settled(client: Client, owner: str, name: str) -> types.Workspace:
    """The workspace once its latest build has ended."""
    box: list[types.Workspace] = []

    def done() -> bool:
        box[:] = [client.get_workspace(owner, name)]
        return box[0].status in FINAL

    until(done, f"{owner}/{name} to settle")
    return box[0]


def gone(client: Client, owner: str, name: str) -> bool:
    try:
        client.get_workspace(owner, name)
    except ApiError as exc:
        if exc.status == 404:
            return True
        raise
    return False


def field_error(html: str, field: str) -> str:
    """The message shown next to a form field."""
    found = re.search(rf'<p class="field-error" id="e-{re.escape(field)}">([^<]*)</p>', html)
    assert found, f"no error next to {field}"
    return unescape(found.group(1))


def signed_in(server: ServerProcess, username: str) -> WebClient:
    client = WebClient(server)
    client.login(username, PASSWORD)
    return client


def test_list_empty_state_then_a_create_button(
    server: ServerProcess, owner: Client, make_user: UserFactory, tmp_path: Path
) -> None:
    _, name = make_user()
    member = signed_in(server, name)
    try:
        page = member.get("/workspaces")
        assert page.status_code == 200
        assert "No workspaces yet" in page.text
        if not any(t.active_version for t in owner.list_templates().templates):
            # Nothing to build from: the page says how to push a template.
            assert "stockade templates push" in page.text
            push(owner, tmp_path)
            page = member.get("/workspaces")
        assert (
            '<a class="button primary" href="/workspaces/new">Create a workspace</a>' in page.text
        )
        # The member sees no owner column (only their own workspaces).
        assert "Owner</th>" not in page.text
    finally:
        member.close()


def test_create_through_the_generated_form(web: WebClient, owner: Client, tmp_path: Path) -> None:
    template = push(owner, tmp_path)
    chooser = web.get("/workspaces/new")
    assert chooser.status_code == 200
    assert f'href="/workspaces/new?template={template}"' in chooser.text

    form = web.get(f"/workspaces/new?template={template}")
    assert form.status_code == 200
    html = form.text
    # One field per parameter, each with a label and the widget its type wants.
    assert '<label for="f-param-greeting">Greeting' in html
    assert 'id="f-param-greeting" name="param-greeting"' in html and 'value="hello"' in html
    assert re.search(r'<input type="number" step="any" id="f-param-cores"[^>]* min="1.0"', html)
    assert '<option value="north" selected>north</option><option value="south">south</option>' in (
        re.sub(r">\s+<", "><", html)
    )
    assert re.search(r'<textarea id="f-param-tools"[^>]*>git</textarea>', html)
    assert 'type="checkbox" id="f-param-debug" name="param-debug" value="true"' in html
    assert "What the startup script says. Must match ^[a-z ]+$ (a regular expression)." in html
    assert "From 1 to 4." in html

    name = unique("ws")
    good = {
        "template": template,
        "name": name,
        "param-greeting": "good day",
        "param-cores": "2",
        "param-region": "south",
        "param-tools": "git\r\nvim\r\n",
        "param-debug": "true",
    }
    # Bad values are refused in place, next to the field, and create nothing.
    for bad, field, message in [
        ({"param-cores": "9"}, "param-cores", "9 is more than the maximum 4"),
        ({"param-cores": "two"}, "param-cores", "Must be a number"),
        ({"param-greeting": "Hi!"}, "param-greeting", "'Hi!' does not match the regex"),
        ({"param-region": "east"}, "param-region", "'east' is not one of the options"),
        ({"name": "Not_A_Name"}, "name", "A workspace name is 1-32 characters"),
        ({"name": "x" * 40}, "name", "A workspace name is 1-32 characters"),
    ]:
        refused = web.post("/workspaces/new", {**good, **bad})
        assert refused.status_code == 400, (bad, refused.text[:500])
        assert field_error(refused.text, field).startswith(message), bad
        assert 'role="alert" id="form-error"' in refused.text
        # What was typed is kept.
        assert f'value="{bad.get("name", name)}"' in refused.text
    assert not any(w.name == name for w in owner.list_workspaces().workspaces)

    created = web.post("/workspaces/new", good)
    assert created.status_code == 303, created.text[:500]
    assert created.headers["location"] == f"/workspaces/owner/{name}"
    ws = owner.get_workspace("owner", name)
    assert ws.parameters == {
        "greeting": "good day",
        "cores": 2,
        "region": "south",
        "tools": ["git", "vim"],
        "debug": True,
    }
    page = web.get(f"/workspaces/owner/{name}")
    assert page.status_code == 200
    assert "Creating owner/" in page.text  # the notice left by the redirect
    # The same name again: in place, on the name field, with the API's 409.
    again = web.post("/workspaces/new", good)
    assert again.status_code == 409
    assert field_error(again.text, "name").startswith("You already have a workspace")
    assert f'href="/workspaces/owner/{name}/builds/1"' in page.text
    assert 'id="build-log"' in page.text and "/static/js/workspaces.js" in page.text
    ws = settled(owner, "owner", name)
    assert ws.status == "running", ws.latest_build.error
    wait_for_agent(owner, "owner", name)
    page = web.get(f"/workspaces/owner/{name}")
    head = page.text.split('<div id="ws-head">', 1)[1].split('<div id="ws-body">', 1)[0]
    assert '<span class="badge s-running">running</span>' in head
    assert f'href="/workspaces/owner/{name}/terminal"' in head  # the agent is ready
    assert "greeting is good day" in page.text  # the startup script's output
    assert '<span class="badge s-ready">ready</span>' in page.text
    assert "<code>cores</code></dt><dd>2</dd>" in page.text
    # Its apps, each opening in a new tab at its URL.
    app_url = f"{web.server.url}/@owner/{name}/apps/notes/"
    assert f'href="{app_url}" target="_blank" rel="noopener">Open' in page.text

    build = web.get(f"/workspaces/owner/{name}/builds/1")
    assert build.status_code == 200
    assert '<span class="badge s-succeeded">succeeded</span>' in build.text
    assert '<span class="stage">==&gt; Preparing</span>' in build.text
    assert "the agent runs" in build.text
    assert 'data-follow="false"' in build.text  # nothing more to follow

    # The live fragment answers only what changed: everything for a poll
    # without digests, then 204 for one that has the current ones.
    live = web.http.get(f"/workspaces/owner/{name}/live", headers={"HX-Request": "true"})
    assert live.status_code == 200
    assert live.text.count('hx-swap-oob="true"') == 2
    poll = re.search(r'hx-get="([^"]+)"', live.text)
    assert poll
    again_live = web.http.get(unescape(poll.group(1)), headers={"HX-Request": "true"})
    assert again_live.status_code == 204

    # The list shows it, with its owner column and live status.
    listing = web.get(f"/workspaces?q={name}")
    assert f'<a href="/workspaces/owner/{name}" class="ws-name">{name}</a>' in listing.text
    assert "Owner</th>" in listing.text and "hx-trigger=" in listing.text
    assert "No workspace matches" in web.get("/workspaces?q=nothing-like-this").text
    owner.create_build("owner", name, "delete", cancel_running=True)


def test_actions_through_the_forms(
    web: WebClient, owner: Client, server: ServerProcess, tmp_path: Path
) -> None:
    template = push(owner, tmp_path)
    name = unique("ws")
    ws = owner.create_workspace(name, template)
    assert settled(owner, "owner", name).status == "running"
    url = f"/workspaces/owner/{name}"
    page = web.get(url)
    assert "This deletes the home directory" in page.text  # delete asks first

    # A form with a wrong token changes nothing.
    forged = web.post(f"{url}/builds", {"transition": "stop", "csrf_token": "forged"})
    assert forged.status_code == 403 and "This form has expired" in forged.text
    assert owner.get_workspace("owner", name).latest_build.number == 1
    bogus = web.post(f"{url}/builds", {"transition": "explode"})
    assert bogus.status_code == 400 and "There is no action" in bogus.text

    stopped = web.post(f"{url}/builds", {"transition": "stop"})
    assert stopped.status_code == 303 and stopped.headers["location"] == url
    assert "Stopping owner/" in web.get(url).text
    assert settled(owner, "owner", name).status == "stopped"

    # A start held in progress: another build is refused in place with the
    # API's 409, and the page offers to cancel it first.
    with workspace_lock(server.data_dir / "workspaces", ws.id):
        assert web.post(f"{url}/builds", {"transition": "start"}).status_code == 303
        wait_for_build(owner, "owner", name, 3)
        busy = web.post(f"{url}/builds", {"transition": "stop"})
        assert busy.status_code == 409
        assert "Build 3 (start) is still running: wait for it to end" in busy.text
        assert "Cancel build 3 and stop" in busy.text
        canceled = web.post(f"{url}/builds/3/cancel", {"back": "build"})
        assert canceled.status_code == 303
        assert canceled.headers["location"] == f"{url}/builds/3"
        assert "Build 3 is being canceled." in web.get(f"{url}/builds/3").text
        # The worker sees the cancel while it waits for the lock.
        assert wait_for_build(owner, "owner", name, 3, ("canceled",)).reason == "canceled"
    finished = web.post(f"{url}/builds/3/cancel")
    assert finished.status_code == 409 and "nothing to cancel" in finished.text
    assert web.post(f"{url}/builds", {"transition": "start"}).status_code == 303
    assert settled(owner, "owner", name).status == "running"

    # Mutable parameters change with a start build; the form has only those.
    page = web.get(url)
    assert 'id="f-param-greeting"' in page.text and 'id="f-param-cores"' not in page.text
    refused = web.post(f"{url}/builds", {"transition": "start", "param-greeting": "Bye!"})
    assert refused.status_code == 400
    assert field_error(refused.text, "param-greeting").startswith("'Bye!' does not match")
    assert '<details class="fold" open>' in refused.text  # the form opens on its error
    # A forged field of an immutable parameter: the service's sentence says which.
    refused = web.post(f"{url}/builds", {"transition": "restart", "param-cores": "3"})
    assert refused.status_code == 400
    assert "Parameter 'cores' is immutable" in unescape(refused.text)
    changed = web.post(
        f"{url}/builds",
        {"transition": "start", "param-greeting": "bye now", "param-debug": "true"},
    )
    assert changed.status_code == 303
    assert owner.get_workspace("owner", name).latest_build.number == 5
    assert settled(owner, "owner", name).status == "running"
    assert owner.get_workspace("owner", name).parameters == {
        "greeting": "bye now",
        "cores": 1,
        "region": "north",
        "tools": ["git"],
        "debug": True,
    }

    deleted = web.post(f"{url}/builds", {"transition": "delete"})
    assert deleted.status_code == 303 and "Deleting owner/" in web.get(url).text
    until(lambda: gone(owner, "owner", name), f"{name} to be deleted")
    assert web.get(url).status_code == 404
    # An htmx poll of a deleted workspace takes the browser to the list.
    poll = web.http.get(f"{url}/live", headers={"HX-Request": "true"})
    assert poll.status_code == 200 and poll.headers["hx-redirect"] == "/workspaces"
    # And one after the session ended, to the login page and back.
    with httpx.Client(base_url=server.url, trust_env=False) as anonymous:
        poll = anonymous.get(
            "/workspaces/rows",
            headers={"HX-Request": "true", "HX-Current-URL": f"{server.url}/workspaces"},
        )
        assert (
            poll.status_code == 200 and poll.headers["hx-redirect"] == "/login?next=%2Fworkspaces"
        )
        assert anonymous.get("/workspaces/rows").status_code == 303  # not htmx: the usual


def test_others_workspaces_are_not_found(
    web: WebClient, owner: Client, server: ServerProcess, make_user: UserFactory, tmp_path: Path
) -> None:
    template = push(owner, tmp_path)
    name = unique("ws")
    owner.create_workspace(name, template)
    _, member_name = make_user()
    member = signed_in(server, member_name)
    try:
        url = f"/workspaces/owner/{name}"
        for path in (url, f"{url}/builds/1", f"{url}/live"):
            page = member.get(path)
            assert page.status_code == 404, path
            assert "workspace not found" in page.text and "<h1>Not found</h1>" in page.text
        member.get("/workspaces")  # a page with a form: the member's CSRF token
        refused = member.post(f"{url}/builds", {"transition": "stop"})
        assert refused.status_code == 404
        assert member.post(f"{url}/builds/1/cancel").status_code == 404
        assert name not in member.get("/workspaces").text
        assert name in web.get("/workspaces").text
        # Malformed addresses are a clear 4xx page too.
        assert member.get(f"{url}/builds/zero").status_code == 400
        assert member.get(f"/workspaces/owner/{'x' * 33}").status_code == 400
        assert member.get("/workspaces/new?template=no-such-template").status_code == 404
    finally:
        member.close()
        owner.create_build("owner", name, "delete", cancel_running=True)


def test_a_workspace_followed_live_in_chromium(
    chromium: Chromium, owner: Client, server: ServerProcess, tmp_path: Path
) -> None:
    template = push(owner, tmp_path)
    page = chromium.page
    base = chromium.base_url
    name = unique("live")

    page.goto(f"{base}/workspaces/new?template={template}")
    page.fill("#f-name", name)
    page.fill("#f-param-greeting", "hi there")
    page.select_option("#f-param-region", "south")
    chromium.screenshot("workspaces-new")
    # A value the template refuses comes back in place, next to its field.
    page.fill("#f-param-greeting", "Hi there!")
    page.click("button[type=submit].primary")
    page.wait_for_selector("#e-param-greeting")
    assert "does not match the regex" in page.inner_text("#e-param-greeting")
    chromium.screenshot("workspaces-new-error")
    page.fill("#f-param-greeting", "hi there")
    page.click("button[type=submit].primary")
    page.wait_for_url(f"{base}/workspaces/owner/{name}")
    page.evaluate("window.stayed = true")  # gone if the page reloads
    # The head follows the build without a reload: running, then the agent
    # ready (the Terminal link appears).
    page.wait_for_selector("#ws-head .badge.s-running", timeout=60_000)
    page.wait_for_selector("#ws-head a[href$='/terminal']", timeout=60_000)
    page.wait_for_selector("#ws-body .badge.s-ready", timeout=30_000)
    assert page.evaluate("window.stayed") is True
    log = page.locator("#build-log pre.log")
    assert "the agent runs" in log.inner_text()

    # A restart held in progress: the log streams in as the build runs, and
    # the start that follows the stop becomes the log followed.
    ws = owner.get_workspace("owner", name)
    with workspace_lock(server.data_dir / "workspaces", ws.id):
        page.click("#ws-head button:text('Restart')")
        page.wait_for_url(f"{base}/workspaces/owner/{name}")
        page.evaluate("window.stayed = true")
        page.wait_for_selector("#ws-head .badge.s-stopping", timeout=30_000)
        assert page.locator("#build-log [data-role=number]").inner_text() == "2"
    # (Selectors, not wait_for_function: the CSP refuses the eval it needs.)
    page.wait_for_selector("#build-log [data-role=number]:text-is('3')", timeout=60_000)
    page.wait_for_selector("#build-log pre.log:has-text('the agent runs')", timeout=60_000)
    page.wait_for_selector("#build-log [data-role=status] .badge.s-succeeded", timeout=60_000)
    page.wait_for_selector("#ws-head .badge.s-running", timeout=30_000)
    page.wait_for_selector("#ws-body .badge.s-ready", timeout=30_000)
    assert page.evaluate("window.stayed") is True
    assert "==> " in log.inner_text()
    page.click("#parameters summary")  # the folded form of the mutable parameters
    page.wait_for_selector("#f-param-greeting")
    chromium.screenshot("workspaces-detail")

    page.click("#build-log [data-role=link]")
    page.wait_for_url(f"{base}/workspaces/owner/{name}/builds/3")
    page.wait_for_selector(".badge.s-succeeded")
    chromium.screenshot("workspaces-build")

    page.goto(f"{base}/workspaces")
    row = page.locator("tr", has=page.locator(f"a.ws-name:text-is('{name}')"))
    row.locator(".badge.s-ready").wait_for()
    chromium.screenshot("workspaces-list")
    # The list is live too: a delete from elsewhere shows, then the row goes.
    page.evaluate("window.stayed = true")
    owner.create_build("owner", name, "delete", cancel_running=True)
    row.wait_for(state="detached", timeout=60_000)
    assert page.evaluate("window.stayed") is True
