"""Bad input on every endpoint gives a 4xx with a message, never a 500.

The operations come from the server's own OpenAPI document, so a new endpoint
is probed without anyone remembering to add it. Each probe is either bad by
construction (the request models in ``stockade.sdk.types`` refuse it, or the
query parameter's schema does): the answer must be 4xx; or merely odd (control
characters in free text, a huge offset): any answer but a 5xx is fine.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from stockade.devtools.server import ServerProcess
from stockade.sdk import Client, types
from stockade.server.app import create_app
from stockade.server.authz import policy_of
from stockade.server.settings import Settings
from tests.conftest import UserFactory, unique

# Every password we send carries this marker, and so do the forged tokens: no
# answer may ever contain it.
SECRET = "Sekrit7Qz"
SECRET_PASSWORD = f"{SECRET}-Horse-31!"
FORGED_TOKENS = (f"abcdefghij-{SECRET}{'A' * 13}", f"{SECRET}-not-even-well-formed")
MAX_REQUESTS = 1500  # per backend, for the whole battery

_OMIT = object()

Op = tuple[str, str]  # (METHOD, /path/{template})


@dataclass
class Probe:
    label: str
    method: str
    path: str
    token: str | None = None
    body: Any = _OMIT  # JSON-encoded when set
    content: bytes | None = None  # raw body, sent as application/json unless headers say
    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] | None = None
    must_refuse: bool = True  # bad by construction: 4xx; otherwise anything but 5xx


class Battery:
    """Sends probes to the test server only and collects every problem, so one
    run reports all of them."""

    def __init__(self, http: httpx.Client, secrets: tuple[str, ...]) -> None:
        self.http = http
        self.secrets = secrets
        self.sent = 0
        self.problems: list[str] = []

    def send(self, probe: Probe) -> httpx.Response | None:
        # A fresh connection each time: after a 500 the server drops the
        # connection, and a reused one would blame the next probe.
        headers = {"Connection": "close", **probe.headers}
        # Only the probe's own credential: a session cookie that an earlier
        # probe's answer set would make the anonymous probes signed in.
        self.http.cookies.clear()
        if probe.token:
            headers["Authorization"] = f"Bearer {probe.token}"
        kwargs: dict[str, Any] = {"headers": headers, "params": probe.params}
        if probe.content is not None:
            headers.setdefault("Content-Type", "application/json")
            kwargs["content"] = probe.content
        elif probe.body is not _OMIT:
            kwargs["json"] = probe.body
        where = f"{probe.label}: {probe.method} {probe.path}" + (
            f" params={probe.params!r:.120}" if probe.params else ""
        )
        self.sent += 1
        try:
            response = self.http.request(probe.method, probe.path, **kwargs)
        except httpx.TransportError as exc:
            self.problems.append(f"{where} -> connection failed: {exc!r}")
            return None
        self.judge(where, probe, response)
        return response

    def judge(self, where: str, probe: Probe, response: httpx.Response) -> None:
        status = response.status_code
        said = f"{where} -> {status} {response.text[:200]}"
        if status >= 500:
            self.problems.append(f"{said}  [server error]")
            return
        if probe.must_refuse and not 400 <= status < 500:
            self.problems.append(f"{said}  [bad input was not refused with a 4xx]")
            return
        if not 400 <= status < 500:
            if status >= 300:
                self.problems.append(f"{said}  [unexpected redirect]")
            return
        try:
            body = response.json()
        except json.JSONDecodeError:
            self.problems.append(f"{said}  [error is not JSON]")
            return
        if (
            probe.path.startswith("/api/v2/aibridge/")
            and isinstance(body, dict)
            and "error" in body
        ):
            # The bridge's provider routes answer in the provider's error
            # format ({"error": {"message": ..., "code" or "type": ...}}), which
            # the official clients read.
            error = body.get("error", body)
            body = {
                "message": error.get("message"),
                "reason": error.get("code") or error.get("type"),
            }
        if not (
            isinstance(body, dict)
            and isinstance(body.get("message"), str)
            and body["message"].strip()
        ):
            self.problems.append(f"{said}  [no message]")
        elif not (isinstance(body.get("reason"), str) and body["reason"]):
            self.problems.append(f"{said}  [no reason]")
        leaked = [s for s in self.secrets if s in response.text]
        if leaked:
            self.problems.append(f"{said}  [echoes a secret]")


# --- what the server says it offers ---------------------------------------------


def public_ops(tmp_path: Path) -> set[Op]:
    """Operations anyone may call (their policy is ``public()``, or they are not
    under /api/ at all, like /healthz)."""
    app = create_app(Settings(data_dir=tmp_path))
    ops: set[Op] = set()
    for route in app.routes:
        if isinstance(route, APIRoute):
            policy = policy_of(route)
            if policy is None or policy.kind == "public":
                ops |= {(m, route.path) for m in route.methods or ()}
    return ops


def operations(spec: dict[str, Any]) -> Iterator[tuple[Op, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, op in item.items():
            yield (method.upper(), path), op


def body_model(op: dict[str, Any]) -> type[BaseModel] | None:
    body = op.get("requestBody")
    if not body:
        return None
    if "application/json" not in body["content"]:
        return None  # a binary upload (template archives): tests/server/test_templates.py
    ref = body["content"]["application/json"]["schema"]["$ref"]
    name = ref.rsplit("/", 1)[-1]
    model = getattr(types, name, None)
    assert isinstance(model, type) and issubclass(model, BaseModel), f"no model for {name}"
    return model


def plain(schema: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of ``anyOf: [X, null]``."""
    for branch in schema.get("anyOf", []):
        if branch.get("type") != "null":
            return dict(branch)
    return schema


def refused_by(model: type[BaseModel], value: Any) -> bool:
    try:
        model.model_validate(value)
    except ValidationError:
        return True
    return False


# --- inputs that are valid, to vary one thing at a time --------------------------------


def valid_bodies(target: str, template: str = "") -> dict[str, Callable[[], dict[str, Any]]]:
    def new_user() -> dict[str, Any]:
        name = unique("bad")
        return {
            "username": name,
            "email": f"{name}@example.com",
            "password": SECRET_PASSWORD,
            "name": "Some One",
        }

    return {
        "FirstUserRequest": new_user,
        "CreateUserRequest": lambda: {**new_user(), "roles": ["auditor"]},
        "LoginRequest": lambda: {"username": target, "password": SECRET_PASSWORD},
        "UpdateRolesRequest": lambda: {"roles": ["auditor"]},
        "UpdatePasswordRequest": lambda: {"password": SECRET_PASSWORD},
        "CreateTokenRequest": lambda: {"name": unique("tok"), "lifetime_seconds": 3600},
        "ActivateTemplateVersionRequest": lambda: {"version": 1},
        "CreateWorkspaceRequest": lambda: {
            "name": unique("ws"),
            "template": template,
            "parameters": {},
        },
        "CreateBuildRequest": lambda: {"transition": "stop", "cancel_running": True},
        "CreateProvisionerKeyRequest": lambda: {"name": unique("key")},
        "AcquireJobRequest": lambda: {"worker_id": "w", "backends": ["local"]},
        "JobHeartbeatRequest": lambda: {"worker_id": "w"},
        "JobLogs": lambda: {"worker_id": "w", "lines": [{"line": "x"}]},
        "CompleteJobRequest": lambda: {"worker_id": "w", "status": "failed"},
        "EgressRecords": lambda: {"daemon": "d", "records": []},
        "UpdateTemplateAclRequest": lambda: {"users": {}, "groups": {"everyone": "use"}},
        "CreateOrganizationRequest": lambda: {"name": unique("org"), "display_name": "Org"},
        "UpdateOrganizationRequest": lambda: {"display_name": "Org", "description": "d"},
        "UpdateMemberRequest": lambda: {"roles": []},
        "CreateGroupRequest": lambda: {"name": unique("grp"), "members": [target]},
        "UpdateGroupRequest": lambda: {"display_name": "G", "add_members": [target]},
    }


LONG = (SECRET + "x" * 10_000)[:10_000]  # if a long input comes back, it shows
CONTROL = "a\x00b\x07c\x1b[31m\r\n"
UNICODE = "Ünïcödé 😀 \u202etxt.exe"
STRING_VALUES = (12345, ["x"], None, LONG, CONTROL, UNICODE)
INTEGER_VALUES = ("abc", 0, -1, 10**30, 1.5, True)
ARRAY_VALUES = ("owner", [123], ["no-such-role"], None)
OBJECT_VALUES = ("x", [1], {"x" * 300: 1}, {"k": {"nested": [None]}}, {"a\x00b": "c"})
BOOLEAN_VALUES = ("maybe", 2, None, [True])
ANY_VALUES = (None, {"x": 1}, LONG, CONTROL)

BAD_PATH_VALUES = (
    "does-not-exist",
    "x" * 300,
    "..%2F..%2Fetc%2Fpasswd",
    "%2E%2E",
    "%00",
    "%FF%FE%25zz",
    "%F0%9F%98%80%E2%80%AE",
)


def body_probes(
    op: Op, path: str, model: type[BaseModel], sample: Callable[[], dict[str, Any]], token: str
) -> Iterator[Probe]:
    method = op[0]

    def probe(label: str, **kw: Any) -> Probe:
        return Probe(label, method, path, token, **kw)

    yield probe("invalid JSON", content=b'{"username": ')
    yield probe("invalid UTF-8", content=b'{"name": "\xff\xfe"}')
    yield probe("deeply nested JSON", content=b"[" * 100_000 + b"]" * 100_000)
    yield probe("empty body", content=b"")
    yield probe(
        "form-encoded body",
        content=b"a=b",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    for label, value in (
        ("a list", [sample()]),
        ("a string", "x"),
        ("null", None),
        ("a number", 42),
    ):
        yield probe(f"body is {label}", body=value)
    schema = model.model_json_schema()
    for name in schema.get("required", []):
        body = sample()
        body.pop(name, None)
        yield probe(f"missing {name}", body=body)
    yield probe("unknown field", body={**sample(), "zz_unknown_field": 1})
    for name, prop in schema["properties"].items():
        kind = str(plain(prop).get("type"))
        values: tuple[Any, ...] = {
            "string": STRING_VALUES,
            "integer": INTEGER_VALUES,
            "array": ARRAY_VALUES,
            "object": OBJECT_VALUES,
            "boolean": BOOLEAN_VALUES,
            "None": ANY_VALUES,  # a union of several types
        }[kind]
        for bad in values:
            body = {**sample(), name: bad}
            yield probe(f"{name}={bad!r:.40}", body=body, must_refuse=refused_by(model, body))


def query_probes(op: Op, path: str, params: list[dict[str, Any]], token: str) -> Iterator[Probe]:
    def probe(label: str, values: dict[str, str], must_refuse: bool) -> Probe:
        return Probe(label, op[0], path, token, params=values, must_refuse=must_refuse)

    names = {p["name"] for p in params}
    for param in params:
        name, schema = param["name"], plain(param["schema"])
        kind = schema.get("type")
        if kind == "integer":
            low, high = schema.get("minimum"), schema.get("maximum")
            for raw in ("0", "-1", "-5", "abc", "1.5", "100000", "1" + "0" * 30):
                try:
                    number: int | None = int(raw)
                except ValueError:
                    number = None
                refuse = (
                    number is None
                    or (low is not None and number < low)
                    or (high is not None and number > high)
                )
                yield probe(f"{name}={raw:.20}", {name: raw}, refuse)
        elif kind == "number":
            low, high = schema.get("minimum"), schema.get("maximum")
            for raw in ("-1", "abc", "nan", "inf", "1e999", "0.5"):
                try:
                    value: float | None = float(raw)
                except ValueError:
                    value = None
                refuse = (
                    value is None
                    or value != value  # NaN
                    or (low is not None and value < low)
                    or (high is not None and value > high)
                )
                yield probe(f"{name}={raw}", {name: raw}, refuse)
        elif kind == "string" and schema.get("format") == "date-time":
            for raw, refuse in (
                ("not-a-date", True),
                ("2026-01-31T12:00:00", True),  # no time zone
                ("2026-02-30T00:00:00Z", True),
                ("0001-01-01T00:00:00+14:00", False),  # before year 1 in UTC
                ("9999-12-31T23:59:59-14:00", False),  # after year 9999 in UTC
            ):
                yield probe(f"{name}={raw}", {name: raw}, refuse)
        elif kind == "string" and "enum" in schema:
            yield probe(f"{name}=bogus", {name: "bogus"}, True)
        elif kind == "boolean":
            for raw in ("maybe", "2", ""):
                yield probe(f"{name}={raw!r}", {name: raw}, True)
        elif kind == "string":
            yield probe(f"{name}=<10k chars>", {name: LONG}, "maxLength" in schema)
            yield probe(f"{name}=<control chars>", {name: CONTROL}, False)
            yield probe(f"{name}=<unicode>", {name: UNICODE}, False)
        else:
            pytest.fail(f"no bad values for query parameter {name} of {op}: {schema}")
    if {"since", "until"} <= names:
        crossed = {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"}
        yield probe("since after until", crossed, True)


@dataclass
class Target:
    user: str
    token_name: str
    template: str
    org: str
    group: str


@pytest.fixture
def target(owner: Client, make_user: UserFactory) -> Target:
    from tests.server.test_templates import simple_archive

    _, name = make_user()
    template = unique("tpl")
    owner.push_template(template, simple_archive(template))
    org, group = unique("org"), unique("grp")
    owner.create_organization(org)
    owner.set_member(org, name)
    owner.create_group(org, group, members=[name])
    token = owner.create_token(unique("tok"), user=name).name
    return Target(name, token, template, org, group)


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    assert server.url.startswith("http://127.0.0.1:")
    with httpx.Client(base_url=server.url, timeout=30, trust_env=False) as client:
        yield client


def fill(template: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        template = template.replace("{" + name + "}", value)
    assert "{" not in template, f"no sample value for a path parameter of {template}"
    return template


def test_bad_input_on_every_endpoint_is_a_4xx_with_a_message(
    http: httpx.Client, owner: Client, target: Target, tmp_path: Path
) -> None:
    assert owner.token
    spec = http.get("/api/v2/openapi.json").json()
    open_to_all = public_ops(tmp_path)
    bodies = valid_bodies(target.user, target.template)
    path_values = {
        "user": target.user,
        "owner": target.user,
        "token": target.token_name,
        "name": target.template,
        "number": "1",
        "build_id": "00000000-0000-0000-0000-000000000000",
        "org": target.org,
        "group": target.group,
        "interception_id": "00000000-0000-0000-0000-000000000000",
    }
    battery = Battery(http, (SECRET, owner.token))
    created_usernames: list[str] = []

    for op, spec_op in operations(spec):
        method, template = op
        params = spec_op.get("parameters", [])
        path_params = [p["name"] for p in params if p["in"] == "path"]
        query_params = [p for p in params if p["in"] == "query"]
        model = body_model(spec_op)
        sample: Callable[[], Any] = lambda: _OMIT  # noqa: E731
        if model is not None:
            assert model.__name__ in bodies, f"no valid sample body for {model.__name__} ({op})"
            sample = bodies[model.__name__]
        path = fill(template, path_values)

        # As the owner, who may do anything: only the input can be wrong.
        if model is not None:
            for probe in body_probes(op, path, model, sample, owner.token):
                response = battery.send(probe)
                if op == ("POST", "/api/v2/users") and isinstance(probe.body, dict):
                    name = probe.body.get("username")
                    if response is not None and response.status_code >= 400 and name:
                        created_usernames.append(str(name))
        for name in path_params:
            for bad in BAD_PATH_VALUES:
                bad_path = fill(template, {**path_values, name: bad})
                battery.send(
                    Probe(f"{{{name}}}={bad:.30}", method, bad_path, owner.token, body=sample())
                )
        for probe in query_probes(op, path, query_params, owner.token):
            battery.send(probe)

        # Anonymously, and with forged tokens that must not come back in the answer.
        is_public = op in open_to_all
        if model is not None:
            battery.send(Probe("anonymous, invalid JSON", method, path, content=b"{"))
            battery.send(Probe("anonymous, list body", method, path, body=[1]))
        for name in path_params:
            bad_path = fill(template, {**path_values, name: "x" * 300})
            battery.send(Probe(f"anonymous, long {{{name}}}", method, bad_path, body=sample()))
        if query_params:
            first = query_params[0]["name"]
            battery.send(Probe(f"anonymous, {first}=abc", method, path, params={first: "abc"}))
        for forged in FORGED_TOKENS:
            battery.send(
                Probe(
                    "forged token", method, path, forged, body=sample(), must_refuse=not is_public
                )
            )

    # Nothing half-written: a refused POST /users left no user behind.
    listed = http.get(
        "/api/v2/users", params={"limit": 1000}, headers={"Authorization": f"Bearer {owner.token}"}
    ).json()
    assert listed["count"] <= 1000
    existing = {u["username"] for u in listed["users"]}
    assert created_usernames, "no refused POST /api/v2/users probes"
    assert not existing & set(created_usernames), existing & set(created_usernames)

    assert battery.sent <= MAX_REQUESTS, battery.sent
    assert not battery.problems, (
        f"{len(battery.problems)} of {battery.sent} probes answered badly:\n"
        + "\n".join(battery.problems)
    )


def test_odd_but_storable_text_never_breaks_the_server(
    http: httpx.Client, owner: Client, target: Target
) -> None:
    """Values the request models accept but a database may choke on: each must
    be stored and read back, or refused with a 4xx, the same on every backend."""
    assert owner.token
    battery = Battery(http, (SECRET, owner.token))

    def as_owner(label: str, method: str, path: str, **kw: Any) -> Probe:
        return Probe(label, method, path, owner.token, must_refuse=False, **kw)

    name = unique("nul")
    probes = [
        as_owner(
            "NUL in name",
            "POST",
            "/api/v2/users",
            body={
                "username": name,
                "email": f"{name}@example.com",
                "password": SECRET_PASSWORD,
                "name": "nul\x00here",
            },
        ),
        as_owner(
            "NUL in email",
            "POST",
            "/api/v2/users",
            body={
                "username": name + "e",
                "email": f"{name}\x00@example.com",
                "password": SECRET_PASSWORD,
            },
        ),
        as_owner(
            "NUL in login username",
            "POST",
            "/api/v2/users/login",
            body={"username": "nul\x00user", "password": SECRET_PASSWORD},
        ),
        as_owner("NUL in user ref", "GET", f"/api/v2/users/{target.user}%00"),
        as_owner("largest offset", "GET", "/api/v2/users", params={"offset": str(2**63 - 1)}),
        as_owner("offset past int64", "GET", "/api/v2/users", params={"offset": str(2**63)}),
        as_owner("audit offset past int64", "GET", "/api/v2/audit", params={"offset": str(2**63)}),
    ]
    for probe in probes:
        battery.send(probe)
    assert not battery.problems, "\n".join(battery.problems)


def test_refused_user_creations_leave_nothing_behind(http: httpx.Client, owner: Client) -> None:
    """Bodies that pass the schema but fail later (password policy, a taken
    email) and ones that fail the schema: none may leave a user record."""
    headers = {"Authorization": f"Bearer {owner.token}"}
    owner_email = owner.me().email

    def user(prefix: str, **fields: Any) -> tuple[str, dict[str, Any]]:
        name = unique(prefix)
        body = {"username": name, "email": f"{name}@example.com", "password": SECRET_PASSWORD}
        return name, {**body, **fields}

    attempts = [
        user("weak", password="short1"),
        user("weak", password="password123"),
        user("weak", password="aaaaaaaaaaaa"),
        user("taken", email=owner_email),
        user("badrole", roles=["auditor", "root"]),
        user("longname", name="n" * 129),
    ]
    name = unique("ownpw")
    attempts.append(
        (name, {"username": name, "email": f"{name}@example.com", "password": f"{name}-Horse-1"})
    )
    before = http.get("/api/v2/users", params={"limit": 1}, headers=headers).json()["count"]
    for username, body in attempts:
        response = http.post("/api/v2/users", json=body, headers=headers)
        assert 400 <= response.status_code < 500, (username, response.text)
        assert response.json()["message"], response.text
        assert SECRET not in response.text
        gone = http.get(f"/api/v2/users/{username}", headers=headers)
        assert gone.status_code == 404, (username, gone.text)
    after = http.get("/api/v2/users", params={"limit": 1}, headers=headers).json()["count"]
    assert after == before
    # The taken email still belongs to the owner alone.
    found = http.get("/api/v2/users", params={"q": owner_email}, headers=headers).json()
    assert [u["username"] for u in found["users"]] == [owner.me().username]


def test_messages_say_what_to_fix(http: httpx.Client, owner: Client) -> None:
    headers = {"Authorization": f"Bearer {owner.token}"}

    def refused(response: httpx.Response, status: int = 400) -> tuple[str, str]:
        assert response.status_code == status, response.text
        body = response.json()
        return body["message"], body["reason"]

    name = unique("msg")
    user = {"username": name, "email": f"{name}@example.com", "password": SECRET_PASSWORD}

    message, reason = refused(
        http.post("/api/v2/users", json={**user, "username": "Not_Valid!"}, headers=headers)
    )
    assert "lowercase letters, digits and hyphens" in message and reason == "invalid_input"

    message, _ = refused(
        http.post(
            "/api/v2/users",
            content=b'{"username": ',
            headers={**headers, "Content-Type": "application/json"},
        )
    )
    assert "not valid JSON" in message

    message, _ = refused(
        http.post("/api/v2/users", json={**user, "nickname": "x"}, headers=headers)
    )
    assert "nickname is not a known field" in message

    missing = {k: v for k, v in user.items() if k != "password"}
    message, _ = refused(http.post("/api/v2/users", json=missing, headers=headers))
    assert "password is required" in message

    for path in ("/api/v2/users", "/api/v2/audit"):
        message, _ = refused(http.get(path, params={"limit": 0}, headers=headers))
        assert "limit" in message, (path, message)

    message, _ = refused(
        http.get("/api/v2/audit", params={"since": "2026-01-31T12:00:00"}, headers=headers)
    )
    assert "since" in message and "time zone" in message

    message, _ = refused(
        http.post(
            f"/api/v2/users/{owner.me().username}/tokens",
            json={"name": "-bad name"},
            headers=headers,
        )
    )
    assert "name must start with a letter or digit" in message
    assert http.get(f"/api/v2/users/{name}", headers=headers).status_code == 404
