"""Every API route x every role against one expected table.

The table below is the authorization contract. A new route without an entry
fails the suite, and so does an entry for a route that no longer exists, so
nobody can add an endpoint without deciding who may call it.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute

from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from stockade.server.app import create_app
from stockade.server.authz import policy_of
from stockade.server.settings import Settings
from tests.conftest import OWNER_PASSWORD, PASSWORD, UserFactory, unique

# Authorization is decided above the database: one walk (on SQLite) keeps CI
# inside its time budget; test_orgs.py runs the organization queries on both.
SQLITE_ONLY = "authorization is decided above the database"

# "member" is a plain member of the organization the walk's templates and
# workspaces belong to; "outsider" a plain user of the site who is not in it;
# "org-admin" administers that organization; "acl-admin" is a member whom the
# templates' ACLs make their admin.
ROLES = (
    "anonymous",
    "outsider",
    "member",
    "owner",
    "user-admin",
    "template-admin",
    "auditor",
    "org-admin",
    "acl-admin",
)

Route = tuple[str, str]


def row(
    anonymous: str,
    member: str,
    owner: str,
    user_admin: str,
    template_admin: str,
    auditor: str,
    *,
    outsider: str | None = None,
    org_admin: str | None = None,
    acl_admin: str | None = None,
) -> dict[str, str]:
    """One line of the table. The three organization columns hold no site
    role, so they answer as ``member`` unless the line says otherwise."""
    return {
        "anonymous": anonymous,
        "outsider": member if outsider is None else outsider,
        "member": member,
        "owner": owner,
        "user-admin": user_admin,
        "template-admin": template_admin,
        "auditor": auditor,
        "org-admin": member if org_admin is None else org_admin,
        "acl-admin": member if acl_admin is None else acl_admin,
    }


def public(answer: str) -> dict[str, str]:
    """A public route: every caller, signed in or not, gets the same answer,
    which is the route's own (not an authorization decision)."""
    return dict.fromkeys(ROLES, f"public {answer}")


# Template and workspace lines, by who sees the walk's organization.
TEMPLATE_READ = row("401", "ok", "ok", "ok", "ok", "ok", outsider="404")
TEMPLATE_ADMIN = row("401", "403", "ok", "403", "ok", "403",
                     outsider="404", org_admin="ok", acl_admin="ok")  # fmt: skip
# The workspace of another member: its owner, site owners and user-admins,
# and the organization's admins (who manage it but do not get into it).
WORKSPACE = row("401", "404", "ok", "ok", "404", "404", org_admin="ok")
# What only those who manage the organization may change.
ORG_MANAGE = row("401", "403", "ok", "ok", "403", "403", outsider="404", org_admin="ok")
ORG_READ = row("401", "ok", "ok", "ok", "ok", "ok", outsider="404")
BRIDGE_OFF = row("401", "404", "404", "404", "404", "404")

# Outcomes: "ok" is any 2xx; otherwise the status code. {user} is another,
# plain member; {token} is one of that member's API tokens. Denials on objects
# the caller may not even see are 404, exactly like a missing object.
# fmt: off
EXPECTED: dict[Route, dict[str, str]] = {
    #                                                anon   member owner u-adm  t-adm  auditor
    ("GET", "/api/v2/buildinfo"):                    public("ok"),
    ("GET", "/api/v2/users/first"):                  public("ok"),
    ("POST", "/api/v2/users/first"):                 public("409"),  # set up already
    ("POST", "/api/v2/users/login"):                 public("401"),  # wrong password
    ("GET", "/api/v2/users/authmethods"):            public("ok"),
    # SSO is not configured on the shared server.
    ("GET", "/api/v2/users/oidc/login"):             public("404"),
    ("GET", "/api/v2/users/oidc/callback"):          public("404"),
    ("POST", "/api/v2/users/logout"):                row("401", "ok", "ok", "ok", "ok", "ok"),
    ("GET", "/api/v2/users"):                        row("401", "403", "ok", "ok", "ok", "ok"),
    ("POST", "/api/v2/users"):                       row("401", "403", "ok", "ok", "403", "403"),
    ("GET", "/api/v2/users/{user}"):                 row("401", "404", "ok", "ok", "ok", "ok"),
    ("DELETE", "/api/v2/users/{user}"):              row("401", "403", "ok", "ok", "403", "403"),
    ("PUT", "/api/v2/users/{user}/status/suspend"):  row("401", "403", "ok", "ok", "403", "403"),
    ("PUT", "/api/v2/users/{user}/status/activate"): row("401", "403", "ok", "ok", "403", "403"),
    ("PUT", "/api/v2/users/{user}/roles"):           row("401", "403", "ok", "ok", "403", "403"),
    ("PUT", "/api/v2/users/{user}/password"):        row("401", "404", "ok", "ok", "403", "403"),
    ("GET", "/api/v2/users/{user}/tokens"):          row("401", "404", "ok", "ok", "404", "404"),
    ("POST", "/api/v2/users/{user}/tokens"):         row("401", "404", "ok", "403", "404", "404"),
    ("DELETE", "/api/v2/users/{user}/tokens/{token}"): row("401", "404", "ok", "ok", "404", "404"),
    ("GET", "/api/v2/audit"):                        row("401", "403", "ok", "403", "403", "ok"),
    ("GET", "/api/v2/audit/verify"):                 row("401", "403", "ok", "403", "403", "ok"),
    ("GET", "/api/v2/audit/export"):                 row("401", "403", "ok", "403", "403", "ok"),
    ("GET", "/api/v2/debug/health"):                 row("401", "403", "ok", "403", "403", "403"),
    ("GET", "/api/v2/deployment/egress"):            row("401", "403", "ok", "403", "403", "ok"),
    # Templates of the walk's organization: members use them (its everyone
    # group), site roles read all, admins are site owners and template-admins,
    # the organization's admins and the templates' ACL admins.
    ("GET", "/api/v2/templates"):                    row("401", "ok", "ok", "ok", "ok", "ok"),
    ("GET", "/api/v2/templates/{name}"):             TEMPLATE_READ,
    ("GET", "/api/v2/templates/{name}/versions"):    TEMPLATE_READ,
    # An outsider's push of the name would create a template in the default
    # organization, which only its admins may: 403, and nothing leaks.
    ("POST", "/api/v2/templates/{name}/versions"):   row("401", "403", "ok", "403", "ok", "403",
                                                         org_admin="ok", acl_admin="ok"),
    ("GET", "/api/v2/templates/{name}/versions/{number}/archive"): TEMPLATE_READ,
    ("PUT", "/api/v2/templates/{name}/active"):      TEMPLATE_ADMIN,
    ("POST", "/api/v2/templates/{name}/archive"):    TEMPLATE_ADMIN,
    # Reading an ACL is for its admins and the site roles that read every template.
    ("GET", "/api/v2/templates/{name}/acl"):         row("401", "403", "ok", "ok", "ok", "ok",
                                                         outsider="404", org_admin="ok",
                                                         acl_admin="ok"),
    ("PATCH", "/api/v2/templates/{name}/acl"):       TEMPLATE_ADMIN,
    # Workspaces of another member: members create their own (the body names
    # no owner) from a template they may use; user-admins and auditors only
    # read the template (403), an outsider does not see it (404).
    ("GET", "/api/v2/workspaces"):                   row("401", "ok", "ok", "ok", "ok", "ok"),
    ("POST", "/api/v2/workspaces"):                  row("401", "ok", "ok", "403", "ok", "403",
                                                         outsider="404"),
    ("GET", "/api/v2/workspaces/{owner}/{name}"):    WORKSPACE,
    ("GET", "/api/v2/workspaces/{owner}/{name}/builds"): WORKSPACE,
    ("POST", "/api/v2/workspaces/{owner}/{name}/builds"): WORKSPACE,
    ("GET", "/api/v2/workspaces/{owner}/{name}/builds/{number}"): WORKSPACE,
    ("POST", "/api/v2/workspaces/{owner}/{name}/builds/{number}/cancel"): WORKSPACE,
    ("GET", "/api/v2/workspaces/{owner}/{name}/logs"): WORKSPACE,
    ("GET", "/api/v2/workspaces/{owner}/{name}/agent/logs"): WORKSPACE,
    ("GET", "/api/v2/workspaces/{owner}/{name}/ssh"): WORKSPACE,
    ("GET", "/api/v2/workspaces/{owner}/{name}/connections"): WORKSPACE,
    ("GET", "/api/v2/workspaces/{owner}/{name}/apps"): WORKSPACE,
    # Any signed-in user reaches the app sign-in; it decides per app (the
    # shared server has no wildcard access URL, hence 400 for everyone).
    ("GET", "/api/v2/applications/authorize"):       row("401", "400", "400", "400", "400", "400"),
    ("GET", "/api/v2/agent/bundle.pyz"):             public("ok"),
    ("GET", "/api/v2/provisioner-keys"):             row("401", "403", "ok", "403", "403", "403"),
    ("POST", "/api/v2/provisioner-keys"):            row("401", "403", "ok", "403", "403", "403"),
    ("DELETE", "/api/v2/provisioner-keys/{name}"):   row("401", "403", "ok", "403", "403", "403"),
    # Organizations: every user lists their own; site owners create and
    # delete them (a new one has no members: 404 to everyone else without a
    # site-wide role); members read theirs; its admins and user-admins manage.
    ("GET", "/api/v2/organizations"):                row("401", "ok", "ok", "ok", "ok", "ok"),
    ("POST", "/api/v2/organizations"):               row("401", "403", "ok", "403", "403", "403"),
    ("GET", "/api/v2/organizations/{org}"):          ORG_READ,
    ("PATCH", "/api/v2/organizations/{org}"):        ORG_MANAGE,
    ("DELETE", "/api/v2/organizations/{org}"):       row("401", "404", "ok", "403", "403", "403"),
    ("GET", "/api/v2/organizations/{org}/members"):  ORG_READ,
    ("PUT", "/api/v2/organizations/{org}/members/{user}"): ORG_MANAGE,
    ("DELETE", "/api/v2/organizations/{org}/members/{user}"): ORG_MANAGE,
    ("GET", "/api/v2/organizations/{org}/groups"):   ORG_READ,
    ("POST", "/api/v2/organizations/{org}/groups"):  ORG_MANAGE,
    ("GET", "/api/v2/organizations/{org}/groups/{group}"): ORG_READ,
    ("PATCH", "/api/v2/organizations/{org}/groups/{group}"): ORG_MANAGE,
    ("DELETE", "/api/v2/organizations/{org}/groups/{group}"): ORG_MANAGE,
    # The AI bridge is not configured on the shared server: every signed-in
    # caller gets its 404 (tests/server/test_aibridge.py covers a configured one).
    ("POST", "/api/v2/aibridge/openai/v1/chat/completions"): BRIDGE_OFF,
    ("POST", "/api/v2/aibridge/openai/v1/responses"): BRIDGE_OFF,
    ("GET", "/api/v2/aibridge/openai/v1/models"):    BRIDGE_OFF,
    ("POST", "/api/v2/aibridge/anthropic/v1/messages"): BRIDGE_OFF,
    ("POST", "/api/v2/aibridge/anthropic/v1/messages/count_tokens"): BRIDGE_OFF,
    ("GET", "/api/v2/aibridge/anthropic/v1/models"): BRIDGE_OFF,
    # Everyone lists records: their own, or everyone's for owners and auditors.
    ("GET", "/api/v2/aibridge/interceptions"):       row("401", "ok", "ok", "ok", "ok", "ok"),
    ("GET", "/api/v2/aibridge/interceptions/export"): row("401", "ok", "ok", "ok", "ok", "ok"),
    ("GET", "/api/v2/aibridge/interceptions/{interception_id}"):
                                                     row("401", "404", "404", "404", "404", "404"),
    # The daemon protocol takes a provisioner key, never a user's credentials.
    ("POST", "/api/v2/provisionerd/acquire"):        row("401", "401", "401", "401", "401", "401"),
    ("POST", "/api/v2/provisionerd/egress"):         row("401", "401", "401", "401", "401", "401"),
    ("POST", "/api/v2/provisionerd/jobs/{build_id}/heartbeat"):
                                                     row("401", "401", "401", "401", "401", "401"),
    ("POST", "/api/v2/provisionerd/jobs/{build_id}/logs"):
                                                     row("401", "401", "401", "401", "401", "401"),
    ("GET", "/api/v2/provisionerd/jobs/{build_id}/archive"):
                                                     row("401", "401", "401", "401", "401", "401"),
    ("POST", "/api/v2/provisionerd/jobs/{build_id}/complete"):
                                                     row("401", "401", "401", "401", "401", "401"),
}
# fmt: on


def api_routes(tmp_path: Path) -> dict[Route, APIRoute]:
    app = create_app(Settings(data_dir=tmp_path))
    found: dict[Route, APIRoute] = {}
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path.startswith("/api/"):
            for method in (route.methods or set()) - {"HEAD"}:
                found[(method, route.path)] = route
    return found


def outcome(status: int) -> str:
    return "ok" if 200 <= status < 300 else str(status)


# --- the table itself ----------------------------------------------------------


def test_every_api_route_has_exactly_one_table_entry(tmp_path: Path) -> None:
    routes = set(api_routes(tmp_path))
    missing = sorted(routes - set(EXPECTED))
    stale = sorted(set(EXPECTED) - routes)
    assert not missing, (
        f"API routes with no entry in EXPECTED (decide who may call them): {missing}"
    )
    assert not stale, f"EXPECTED has entries for routes that no longer exist: {stale}"
    for route, expected in EXPECTED.items():
        assert set(expected) == set(ROLES), route


def test_table_agrees_with_the_declared_route_policies(tmp_path: Path) -> None:
    """A route is public in the table exactly when its policy is ``public()``;
    every other route refuses an anonymous caller with 401."""
    for key, route in api_routes(tmp_path).items():
        policy = policy_of(route)
        assert policy is not None, key
        expected = EXPECTED[key]
        is_public = all(v.startswith("public ") for v in expected.values())
        assert is_public == (policy.kind == "public"), (key, policy.kind)
        if not is_public:
            assert expected["anonymous"] == "401", key


# --- the walk ------------------------------------------------------------------


class Walk:
    """Sends one request per route x role with a valid body, so the answer is
    the authorization decision and not a validation error."""

    def __init__(
        self, http: httpx.Client, owner: Client, clients: dict[str, Client], names: dict[str, str]
    ) -> None:
        self.http = http
        self.owner = owner
        self.clients = clients
        self.names = names
        self.org = unique("org")
        owner.create_organization(self.org)
        self.target = self.new_user("target")
        owner.set_member(self.org, self.target)
        for role in ("member", "acl-admin"):
            owner.set_member(self.org, names[role])
        owner.set_member(self.org, names["org-admin"], ["org-admin"])
        self.group = owner.create_group(self.org, unique("grp")).name
        self.target_token = owner.create_token(unique("tok"), user=self.target).name
        self.template = self.new_template()
        # The fixture deletes the workspaces (a cancel may find their first
        # build already ended: see the table test).
        self.slow_template = self.new_template(startup="sleep 120")
        self.workspaces: list[str] = []
        self.workspace = self.new_workspace()

    def new_workspace(self) -> str:
        name = unique("ws")
        self.owner.create_workspace(name, self.slow_template, owner=self.target)
        self.workspaces.append(name)
        return name

    def new_template(self, startup: str = "") -> str:
        name = unique("tpl")
        self.owner.push_template(name, template_archive(name, startup), org=self.org)
        self.owner.update_template_acl(name, users={self.names["acl-admin"]: "admin"})
        return name

    def new_user(self, prefix: str = "victim") -> str:
        name = unique(prefix)
        self.owner.create_user(name, f"{name}@example.com", PASSWORD)
        return name

    def token_for(self, role: str) -> str | None:
        return None if role == "anonymous" else self.clients[role].token

    def fresh_session(self, role: str) -> str | None:
        """A session of its own, for requests that end the one they use."""
        if role == "anonymous":
            return None
        with Client(self.owner.url) as client:
            return client.login(self.names[role], PASSWORD).session_token

    def prepare(self, method: str, template: str, role: str) -> tuple[str, Any, str | None]:
        """(path, JSON body or None, bearer token) for one request."""
        token = self.token_for(role)
        destructive = method != "GET" and "{user}" in template
        user = self.new_user() if destructive else self.target
        path = template.replace("{user}", user)
        if "{token}" in template:
            name = self.owner.create_token(unique("tok"), user=user).name if destructive else ""
            path = path.replace("{token}", name or self.target_token)
        if "{owner}" in template:
            workspace = self.new_workspace() if method != "GET" else self.workspace
            path = template.replace("{owner}", self.target).replace("{name}", workspace)
            path = path.replace("{number}", "1")
        elif "{org}" in template:
            org = self.org
            if method == "DELETE" and template.endswith("{org}"):
                org = unique("org")  # an empty one, so that a delete may succeed
                self.owner.create_organization(org)
            elif method == "DELETE" and template.endswith("{user}"):
                self.owner.set_member(org, user)
            path = path.replace("{org}", org)
            group = self.group
            if method != "GET" and template.endswith("{group}"):
                group = self.owner.create_group(org, unique("grp")).name
            path = path.replace("{group}", group)
        elif template.startswith("/api/v2/provisioner-keys/"):
            name = unique("key")
            self.owner.create_provisioner_key(name)
            path = template.replace("{name}", name)
        elif "{build_id}" in template:
            path = template.replace("{build_id}", "00000000-0000-0000-0000-000000000000")
        elif "{interception_id}" in template:
            path = template.replace("{interception_id}", "00000000-0000-0000-0000-000000000000")
        elif "{name}" in template:
            name = self.new_template() if method != "GET" else self.template
            path = path.replace("{name}", name).replace("{number}", "1")
        body: Any = None
        key = (method, template)
        if key == ("POST", "/api/v2/users/first"):
            name = unique("first")
            body = {"username": name, "email": f"{name}@example.com", "password": OWNER_PASSWORD}
        elif key == ("POST", "/api/v2/users/login"):
            body = {"username": self.target, "password": "Wrong-Horse-99!"}
        elif key == ("POST", "/api/v2/users/logout"):
            token = self.fresh_session(role)
        elif key == ("POST", "/api/v2/users"):
            name = unique("new")
            body = {"username": name, "email": f"{name}@example.com", "password": PASSWORD}
        elif key == ("PUT", "/api/v2/users/{user}/roles"):
            body = {"roles": ["template-admin"]}
        elif key == ("PUT", "/api/v2/users/{user}/password"):
            body = {"password": "Fresh-Horse-93!"}
        elif key == ("POST", "/api/v2/users/{user}/tokens"):
            body = {"name": unique("tok"), "lifetime_seconds": 3600}
        elif key == ("POST", "/api/v2/templates/{name}/versions"):
            body = template_archive(path.split("/")[4])
        elif key == ("PUT", "/api/v2/templates/{name}/active"):
            body = {"version": 1}
        elif key == ("POST", "/api/v2/workspaces"):
            name = unique("ws")
            self.workspaces.append(name)
            body = {"name": name, "template": self.template}
        elif key == ("POST", "/api/v2/workspaces/{owner}/{name}/builds"):
            body = {"transition": "stop", "cancel_running": True}
        elif key == ("POST", "/api/v2/provisioner-keys"):
            body = {"name": unique("key")}
        elif key == ("PATCH", "/api/v2/templates/{name}/acl"):
            body = {"users": {}, "groups": {self.group: "use"}}
        elif key == ("POST", "/api/v2/organizations"):
            body = {"name": unique("org")}
        elif key == ("PATCH", "/api/v2/organizations/{org}"):
            body = {"display_name": "Renamed"}
        elif key == ("PUT", "/api/v2/organizations/{org}/members/{user}"):
            body = {"roles": []}
        elif key == ("POST", "/api/v2/organizations/{org}/groups"):
            body = {"name": unique("grp")}
        elif key == ("PATCH", "/api/v2/organizations/{org}/groups/{group}"):
            body = {"display_name": "Renamed"}
        elif key[1].startswith("/api/v2/aibridge/") and method == "POST":
            body = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        elif key == ("POST", "/api/v2/provisionerd/acquire"):
            body = {"worker_id": "w", "backends": ["local"]}
        elif key == ("POST", "/api/v2/provisionerd/egress"):
            body = {"daemon": "d", "records": []}
        elif key[1].startswith("/api/v2/provisionerd/jobs/"):
            body = (
                {"worker_id": "w", "status": "failed"}
                if key[1].endswith("complete")
                else {"worker_id": "w"}
            )
            if key[1].endswith("archive"):
                body, path = None, f"{path}?worker_id=w"
        return path, body, token

    def send(self, method: str, template: str, role: str) -> httpx.Response:
        path, body, token = self.prepare(method, template, role)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        if isinstance(body, bytes):
            headers["Content-Type"] = "application/gzip"
            return self.http.request(method, path, content=body, headers=headers)
        return self.http.request(method, path, json=body, headers=headers)


def template_archive(name: str, startup: str = "") -> bytes:
    manifest = f"name: {name}\nbackend: local\n".encode()
    if startup:
        manifest += f"agent:\n  startup_script: {startup}\n".encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("stockade.yaml")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
    return buffer.getvalue()


@pytest.fixture
def walk(owner: Client, make_user: UserFactory, server: ServerProcess) -> Iterator[Walk]:
    clients: dict[str, Client] = {}
    names: dict[str, str] = {}
    for role in ROLES[1:]:
        roles = (role,) if role in ("owner", "user-admin", "template-admin", "auditor") else ()
        clients[role], names[role] = make_user(*roles)
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        walk = Walk(http, owner, clients, names)
        yield walk
    for ws in owner.list_workspaces().workspaces:
        owner.create_build(ws.owner_name, ws.name, "delete", cancel_running=True)


def test_every_route_for_every_role_matches_the_table(walk: Walk, tmp_path: Path) -> None:
    mismatches: list[str] = []
    for method, template in sorted(api_routes(tmp_path), key=lambda r: (r[1], r[0])):
        expected_row = EXPECTED[(method, template)]
        for role in ROLES:
            response = walk.send(method, template, role)
            got = outcome(response.status_code)
            expected = expected_row[role].removeprefix("public ")
            if template.endswith("/cancel") and got == "409" and expected == "ok":
                # Authorized, but the build already ended: a start build ends
                # once the agent is launched, often before the cancel arrives.
                # That the 409 comes after the permission check is what counts.
                assert response.json().get("reason") == "build_finished", response.text
                got = "ok"
            if got != "ok" and response.headers.get("content-type", "").startswith("text/html"):
                # The SSO routes answer browsers with a page that says what went wrong.
                assert "<html" in response.text, (method, template, role)
            elif got != "ok":
                body = response.json()
                if template.startswith("/api/v2/aibridge/") and "error" in body:
                    # The bridge's provider routes answer in the provider's error format.
                    body = body["error"]
                assert isinstance(body.get("message"), str) and body["message"], (
                    method,
                    template,
                    role,
                    response.text,
                )
            if got != expected:
                mismatches.append(
                    f"{method} {template} as {role}: expected {expected}, got {got} "
                    f"({response.text[:200]})"
                )
    assert not mismatches, "authorization differs from the table:\n" + "\n".join(mismatches)


# --- object-level rules, spelled out ------------------------------------------------


def _bearer(client: Client) -> dict[str, str]:
    return {"Authorization": f"Bearer {client.token}"}


def test_user_admin_cannot_make_or_touch_an_owner(
    owner: Client, make_user: UserFactory, server: ServerProcess
) -> None:
    admin, _ = make_user("user-admin")
    other_owner_client, other_owner = make_user("owner")
    _, member = make_user()
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        h = _bearer(admin)
        grant = http.put(f"/api/v2/users/{member}/roles", json={"roles": ["owner"]}, headers=h)
        assert grant.status_code == 403, grant.text
        assert grant.json()["reason"] == "insufficient_role"
        assert "owner" in grant.json()["message"]
        assert owner.get_user(member).roles == []

        name = unique("mkowner")
        created = http.post(
            "/api/v2/users",
            json={
                "username": name,
                "email": f"{name}@example.com",
                "password": PASSWORD,
                "roles": ["owner"],
            },
            headers=h,
        )
        assert created.status_code == 403, created.text
        assert http.get(f"/api/v2/users/{name}", headers=_bearer(owner)).status_code == 404

        attempts: list[tuple[str, str, dict[str, Any] | None]] = [
            ("PUT", f"/api/v2/users/{other_owner}/status/suspend", None),
            ("PUT", f"/api/v2/users/{other_owner}/password", {"password": "Taken-Over-81!"}),
            ("PUT", f"/api/v2/users/{other_owner}/roles", {"roles": []}),
            ("DELETE", f"/api/v2/users/{other_owner}", None),
        ]
        for method, path, body in attempts:
            response = http.request(method, path, json=body, headers=h)
            assert response.status_code == 403, (method, path, response.text)
            assert response.json()["reason"] == "insufficient_role", (method, path)
        after = owner.get_user(other_owner)
        assert after.status == "active" and after.roles == ["owner"]
        assert other_owner_client.me().username == other_owner  # password unchanged: session on

        # What a user-admin may do still works.
        ok = http.put(
            f"/api/v2/users/{member}/roles", json={"roles": ["template-admin"]}, headers=h
        )
        assert ok.status_code == 200 and ok.json()["roles"] == ["template-admin"], ok.text


def test_user_admin_cannot_revoke_an_owners_tokens(
    owner: Client, make_user: UserFactory, server: ServerProcess
) -> None:
    """Revoking a token acts on its user, so the rule above applies: a
    user-admin may not act on an owner (ASSIGNABLE_BY in authz.py)."""
    admin, _ = make_user("user-admin")
    _, other_owner = make_user("owner")
    name = unique("ownertok")
    owner.create_token(name, user=other_owner)
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        response = http.delete(f"/api/v2/users/{other_owner}/tokens/{name}", headers=_bearer(admin))
    assert [t.name for t in owner.list_tokens(other_owner)] == [name], "the token was revoked"
    assert response.status_code == 403, response.text
    assert response.json()["reason"] == "insufficient_role"


def test_member_sees_other_users_things_as_not_found(
    make_user: UserFactory, owner: Client, server: ServerProcess
) -> None:
    member, _ = make_user()
    _, other = make_user()
    token = owner.create_token(unique("tok"), user=other).name
    ghost = unique("ghost")
    requests: list[tuple[str, str, Any]] = [
        ("GET", "/api/v2/users/{u}", None),
        ("GET", "/api/v2/users/{u}/tokens", None),
        ("POST", "/api/v2/users/{u}/tokens", {"name": "mine-now"}),
        ("DELETE", "/api/v2/users/{u}/tokens/" + token, None),
        ("PUT", "/api/v2/users/{u}/password", {"password": "Taken-Over-81!"}),
    ]
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        h = _bearer(member)
        for method, template, body in requests:
            real = http.request(method, template.format(u=other), json=body, headers=h)
            missing = http.request(method, template.format(u=ghost), json=body, headers=h)
            assert real.status_code == missing.status_code == 404, (template, real.text)
            assert real.json()["reason"] == missing.json()["reason"] == "user_not_found"
            # The messages differ only by the name that was asked for.
            assert real.json()["message"].replace(other, "X") == missing.json()["message"].replace(
                ghost, "X"
            )
    assert [t.name for t in owner.list_tokens(other)] == [token]


def test_auditor_reads_the_audit_log_but_cannot_create_users(
    make_user: UserFactory, owner: Client, server: ServerProcess
) -> None:
    auditor, _ = make_user("auditor")
    assert auditor.list_audit(limit=5).count > 0
    assert auditor.verify_audit().ok
    name = unique("byaud")
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        response = http.post(
            "/api/v2/users",
            json={"username": name, "email": f"{name}@example.com", "password": PASSWORD},
            headers=_bearer(auditor),
        )
    assert response.status_code == 403, response.text
    assert "user.create" in response.json()["message"]
    assert owner.list_users(q=name).count == 0


def test_member_manages_what_is_their_own(make_user: UserFactory, server: ServerProcess) -> None:
    member, name = make_user()
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as http:
        h = _bearer(member)
        assert http.get("/api/v2/users/me", headers=h).json()["username"] == name
        assert http.get(f"/api/v2/users/{name}", headers=h).status_code == 200
        created = http.post("/api/v2/users/me/tokens", json={"name": "own"}, headers=h)
        assert created.status_code == 201, created.text
        listed = http.get(f"/api/v2/users/{name}/tokens", headers=h).json()["tokens"]
        assert [t["name"] for t in listed] == ["own"]
        assert http.delete("/api/v2/users/me/tokens/own", headers=h).status_code == 204
        # ...but cannot raise their own roles or suspend themselves.
        grant = http.put("/api/v2/users/me/roles", json={"roles": ["owner"]}, headers=h)
        assert grant.status_code == 403, grant.text
        assert http.put("/api/v2/users/me/status/suspend", headers=h).status_code == 403
        changed = http.put(
            "/api/v2/users/me/password",
            json={"password": "Own-Fresh-Pass-55", "old_password": PASSWORD},
            headers=h,
        )
        assert changed.status_code == 204, changed.text
