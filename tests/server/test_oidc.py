"""OpenID Connect single sign-on against a real identity provider (the npm
``oidc-provider``, see tests/idp): the whole flow driven as a browser would
(Stockade -> authorize -> the provider's login form -> consent -> callback),
first login, re-login, linking by verified email, sign-ups and domains,
every way a sign-in can go wrong (each an HTML page and a log line), role and
group sync, password login refused for SSO users, the audit trail, a real
Chromium clicking the button, and ``stockade login --sso``.

One provider and two servers per module: ``main`` (sign-ups on, corp.test
only, password login off for SSO users, role and group sync) and ``strict``
(sign-ups off)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from html import unescape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from pydantic import ValidationError

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client, types
from stockade.server.settings import Settings
from tests.conftest import OWNER_PASSWORD, PASSWORD, RELAXED_LIMITS, unique
from tests.idp import Client as IdpClient
from tests.idp import IdP, require_idp
from tests.server.test_templates import simple_archive

CALLBACK = "/api/v2/users/oidc/callback"
LOGIN = "/api/v2/users/oidc/login"
SECRET = "idp-client-secret-that-must-never-be-logged"
BUTTON = "Sign in with Corp SSO"
HTML = "text/html,application/xhtml+xml,*/*;q=0.8"
ROLE_MAPPING = {"stockade-templates": ["template-admin"], "stockade-audit": ["auditor"]}
STOCKADE = str(Path(sys.executable).with_name("stockade"))


@dataclass
class Sso:
    idp: IdP
    main: ServerProcess
    strict: ServerProcess
    owner: Client
    pg: ServerProcess  # started by the PostgreSQL test only


def _oidc_env(idp: IdP, **extra: str) -> dict[str, str]:
    return {
        **RELAXED_LIMITS,
        "STOCKADE_OIDC_ISSUER_URL": idp.issuer,
        "STOCKADE_OIDC_CLIENT_ID": "stockade",
        "STOCKADE_OIDC_CLIENT_SECRET": SECRET,
        "STOCKADE_OIDC_SCOPES": "openid,profile,email,groups,roles",
        "STOCKADE_OIDC_SIGN_IN_TEXT": BUTTON,
        "STOCKADE_PROVISIONER_WORKERS": "0",
        **extra,
    }


@pytest.fixture(scope="module")
def sso(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sso]:
    require_idp()
    base = tmp_path_factory.mktemp("sso")
    # The servers' ports first: the provider's client lists their callbacks.
    main = ServerProcess(data_dir=base / "main")
    strict = ServerProcess(data_dir=base / "strict")
    pg = ServerProcess(data_dir=base / "pg")
    callbacks = [s.url + CALLBACK for s in (main, strict, pg)]
    idp = IdP(
        base / "idp",
        [
            IdpClient("stockade", SECRET, callbacks),
            IdpClient("other-app", "other-secret", [main.url + CALLBACK]),
        ],
    )
    main.extra_env = _oidc_env(
        idp,
        STOCKADE_OIDC_EMAIL_DOMAINS="corp.test",
        STOCKADE_DISABLE_PASSWORD_AUTH_FOR_OIDC_USERS="true",
        STOCKADE_OIDC_USER_ROLE_FIELD="roles",
        STOCKADE_OIDC_USER_ROLE_MAPPING=json.dumps(ROLE_MAPPING),
        STOCKADE_OIDC_GROUP_FIELD="groups",
        STOCKADE_OIDC_GROUP_MAPPING=json.dumps({"idp-ops": "ops"}),
        STOCKADE_OIDC_GROUP_REGEX_FILTER="^(?!ignored-)",
        STOCKADE_OIDC_GROUP_AUTO_CREATE="true",
    )
    strict.extra_env = _oidc_env(idp, STOCKADE_OIDC_ALLOW_SIGNUPS="false")
    # Side by side: each mostly waits on its own start-up.
    with ThreadPoolExecutor(3) as pool:
        for started in [pool.submit(p.start) for p in (idp, main, strict)]:
            started.result()
    owner = Client(main.url)
    owner.create_first_user("owner", "owner@corp.test", OWNER_PASSWORD)
    owner.login("owner", OWNER_PASSWORD)
    try:
        yield Sso(idp, main, strict, owner, pg)
    finally:
        owner.close()
        for server in (main, strict, pg):
            server.stop()
        idp.stop()


@pytest.fixture(autouse=True)
def _well_behaved(sso: Sso) -> Iterator[None]:
    """Each test starts with a provider that behaves and is up."""
    yield
    sso.idp.behave()
    if sso.idp.process is None or sso.idp.process.poll() is not None:
        sso.idp.start()


_FORM = re.compile(r'<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>', re.S)
_PROMPT = re.compile(r'name="prompt" value="(\w+)"')


class Browser:
    """What a browser does during single sign-on, with httpx: follows the
    redirects, fills the provider's login form and consents."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        # As a browser asks: the failures are pages then (a script gets JSON).
        self.http = httpx.Client(timeout=30, trust_env=False, headers={"accept": HTML})

    def close(self) -> None:
        self.http.close()

    def start(self, redirect: str | None = None) -> httpx.Response:
        params = {"redirect": redirect} if redirect is not None else {}
        return self.http.get(self.server.url + LOGIN, params=params)

    def to_callback(self, account: str, redirect: str | None = None) -> str:
        """Sign in at the provider as ``account``: the callback URL it sends
        the browser to (not visited yet)."""
        response = self.start(redirect)
        assert response.status_code == 303, response.text
        for _ in range(20):
            if response.status_code in (302, 303):
                location = str(response.url.join(response.headers["location"]))
                if location.startswith(self.server.url + CALLBACK):
                    return location
                response = self.http.get(location)
                continue
            assert response.status_code == 200, (response.status_code, response.text[:500])
            form = _FORM.search(response.text)
            assert form, response.text[:500]
            action = str(response.url.join(unescape(form.group(1))))
            prompt = _PROMPT.search(form.group(2))
            assert prompt, form.group(2)
            data = {"prompt": prompt.group(1)}
            if prompt.group(1) == "login":
                data |= {"login": account, "password": "any password"}
            response = self.http.post(action, data=data)
        raise AssertionError("the provider never sent the browser back")

    def callback(self, url: str) -> httpx.Response:
        return self.http.get(url)

    def sign_in(self, account: str, redirect: str | None = None) -> httpx.Response:
        return self.callback(self.to_callback(account, redirect))

    def me(self) -> dict[str, Any]:
        response = self.http.get(self.server.url + "/api/v2/users/me")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
def browser(sso: Sso) -> Iterator[Browser]:
    b = Browser(sso.main)
    yield b
    b.close()


def page_text(response: httpx.Response) -> str:
    """The words of an HTML page."""
    return " ".join(unescape(re.sub(r"<[^>]+>", " ", response.text)).split())


def assert_failure_page(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, page_text(response))
    assert response.headers["content-type"].startswith("text/html")
    text = page_text(response)
    assert "Single sign-on did not work" in text, text
    for word in words:
        assert word in text, (word, text)
    assert "stockade_session=" not in response.headers.get("set-cookie", "")
    return text


def person(sso: Sso, *, verified: bool = True, domain: str = "corp.test", **claims: Any) -> str:
    """A new account at the provider: its id (login and subject)."""
    name = unique("p")
    account = f"sub-{name}"
    sso.idp.set_account(
        account,
        email=f"{name}@{domain}",
        email_verified=verified,
        preferred_username=name,
        name=f"Person {name}",
        **claims,
    )
    return account


def audit_of(sso: Sso, action: str, username: str) -> list[types.AuditEntry]:
    entries = sso.owner.list_audit(action=action, actor=username, limit=50).entries
    return [e for e in entries if e.username == username]


def log_lines(server: ServerProcess, event: str) -> list[dict[str, Any]]:
    lines = []
    for line in server.logs().splitlines():
        if event in line:
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return lines


# --- settings ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "words"),
    [
        ({"oidc_issuer_url": "ftp://idp"}, "must be an http:// or https:// URL"),
        ({"oidc_issuer_url": "https://idp.corp.test"}, "oidc_client_id is needed"),
        ({"oidc_scopes": "profile,email"}, "must include openid"),
        ({"oidc_group_mapping": "{oops"}, "oidc_group_mapping is not valid JSON"),
        ({"oidc_user_role_mapping": '{"x": ["root"]}'}, "'root' (for 'x') is not a site role"),
        ({"oidc_user_role_mapping": '{"x": "auditor"}'}, "must be a list of site roles"),
        ({"oidc_group_regex_filter": "(["}, "not a valid regular expression"),
        ({"oidc_email_domains": "corp test"}, "is not a domain name"),
        ({"oidc_client_id": "stockade"}, "oidc_issuer_url is not: SSO is off"),
    ],
)
def test_bad_settings_say_what_is_wrong(values: dict[str, str], words: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(data_dir=tmp_path, **values)  # type: ignore[arg-type]
    assert words in str(refused.value)


def test_settings_allow_the_idp_and_hide_the_secret(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path,
        oidc_issuer_url="https://idp.corp.internal/realms/dev",
        oidc_client_id="stockade",
        oidc_client_secret=SECRET,
        egress_allow_private_networks=False,
    )
    assert settings.egress_policy.decide("idp.corp.internal") is not None
    assert settings.egress_policy.decide("idp.elsewhere.example") is None
    assert SECRET not in repr(settings) and SECRET not in str(settings.model_dump())
    from stockade.server.system.service import effective_settings

    shown = {v.name: v.value for _, views in effective_settings(settings) for v in views}
    assert SECRET not in json.dumps(shown) and shown["oidc_client_secret"].endswith("set")


def test_the_server_refuses_to_start_with_a_bad_mapping(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from stockade.server.cli import server_command

    done = CliRunner().invoke(
        server_command(),
        ["--data-dir", str(tmp_path), "--oidc-issuer-url", "http://127.0.0.1:9",
         "--oidc-client-id", "stockade", "--oidc-user-role-mapping", '{"admins": ["superuser"]}'],
    )  # fmt: skip
    assert done.exit_code == 2
    assert "'superuser' (for 'admins') is not a site role" in done.output


# --- the flow ----------------------------------------------------------------


async def test_an_unreachable_provider_is_a_502_page_from_the_start(tmp_path: Path) -> None:
    from stockade.devtools.ports import free_port
    from stockade.server.app import create_app
    from stockade.server.db import migrate

    settings = Settings(
        data_dir=tmp_path,
        oidc_issuer_url=f"http://127.0.0.1:{free_port()}",  # nothing listens
        oidc_client_id="stockade",
    )
    app = create_app(settings)
    await migrate.upgrade(app.state.services.db)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://stockade.test") as api:
            response = await api.get(LOGIN, headers={"accept": HTML})
        assert_failure_page(response, 502, "could not reach the identity provider")
    finally:
        await app.state.services.oidc.close()
        await app.state.services.db.dispose()


def test_auth_methods_and_the_login_button(sso: Sso) -> None:
    with Client(sso.main.url) as api:
        methods = api.auth_methods()
    assert methods.password.enabled and methods.oidc.enabled
    assert methods.oidc.sign_in_text == BUTTON and methods.oidc.login_url == LOGIN
    page = httpx.get(sso.main.url + "/login", params={"next": "/templates"}, trust_env=False)
    assert BUTTON in page.text
    assert f'href="{LOGIN}?redirect=/templates"' in page.text


async def test_without_single_sign_on_there_is_no_button(tmp_path: Path) -> None:
    from stockade.server.app import create_app
    from stockade.server.db import migrate

    app = create_app(Settings(data_dir=tmp_path))
    await migrate.upgrade(app.state.services.db)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://stockade.test") as api:
            methods = (await api.get("/api/v2/users/authmethods")).json()
            assert methods["oidc"] == {"enabled": False, "sign_in_text": "", "login_url": ""}
            body = {"username": "owner", "email": "o@corp.test", "password": OWNER_PASSWORD}
            assert (await api.post("/api/v2/users/first", json=body)).status_code == 201
            assert "Sign in with" not in (await api.get("/login")).text
            refused = await api.get(LOGIN, headers={"accept": HTML})
            assert_failure_page(refused, 404, "not set up on this Stockade server")
            # A script (no HTML asked for) gets the API's JSON error.
            scripted = await api.get(LOGIN)
            assert scripted.status_code == 404 and scripted.json()["reason"] == "oidc_disabled"
    finally:
        await app.state.services.db.dispose()


def test_first_login_creates_the_user_and_the_second_reuses_it(sso: Sso, browser: Browser) -> None:
    name = unique("ann")
    sso.idp.set_account(
        f"sub-{name}",
        email=f"{name.upper()}@corp.test",
        email_verified=True,
        preferred_username=f"Ann.{name} Müller",
        name="Ann Müller",
    )
    first = browser.sign_in(f"sub-{name}")
    assert first.status_code == 303, page_text(first)
    assert first.headers["location"] == "/workspaces"
    assert "stockade_session=" in first.headers["set-cookie"]
    assert "HttpOnly" in first.headers["set-cookie"]
    me = browser.me()
    assert me["username"] == f"ann-{name}-muller"[:32].rstrip("-")
    assert me["email"] == f"{name}@corp.test" and me["name"] == "Ann Müller"
    assert me["login_type"] == "oidc" and me["roles"] == []

    again = Browser(sso.main)
    try:
        assert again.sign_in(f"sub-{name}").status_code == 303
        assert again.me()["id"] == me["id"]
    finally:
        again.close()
    assert len(sso.owner.list_users(q=name).users) == 1
    created = audit_of(sso, "user.create", me["username"])
    assert len(created) == 1 and created[0].details["via"] == "oidc"
    logins = audit_of(sso, "user.login", me["username"])
    assert [e.details["method"] for e in logins] == ["oidc", "oidc"]
    assert {e.details["result"] for e in logins} == {"success"}
    assert sso.owner.verify_audit().ok


def test_a_short_lived_access_token_still_reads_userinfo(sso: Sso, browser: Browser) -> None:
    sso.idp.behave(access_token_ttl=20)  # the email is only in userinfo
    assert browser.sign_in(person(sso)).status_code == 303


def test_the_dashboard_works_with_the_sso_session(sso: Sso, browser: Browser) -> None:
    assert browser.sign_in(person(sso), redirect="/account").headers["location"] == "/account"
    page = browser.http.get(sso.main.url + "/account")
    assert page.status_code == 200 and "Signed in with single sign-on" in page_text(page)
    # No password form for an account whose password the identity provider keeps.
    assert 'action="/account/password"' not in page.text
    assert "kept by your identity provider" in page_text(page)


def test_usernames_are_made_to_fit_and_deduplicated(sso: Sso) -> None:
    names = []
    for claim in ("owner", "Owner", "me", "..."):
        account = f"sub-{unique('dup')}"
        sso.idp.set_account(
            account,
            email=f"{account}@corp.test",
            email_verified=True,
            preferred_username=claim,
        )
        b = Browser(sso.main)
        try:
            assert b.sign_in(account).status_code == 303
            names.append(b.me()["username"])
        finally:
            b.close()
    assert names[:3] == ["owner-2", "owner-3", "me-user"]
    # Nothing usable in the claim: the email's local part.
    assert names[3].startswith("sub-dup")


def test_redirect_after_login_must_be_local(sso: Sso, browser: Browser) -> None:
    account = person(sso)
    assert browser.sign_in(account, redirect="/templates?x=1").headers["location"] == (
        "/templates?x=1"
    )
    for bad in ("https://evil.example/", "//evil.example/x", "/\\evil.example", "javascript:x"):
        assert_failure_page(browser.start(bad), 400, "must be a page of this site")


def test_link_by_verified_email_then_password_login_is_refused(sso: Sso, browser: Browser) -> None:
    name = unique("bob")
    sso.owner.create_user(name, f"{name}@corp.test", PASSWORD)
    with Client(sso.main.url) as api:
        api.login(name, PASSWORD)  # works before the link
    sso.idp.set_account(
        f"sub-{name}", email=f"{name}@corp.test", email_verified=True, preferred_username="other"
    )
    assert browser.sign_in(f"sub-{name}").status_code == 303
    me = browser.me()
    assert me["username"] == name and me["login_type"] == "oidc"
    changed = audit_of(sso, "user.login_type", name)
    assert len(changed) == 1 and changed[0].diff == {"login_type": ["password", "oidc"]}
    assert changed[0].details["linked_by"] == "email"
    # disable_password_auth_for_oidc_users is on here.
    with Client(sso.main.url) as api, pytest.raises(ApiError) as refused:
        api.login(name, PASSWORD)
    assert refused.value.status == 403 and refused.value.reason == "password_login_disabled"
    assert BUTTON in refused.value.message and "--sso" in refused.value.message
    # Only who knows the password learns that the account signs in with SSO.
    with Client(sso.main.url) as api, pytest.raises(ApiError) as wrong:
        api.login(name, "Wrong-Horse-99!")
    assert wrong.value.status == 401 and wrong.value.reason == "login_failed"
    form = httpx.post(
        sso.main.url + "/login",
        data={"username": name, "password": PASSWORD},
        headers={"origin": sso.main.url},
        trust_env=False,
    )
    assert form.status_code == 403 and "single sign-on" in page_text(form)
    assert BUTTON in form.text  # the page offers the button right there


def test_an_unverified_email_links_no_account(sso: Sso, browser: Browser) -> None:
    name = unique("carol")
    sso.owner.create_user(name, f"{name}@corp.test", PASSWORD)
    sso.idp.set_account(f"sub-{name}", email=f"{name}@corp.test", email_verified=False)
    text = assert_failure_page(browser.sign_in(f"sub-{name}"), 409, "not linked", "verified")
    assert "Try single sign-on again" in text
    assert sso.owner.get_user(name).login_type == "password"
    with Client(sso.main.url) as api:
        api.login(name, PASSWORD)  # the account is as it was
    line = log_lines(sso.main, "email_not_verified")[-1]
    assert line["event"] == "oidc_login_failed" and name in line["detail"]


def test_sign_ups_off_refuses_new_people_but_links_known_ones(sso: Sso) -> None:
    b = Browser(sso.strict)
    try:
        account = person(sso)
        assert_failure_page(b.sign_in(account), 403, "not created at sign-in", "administrator")
        # Someone the administrator created may still sign in (linked by email).
        name = unique("known")
        with Client(sso.strict.url) as api:
            if api.first_user_required():
                api.create_first_user("owner", "owner@corp.test", OWNER_PASSWORD)
            api.login("owner", OWNER_PASSWORD)
            api.create_user(name, f"{name}@corp.test", PASSWORD)
        sso.idp.set_account(f"sub-{name}", email=f"{name}@corp.test", email_verified=True)
        b.close()  # a new browser: the provider remembers who signed in on this one
        b = Browser(sso.strict)
        assert b.sign_in(f"sub-{name}").status_code == 303
        assert b.me()["username"] == name
    finally:
        b.close()
    assert log_lines(sso.strict, "signups_disabled")


def test_email_domains_outside_the_list_are_refused(sso: Sso, browser: Browser) -> None:
    account = person(sso, domain="elsewhere.test")
    assert_failure_page(browser.sign_in(account), 403, "elsewhere.test", "may not sign in")
    assert not sso.owner.list_users(q=account.removeprefix("sub-")).users


def test_missing_claims_are_explained(sso: Sso, browser: Browser) -> None:
    # An account the provider knows nothing about: a subject, no email.
    account = f"sub-{unique('ghost')}"
    assert_failure_page(browser.sign_in(account), 400, "did not send your email address")
    assert "missing_email" in sso.main.logs()


# --- what must not work -------------------------------------------------------------


def _with_state(url: str, state: str) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query["state"] = state
    return parts._replace(query=httpx.QueryParams(query).__str__()).geturl()


def test_bad_or_missing_state_is_refused(sso: Sso, browser: Browser) -> None:
    url = browser.to_callback(person(sso))
    assert_failure_page(browser.callback(_with_state(url, "forged")), 400, "does not belong")
    # Another browser (no state cookie) with the real URL.
    other = httpx.get(url, headers={"accept": HTML}, trust_env=False)
    assert_failure_page(other, 400, "not started in this browser")
    assert_failure_page(browser.callback(sso.main.url + CALLBACK), 400, "incomplete")
    # The provider reporting an error (the person refused consent).
    state = parse_qs(urlsplit(url).query)["state"][0]
    denied = browser.callback(
        f"{sso.main.url}{CALLBACK}?error=access_denied&error_description=User+said+no&state={state}"
    )
    assert_failure_page(denied, 403, "did not sign you in", "User said no")
    reasons = {line["reason"] for line in log_lines(sso.main, "oidc_login_failed")}
    assert {"state_mismatch", "state_cookie_missing", "missing_state_or_code", "idp_error"} <= (
        reasons
    )


def test_a_callback_works_once(sso: Sso, browser: Browser) -> None:
    url = browser.to_callback(person(sso))
    state = parse_qs(urlsplit(url).query)["state"][0]
    assert browser.callback(url).status_code == 303
    # Replayed with the state cookie put back: the state is used up.
    replay = httpx.get(
        url, cookies={"stockade_oidc_state": state}, headers={"accept": HTML}, trust_env=False
    )
    assert_failure_page(replay, 400, "already used")


def test_a_replayed_code_is_refused(sso: Sso, browser: Browser) -> None:
    account = person(sso)
    used = browser.to_callback(account)
    assert browser.callback(used).status_code == 303
    # A fresh sign-in's state with the old code: the provider refuses it.
    fresh = browser.to_callback(account)
    state = parse_qs(urlsplit(fresh).query)["state"][0]
    response = browser.callback(_with_state(used, state))
    assert_failure_page(response, 400, "refused to complete this sign-in")
    line = log_lines(sso.main, "code_refused")[-1]
    assert "invalid_grant" in line["detail"]


@pytest.mark.parametrize(
    ("tamper", "status", "reason", "words"),
    [
        ({"claims": {"aud": "other-app"}}, 401, "id_token_aud", "could not be trusted"),
        ({"claims": {"iss": "http://127.0.0.1:1"}}, 401, "id_token_iss", "could not be trusted"),
        ({"claims": {"nonce": "replayed"}}, 401, "id_token_nonce", "could not be trusted"),
        ({"expired": True}, 401, "id_token_expired", "had already expired"),
        ({"foreign_key": True}, 401, "id_token_unknown_key", "could not be trusted"),
    ],
)
def test_id_tokens_that_do_not_validate_are_refused(
    sso: Sso,
    browser: Browser,
    tamper: dict[str, Any],
    status: int,
    reason: str,
    words: str,
) -> None:
    account = person(sso)
    url = browser.to_callback(account)
    sso.idp.behave(tamper=tamper)
    assert_failure_page(browser.callback(url), status, words)
    line = log_lines(sso.main, "oidc_login_failed")[-1]
    assert line["reason"] == reason and line["level"] == "warning"
    logs = sso.main.logs()
    code = parse_qs(urlsplit(url).query)["code"][0]
    assert code not in logs and SECRET not in logs and "eyJ" not in logs
    assert not sso.owner.list_users(q=account.removeprefix("sub-")).users
    failures = [
        e
        for e in sso.owner.list_audit(action="user.login", limit=20).entries
        if e.details.get("reason") == reason
    ]
    assert failures and failures[0].status_code == status
    assert failures[0].details["method"] == "oidc" and failures[0].details["result"] == "failure"


def test_signing_keys_are_cached_and_refetched_when_they_rotate(sso: Sso) -> None:
    account = person(sso)

    def login() -> int:
        b = Browser(sso.main)
        try:
            return b.sign_in(account).status_code
        finally:
            b.close()

    assert login() == 303  # the keys are cached now
    sso.idp.behave(jwks_down=True)
    assert login() == 303  # the key endpoint blips: the cached keys serve
    sso.idp.behave()
    sso.idp.restart(rotate_keys=True)
    assert login() == 303  # a new kid: one refetch finds it
    assert "oidc_login_failed" not in "".join(
        line for line in sso.main.logs().splitlines()[-40:] if account in line
    )


def test_the_provider_down_during_login_is_a_502_page(sso: Sso, browser: Browser) -> None:
    url = browser.to_callback(person(sso))
    sso.idp.stop()
    text = assert_failure_page(browser.callback(url), 502, "could not reach the identity provider")
    assert "Try single sign-on again" in text
    line = log_lines(sso.main, "idp_unreachable")[-1]
    assert "token endpoint" in line["detail"] and "ConnectError" in line["detail"]
    sso.idp.start()


# --- role and group sync -------------------------------------------------------------


def test_roles_follow_the_identity_provider(sso: Sso) -> None:
    name = unique("rita")
    account = f"sub-{name}"
    sso.idp.set_account(
        account,
        email=f"{name}@corp.test",
        email_verified=True,
        preferred_username=name,
        roles=["stockade-templates", "stockade-audit", "unmapped"],
    )

    def login() -> dict[str, Any]:
        b = Browser(sso.main)
        try:
            assert b.sign_in(account).status_code == 303
            return b.me()
        finally:
            b.close()

    assert sorted(login()["roles"]) == ["auditor", "template-admin"]
    # A role the mapping does not name stays as an administrator set it.
    sso.owner.set_roles(name, ["auditor", "template-admin", "user-admin"])
    sso.idp.update_account(account, roles=["stockade-audit"])
    assert sorted(login()["roles"]) == ["auditor", "user-admin"]
    sso.idp.update_account(account, roles=[])
    assert login()["roles"] == ["user-admin"]
    synced = [e for e in audit_of(sso, "user.roles", name) if e.details.get("via") == "oidc"]
    assert [e.diff["roles"] for e in reversed(synced)] == [
        [[], ["auditor", "template-admin"]],
        [["auditor", "template-admin", "user-admin"], ["auditor", "user-admin"]],
        [["auditor", "user-admin"], ["user-admin"]],
    ]


def test_groups_follow_the_identity_provider_and_so_does_template_access(sso: Sso) -> None:
    name = unique("gus")
    account = f"sub-{name}"
    template = unique("opsbox")
    sso.owner.push_template(template, simple_archive(template))
    sso.owner.update_template_acl(template, groups={"everyone": None})
    sso.idp.set_account(
        account,
        email=f"{name}@corp.test",
        email_verified=True,
        preferred_username=name,
        groups=["idp-ops", "devs", "ignored-contractors"],
    )

    def login() -> Client:
        b = Browser(sso.main)
        try:
            assert b.sign_in(account).status_code == 303
            token = b.http.cookies["stockade_session"]
        finally:
            b.close()
        return Client(sso.main.url, token)

    with login():
        pass
    groups = {g.name: g for g in sso.owner.list_groups("default").groups}
    assert name in groups["ops"].members and name in groups["devs"].members
    assert groups["ops"].source == "oidc"
    assert "ignored-contractors" not in groups  # the regex filter
    sso.owner.update_template_acl(template, groups={"ops": "use"})
    with login() as member:
        assert template in [t.name for t in member.list_templates().templates]
    # Removed from the group at the provider: gone at the next login, and the template too.
    sso.idp.update_account(account, groups=["devs"])
    with login() as member:
        assert template not in [t.name for t in member.list_templates().templates]
    groups = {g.name: g for g in sso.owner.list_groups("default").groups}
    assert name not in groups["ops"].members and name in groups["devs"].members
    synced = sso.owner.list_audit(action="group.sync", actor=name, limit=10).entries
    assert synced and synced[0].details["removed"] == ["ops"]


# --- browser and CLI -------------------------------------------------------------------


def test_chromium_signs_in_with_the_sso_button(sso: Sso) -> None:
    from playwright.sync_api import Page, Route, sync_playwright

    from tests.conftest import require
    from tests.server.web.conftest import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS

    require("Chromium", Path(CHROMIUM).exists(), "apt-get install chromium")

    def shoot(page: Page, name: str) -> None:
        path = ARTIFACTS / "screenshots" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)

    account = person(sso)
    ours = {urlsplit(sso.main.url).netloc, urlsplit(sso.idp.issuer).netloc}
    outside: list[str] = []
    problems: list[str] = []

    def guard(route: Route) -> None:
        if urlsplit(route.request.url).netloc in ours:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 800})
            context.route("**/*", guard)
            page = context.new_page()
            page.on(
                "console",
                lambda msg: (
                    problems.append(msg.text)
                    if page.url.startswith(sso.main.url) and "Content Security Policy" in msg.text
                    else None
                ),
            )
            page.goto(sso.main.url + "/login")
            shoot(page, "sso-login-button")
            page.click(f"text={BUTTON}")
            page.wait_for_selector("input[name=login]")
            page.fill("input[name=login]", account)
            page.fill("input[name=password]", "any password")
            page.click("button[type=submit]")
            page.wait_for_selector("button[type=submit]")  # the consent page
            page.click("button[type=submit]")
            page.wait_for_url(re.compile(re.escape(sso.main.url) + r"/workspaces.*"))
            assert account.removeprefix("sub-") in page.inner_text("header")
            shoot(page, "sso-signed-in")
            page.goto(f"{sso.main.url}{CALLBACK}?state=stale&code=old")  # a stale bookmark
            assert "not started in this browser" in page.inner_text("main")
            shoot(page, "sso-error-page")
        finally:
            browser.close()
    assert not outside, outside
    assert not problems, problems


def test_stockade_login_sso_with_a_pasted_token(sso: Sso, browser: Browser, tmp_path: Path) -> None:
    account = person(sso)
    assert browser.sign_in(account, redirect="/cli-auth").headers["location"] == "/cli-auth"
    page = browser.http.get(sso.main.url + "/cli-auth")
    assert page.status_code == 200 and "Create a CLI token" in page.text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert csrf
    made = browser.http.post(
        sso.main.url + "/cli-auth",
        data={"csrf_token": csrf.group(1)},
        headers={"origin": sso.main.url},
    )
    assert made.status_code == 201, page_text(made)
    token = re.search(r'id="new-token">([^<]+)<', made.text)
    assert token
    env = {"STOCKADE_CONFIG_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [STOCKADE, "login", sso.main.url, "--sso"],
        input=token.group(1) + "\n", capture_output=True, text=True, env=env, timeout=60,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"{sso.main.url}/cli-auth" in done.stdout
    saved = json.loads((tmp_path / "session.json").read_text())
    assert saved == {"url": sso.main.url, "token": token.group(1)}
    with Client(saved["url"], saved["token"]) as cli:
        assert cli.me().username == account.removeprefix("sub-")
    bad = subprocess.run(
        [STOCKADE, "login", sso.main.url, "--token", "stk_not-a-token"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert bad.returncode != 0 and "that token was not accepted" in bad.stderr


@pytest.mark.postgres
def test_on_postgresql_too(sso: Sso, request: pytest.FixtureRequest) -> None:
    """The database work of a login (state used once, link, create, role
    sync with the last-owner guard) on PostgreSQL."""
    sso.pg.postgres_url = request.getfixturevalue("pg_cluster").create_database()
    sso.pg.extra_env = _oidc_env(
        sso.idp,
        STOCKADE_OIDC_USER_ROLE_FIELD="roles",
        STOCKADE_OIDC_USER_ROLE_MAPPING=json.dumps({"stockade-owners": ["owner"]}),
    )
    sso.pg.start()
    with Client(sso.pg.url) as owner:
        owner.create_first_user("owner", "owner@corp.test", OWNER_PASSWORD)
        owner.login("owner", OWNER_PASSWORD)
        name = unique("pat")
        owner.create_user(name, f"{name}@corp.test", PASSWORD)
        account = f"sub-{name}"
        sso.idp.set_account(
            account, email=f"{name}@corp.test", email_verified=True, roles=["stockade-owners"]
        )

        def login() -> tuple[Browser, dict[str, Any]]:
            b = Browser(sso.pg)
            url = b.to_callback(account)
            assert b.callback(url).status_code == 303
            state = parse_qs(urlsplit(url).query)["state"][0]
            replay = httpx.get(
                url,
                cookies={"stockade_oidc_state": state},
                headers={"accept": HTML},
                trust_env=False,
            )
            assert_failure_page(replay, 400, "already used")
            return b, b.me()

        b, me = login()
        b.close()
        assert me["username"] == name and me["login_type"] == "oidc" and me["roles"] == ["owner"]
        sso.idp.update_account(account, roles=[])
        b, me = login()
        b.close()
        assert me["roles"] == []  # the password owner remains: the role goes
        sso.idp.update_account(account, roles=["stockade-owners"])
        b, me = login()
        with Client(sso.pg.url, b.http.cookies["stockade_session"]) as pat:
            pat.suspend_user("owner")
        b.close()
        # Now the last active owner: the provider cannot take that away.
        sso.idp.update_account(account, roles=[])
        b, me = login()
        b.close()
        assert me["roles"] == ["owner"]
    assert "oidc_role_sync_kept_last_owner" in sso.pg.logs()
