"""The admin pages: users (create, suspend, roles, password, tokens, delete),
the audit log (filters, paging, the chain's status, the export link) and the
deployment page (health, workers, settings with secrets masked); members are
refused on every one of them."""

from __future__ import annotations

import re
from html import unescape
from pathlib import Path

import pytest

from stockade.agent.protocol import PROTOCOL_VERSION
from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client
from stockade.server.settings import Settings
from stockade.server.system.service import effective_settings
from tests.agents import agent_workspace
from tests.conftest import (
    OWNER_PASSWORD,
    PASSWORD,
    ServerFactory,
    UserFactory,
    run_sql,
    unique,
)
from tests.server.web.conftest import Chromium, WebClient

SQLITE_ONLY = "pages call the same services the API tests cover on both databases"


TEMPLATE = """\
name: t
backend: local
"""


def _rows(html: str) -> list[str]:
    """The body rows of the first table in ``html``, as text."""
    body = html.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    rows = re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.DOTALL)
    return [unescape(re.sub(r"<[^>]+>", " ", row)) for row in rows]


def _audit_actions(html: str) -> list[str]:
    return re.findall(r'<a class="mono" href="/admin/audit\?action=[^"]*"[^>]*>([^<]+)</a>', html)


def test_create_user_through_the_form(web: WebClient, owner: Client) -> None:
    page = web.get("/admin/users")
    assert page.status_code == 200 and "New user" in page.text
    assert "owner@example.com" in page.text

    name = unique("new")
    form = {"username": name, "email": f"{name}@example.com", "name": "New Person",
            "password": PASSWORD, "roles": "template-admin"}  # fmt: skip
    # Bad input: an error in place, the right status, what was typed kept, nothing created.
    bad_name = web.post("/admin/users", {**form, "username": "Not Valid"})
    assert bad_name.status_code == 400
    assert 'aria-invalid="true"' in bad_name.text and 'id="e-username"' in bad_name.text
    assert f'value="{name}@example.com"' in bad_name.text
    weak = web.post("/admin/users", {**form, "password": "password"})
    assert weak.status_code == 400 and 'class="error"' in weak.text
    bad_role = web.post("/admin/users", {**form, "roles": "emperor"})
    assert bad_role.status_code == 400 and 'role="alert"' in bad_role.text
    too_long = web.post("/admin/users", {**form, "name": "x" * 500})
    assert too_long.status_code == 400 and 'id="e-name"' in too_long.text
    missing = web.post("/admin/users", {"username": name})
    assert missing.status_code == 400 and 'class="error"' in missing.text
    with pytest.raises(ApiError) as absent:
        owner.get_user(name)
    assert absent.value.status == 404

    created = web.post("/admin/users", form)
    assert created.status_code == 303 and created.headers["location"] == f"/admin/users/{name}"
    detail = web.get(created.headers["location"])
    assert detail.status_code == 200 and f"User {name} created" in detail.text
    user = owner.get_user(name)
    assert user.roles == ["template-admin"] and user.name == "New Person"
    with Client(web.server.url) as client:  # the password works
        client.login(name, PASSWORD)

    taken = web.post("/admin/users", form)
    assert taken.status_code == 409 and "already taken" in taken.text

    # Search narrows the list; paging keeps the search.
    found = web.get("/admin/users", params={"q": name})
    assert [r.split()[0] for r in _rows(found.text)] == [name]
    none = web.get("/admin/users", params={"q": "no-such-user-anywhere"})
    assert "No user matches this search" in none.text
    first = web.get("/admin/users", params={"limit": "1"})
    assert len(_rows(first.text)) == 1 and 'rel="next"' in first.text
    second = web.get("/admin/users", params={"limit": "1", "offset": "1"})
    assert _rows(second.text) != _rows(first.text) and 'rel="prev"' in second.text
    for bad in ({"offset": "abc"}, {"limit": "0"}, {"status": "gone"}, {"q": "x" * 200}):
        refused = web.get("/admin/users", params=bad)
        assert refused.status_code == 400 and "<html" in refused.text, bad
    assert web.get("/admin/users/no-such-user").status_code == 404


def test_suspend_activate_roles_password_tokens_delete(
    web: WebClient, owner: Client, make_user: UserFactory
) -> None:
    client, name = make_user()
    token = client.create_token("ci-token")
    base = f"/admin/users/{name}"
    page = web.get(base)
    assert page.status_code == 200 and "ci-token" in page.text

    suspended = web.post(f"{base}/suspend")
    assert suspended.status_code == 303
    assert "is suspended" in web.get(base).text
    assert owner.get_user(name).status == "suspended"
    with pytest.raises(ApiError) as refused:
        client.me()
    assert refused.value.status == 401
    assert web.post(f"{base}/activate").status_code == 303
    assert owner.get_user(name).status == "active"

    roles = web.post(f"{base}/roles", {"roles": "auditor"})
    assert roles.status_code == 303 and owner.get_user(name).roles == ["auditor"]
    web.get(base)
    bad_roles = web.post(f"{base}/roles", {"roles": "emperor"})
    assert bad_roles.status_code == 400 and owner.get_user(name).roles == ["auditor"]
    assert web.post(f"{base}/roles", {}).status_code == 303  # none: a plain member
    assert owner.get_user(name).roles == []

    # Refusals from the service show in place: the owner cannot suspend or demote themselves.
    web.get("/admin/users/owner")
    myself = web.post("/admin/users/owner/suspend")
    assert myself.status_code == 400 and "cannot suspend yourself" in myself.text
    own_roles = web.post("/admin/users/owner/roles", {"roles": "owner"})
    assert own_roles.status_code == 403 and "your own roles" in own_roles.text

    web.get(base)
    differ = web.post(f"{base}/password", {"password": "A-New-Pass-1234", "password_again": "x"})
    assert differ.status_code == 400 and "Type the same password twice." in differ.text
    reset = web.post(
        f"{base}/password", {"password": "A-New-Pass-1234", "password_again": "A-New-Pass-1234"}
    )
    assert reset.status_code == 303
    with Client(web.server.url) as again:
        again.login(name, "A-New-Pass-1234")

    web.get(base)
    assert web.post(f"{base}/tokens/{token.id}/delete").status_code == 303
    assert owner.list_tokens(name) == []
    gone = web.post(f"{base}/tokens/{token.id}/delete")
    assert gone.status_code == 404 and "No token" in gone.text

    deleted = web.post(f"{base}/delete")
    assert deleted.status_code == 303 and deleted.headers["location"] == "/admin/users"
    with pytest.raises(ApiError) as absent:
        owner.get_user(name)
    assert absent.value.status == 404


def test_a_user_admin_cannot_touch_an_owner(server: ServerProcess, make_user: UserFactory) -> None:
    _, admin = make_user("user-admin")
    _, boss = make_user("owner")
    page = WebClient(server)
    try:
        page.login(admin, PASSWORD)
        listing = page.get("/admin/users")
        assert listing.status_code == 200
        # Only the roles a user-admin may grant are offered when creating.
        assert 'value="template-admin"' in listing.text and 'value="owner"' not in listing.text
        page.get(f"/admin/users/{boss}")
        refused = page.post(f"/admin/users/{boss}/suspend")
        assert refused.status_code == 403 and "hold roles you cannot assign" in refused.text
        assert f"<h1>{boss}" in refused.text  # in place, on the user's page
    finally:
        page.close()


def test_audit_page_filters_pages_and_verifies(web: WebClient, make_user: UserFactory) -> None:
    _, name = make_user()
    web.get(f"/admin/users/{name}")
    web.post(f"/admin/users/{name}/suspend")
    web.post(f"/admin/users/{name}/activate")
    web.post(f"/admin/users/{name}/roles", {"roles": "auditor"})

    page = web.get("/admin/audit")
    assert page.status_code == 200
    assert 'id="chain"' in page.text and "Chain verified:" in page.text
    actions = _audit_actions(page.text)
    assert actions[:3] == ["user.roles", "user.activate", "user.suspend"]  # newest first

    # Filters narrow it: one user's entries, then one action.
    mine = web.get(
        "/admin/audit", params={"resource_type": "user", "resource_id": user_id_of(web, name)}
    )
    assert set(_audit_actions(mine.text)) == {
        "user.create", "user.login", "user.suspend", "user.activate", "user.roles"
    }  # fmt: skip
    suspends = web.get("/admin/audit", params={"action": "user.suspend", "actor": "owner"})
    assert set(_audit_actions(suspends.text)) == {"user.suspend"}
    assert "export?actor=owner&amp;action=user.suspend" in suspends.text
    export = web.http.get("/api/v2/audit/export", params={"action": "user.suspend"})
    assert export.status_code == 200 and '"action": "user.suspend"' in export.text
    since = web.get("/admin/audit", params={"since": "2999-01-01T00:00"})
    assert "No entry matches these filters" in since.text

    # Paging: one entry a page, the next page is the next older entry.
    first = web.get("/admin/audit", params={"actor": "owner", "limit": "1"})
    second = web.get("/admin/audit", params={"actor": "owner", "limit": "1", "offset": "1"})
    assert len(_audit_actions(first.text)) == len(_audit_actions(second.text)) == 1
    assert 'rel="next"' in first.text and "actor=owner" in first.text.split('rel="next"')[0]
    seqs = [re.search(r"<summary>#(\d+)", p.text) for p in (first, second)]
    assert seqs[0] and seqs[1] and int(seqs[0].group(1)) > int(seqs[1].group(1))

    # Bad filters: a clear 400 with the message in place.
    bad_time = web.get("/admin/audit", params={"since": "yesterday"})
    assert bad_time.status_code == 400 and 'id="e-since"' in bad_time.text
    backwards = web.get(
        "/admin/audit", params={"since": "2026-02-01T00:00", "until": "2026-01-01T00:00"}
    )
    assert backwards.status_code == 400 and "Since must be earlier than until" in backwards.text
    for bad in ({"action": "x" * 100}, {"until": "0001-01-01T00:00+01:00"}, {"limit": "5000"},
                {"offset": "-1"}):  # fmt: skip
        refused = web.get("/admin/audit", params=bad)
        assert refused.status_code == 400 and "<html" in refused.text, bad


def user_id_of(web: WebClient, name: str) -> str:
    """The id of ``name``, read off their admin page."""
    found = re.search(r"<dt>Id</dt><dd><code>([^<]+)</code>", web.get(f"/admin/users/{name}").text)
    assert found
    return found.group(1)


def test_deployment_page(
    start_server: ServerFactory, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Health, the provisionerd worker and key, the connected agent, and the
    settings: every one listed with its help, the secret audit key masked.
    Then a broken audit chain, on this server of its own."""
    secret = "audit-key-that-must-never-show-" + unique("k")
    server = start_server(env={"STOCKADE_AUDIT_KEY": secret, "STOCKADE_PROVISIONER_WORKERS": "0"})
    owner = Client(server.url)
    owner.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    owner.login("owner", OWNER_PASSWORD)
    web = WebClient(server)
    try:
        web.login("owner", OWNER_PASSWORD)
        with agent_workspace(server.url, owner, TEMPLATE, tmp_path / "home"):
            page = web.get("/admin/deployment")
        assert page.status_code == 200
        html = page.text
        assert secret not in html and secret[:12] not in html
        assert "••• set" in _section(html, 'id="setting-audit_key"', "</tr>")
        assert "sqlite" in html and "Schema revision" in html and "latest" in html
        assert "builds run on <code>stockade provisionerd</code> daemons only" in html

        agents = _rows(_section(html, 'id="agents"', "</section>"))
        assert len(agents) == 1
        assert agents[0].split()[:4] == ["w", "owner", "protocol", str(PROTOCOL_VERSION)]
        assert "ready" in agents[0]
        assert '<span class="count">1</span>' in html
        workers = _rows(_section(html, "Workers seen in the last 24 hours", "</table>"))
        assert [w.split()[:3] for w in workers] == [["w1", "provisionerd", "1"]]
        keys = _rows(_section(html, "<h3>Provisioner keys</h3>", "</table>"))
        assert len(keys) == 1 and keys[0].split()[0] == "test" and "connected" in keys[0]
        # Every setting is listed with its help text.
        text = unescape(html)
        for name, info in Settings.model_fields.items():
            assert f'id="setting-{name}"' in html, name
            assert (info.description or "")[:40] in text, name

        # The audit page says where the chain breaks when someone edits the log.
        run_sql(server, request, "UPDATE audit_log SET ip = '10.9.9.9' WHERE seq = 2")
        broken = _section(web.get("/admin/audit").text, 'id="chain"', "</div>")
        assert "Chain broken at entry 2:" in broken and "modified after it was written" in broken
    finally:
        web.close()
        owner.close()


def _section(html: str, start: str, end: str) -> str:
    """The part of ``html`` from ``start`` to the next ``end``."""
    assert start in html, start
    return html.split(start, 1)[1].split(end, 1)[0]


def test_settings_secrets_are_masked_by_rule() -> None:
    settings = Settings(
        audit_key="k" * 40,
        postgres_url="postgresql://stockade:hunter2-pw@db.internal:5432/stockade",
    )
    shown = {v.name: v for _, group in effective_settings(settings) for v in group}
    assert shown["audit_key"].value == "••• set" and shown["audit_key"].secret
    assert shown["postgres_url"].value == "postgresql://stockade:•••@db.internal:5432/stockade"
    # Numbers and paths named like secrets are not secrets.
    assert not shown["max_token_lifetime_seconds"].secret
    assert shown["max_token_lifetime_seconds"].hint == "30 d"
    assert all("hunter2" not in v.value and "kkkk" not in v.value for v in shown.values())
    unset = {v.name: v for _, group in effective_settings(Settings()) for v in group}
    assert unset["audit_key"].value == "not set" and not unset["audit_key"].is_set


def test_members_are_refused_everywhere(
    server: ServerProcess, owner: Client, make_user: UserFactory
) -> None:
    _, target = make_user("template-admin")
    _, member = make_user()
    web = WebClient(server)
    try:
        web.login(member, PASSWORD)
        for path in ("/admin/users", f"/admin/users/{target}", "/admin/audit",
                     "/admin/deployment", "/admin/egress"):  # fmt: skip
            page = web.get(path)
            assert page.status_code == 403 and "Not allowed" in page.text, path
        before = owner.list_users().count
        new = unique("sneak")
        posts = {
            "/admin/users": {"username": new, "email": f"{new}@example.com",
                             "password": PASSWORD, "roles": "owner"},
            f"/admin/users/{target}/suspend": {},
            f"/admin/users/{target}/roles": {"roles": "owner"},
            f"/admin/users/{target}/password": {"password": "Taken-Over-123",
                                                "password_again": "Taken-Over-123"},
            f"/admin/users/{target}/delete": {},
            f"/admin/users/{target}/tokens/x/delete": {},
        }  # fmt: skip
        for path, form in posts.items():
            response = web.post(path, form)
            assert response.status_code == 403 and "Not allowed" in response.text, path
        user = owner.get_user(target)
        assert user.status == "active" and user.roles == ["template-admin"]
        assert owner.list_users().count == before
        with Client(server.url) as client:
            client.login(target, PASSWORD)  # the password did not change
    finally:
        web.close()


def test_admin_pages_in_chromium(chromium: Chromium, make_user: UserFactory) -> None:
    _, name = make_user("auditor")
    page = chromium.page
    # Searched for: the shared server has more users than a page holds by now.
    page.goto(chromium.base_url + f"/admin/users?q={name}")
    page.get_by_role("link", name=name).wait_for()
    chromium.screenshot("admin-users")

    page.goto(chromium.base_url + f"/admin/users/{name}")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name=f"Suspend {name}").click()
    page.get_by_text("is suspended").first.wait_for()
    chromium.screenshot("admin-user")

    page.goto(chromium.base_url + "/admin/audit")
    page.get_by_text("Chain verified:").wait_for()
    page.locator("table.audit details summary").first.click()
    chromium.screenshot("admin-audit")

    page.goto(chromium.base_url + "/admin/deployment")
    page.get_by_role("heading", name="Effective settings").wait_for()
    chromium.screenshot("admin-deployment")
