"""Sign-in pages, the account page, and what every page shares: CSRF, the
Origin check, the CSP and the HTML error pages."""

from __future__ import annotations

import re

import httpx

from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from tests.conftest import OWNER_PASSWORD, ServerFactory, unique
from tests.server.web.conftest import Chromium, WebClient

SQLITE_ONLY = "pages call the same services the API tests cover on both databases"
CSP = "default-src 'self'"


def test_first_user_setup_login_and_logout(start_server: ServerFactory) -> None:
    server = start_server()
    web = WebClient(server)
    try:
        assert web.get("/").headers["location"] == "/setup"
        assert web.get("/login").headers["location"] == "/setup"
        form = {"username": "boss", "email": "boss@example.com", "name": "The Boss"}
        differ = web.post("/setup", {**form, "password": OWNER_PASSWORD, "password_again": "x"})
        assert differ.status_code == 400
        assert "Type the same password twice." in differ.text
        assert 'value="boss@example.com"' in differ.text  # what was typed stays
        weak = web.post("/setup", {**form, "password": "password", "password_again": "password"})
        assert weak.status_code == 400 and 'class="error"' in weak.text
        bad_name = web.post(
            "/setup",
            {**form, "username": "No Spaces", "password": OWNER_PASSWORD,
             "password_again": OWNER_PASSWORD},
        )  # fmt: skip
        assert bad_name.status_code == 400 and "lowercase letters" in bad_name.text
        with Client(server.url) as anonymous:
            assert anonymous.first_user_required()  # nothing was created

        done = web.post("/setup", {**form, "password": OWNER_PASSWORD,
                                   "password_again": OWNER_PASSWORD})  # fmt: skip
        assert done.status_code == 303 and done.headers["location"] == "/login"
        assert "ready" in web.get("/login").text  # the one-time notice
        assert "ready" not in web.get("/login").text
        assert web.get("/setup").headers["location"] == "/login"
        again = web.post("/setup", {**form, "password": OWNER_PASSWORD,
                                    "password_again": OWNER_PASSWORD})  # fmt: skip
        assert again.status_code in (403, 409) and "<html" in again.text

        # Signed out, a page sends to the login form and back afterwards.
        account = web.get("/account?tab=tokens")
        assert account.status_code == 303
        assert account.headers["location"] == "/login?next=%2Faccount%3Ftab%3Dtokens"
        wrong = web.post("/login", {"username": "boss", "password": "Wrong-Password-1"}, csrf=False)
        assert wrong.status_code == 401 and "Incorrect username or password" in wrong.text
        assert "stockade_session" not in web.http.cookies
        signed_in = web.post(
            "/login",
            {"username": "boss", "password": OWNER_PASSWORD, "next": "/account?tab=tokens"},
            csrf=False,
        )
        assert signed_in.status_code == 303
        assert signed_in.headers["location"] == "/account?tab=tokens"
        assert "HttpOnly" in signed_in.headers["set-cookie"]
        page = web.get("/account")
        assert page.status_code == 200 and "boss@example.com" in page.text

        # Logging out needs the form's token; without it nothing happens.
        refused = web.post("/logout", {"csrf_token": "forged"})
        assert refused.status_code == 403 and "expired" in refused.text
        assert web.get("/account").status_code == 200
        out = web.post("/logout")
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert web.get("/account").status_code == 303  # the session is gone server-side
    finally:
        web.close()


def test_login_redirects_only_to_local_pages(web: WebClient, server: ServerProcess) -> None:
    other = WebClient(server)
    try:
        for target in ("//evil.example/x", "https://evil.example/", "/\\evil.example", "account"):
            response = other.post(
                "/login", {"username": "owner", "password": OWNER_PASSWORD, "next": target},
                csrf=False,
            )  # fmt: skip
            assert response.status_code == 303
            assert response.headers["location"] == "/workspaces", target
    finally:
        other.close()


def test_api_tokens_are_shown_once_and_can_be_revoked(
    web: WebClient, server: ServerProcess
) -> None:
    name = unique("tok")
    created = web.post("/account/tokens", {"name": name, "days": "2"})
    assert created.status_code == 201
    secret = re.search(r'<code class="copy" id="new-token">([^<]+)</code>', created.text)
    assert secret, created.text
    with Client(server.url, token=secret.group(1)) as client:
        assert client.me().username == "owner"
    listed = web.get("/account")
    assert name in listed.text and secret.group(1) not in listed.text  # never shown again

    duplicate = web.post("/account/tokens", {"name": name})
    assert duplicate.status_code == 409 and "already has a token named" in duplicate.text
    days = web.post("/account/tokens", {"name": unique("tok"), "days": "soon"})
    assert days.status_code == 400 and "Days must be a whole number" in days.text
    too_long = web.post("/account/tokens", {"name": unique("tok"), "days": "100000"})
    assert too_long.status_code == 400 and "Days must be a whole number" in too_long.text
    bad_name = web.post("/account/tokens", {"name": "no spaces"})
    assert bad_name.status_code == 400 and 'aria-invalid="true"' in bad_name.text

    ids = re.findall(r'action="/account/tokens/([^/"]+)/delete"', listed.text)
    assert ids
    for token in ids:
        assert web.post(f"/account/tokens/{token}/delete").status_code == 303
    assert name not in web.get("/account").text
    with httpx.Client(base_url=server.url, trust_env=False) as http:
        response = http.get(
            "/api/v2/users/me", headers={"authorization": f"Bearer {secret.group(1)}"}
        )
        assert response.status_code == 401
    gone = web.post("/account/tokens/no-such-token/delete")
    assert gone.status_code == 404 and "no token" in gone.text


def test_password_change_errors_are_shown_in_place(web: WebClient) -> None:
    differ = web.post(
        "/account/password",
        {"old_password": OWNER_PASSWORD, "password": "A-New-Pass-1234", "password_again": "other"},
    )
    assert differ.status_code == 400 and "Type the same password twice." in differ.text
    wrong_old = web.post(
        "/account/password",
        {"old_password": "Not-My-Password-9", "password": "A-New-Pass-1234",
         "password_again": "A-New-Pass-1234"},
    )  # fmt: skip
    assert 400 <= wrong_old.status_code < 500 and 'class="error"' in wrong_old.text


def test_cross_site_posts_are_refused(web: WebClient, server: ServerProcess, owner: Client) -> None:
    name = unique("tok")
    forged = web.http.post(
        "/account/tokens",
        data={"name": name, "csrf_token": web.csrf},
        headers={"origin": "http://evil.example"},
    )
    assert forged.status_code == 403 and "not from this site" in forged.json()["message"]
    # The API with the session cookie: the same rule.
    api = web.http.post(
        "/api/v2/users/owner/tokens", json={"name": name}, headers={"origin": "http://evil.example"}
    )
    assert api.status_code == 403
    assert name not in web.get("/account").text
    # A bearer token is no ambient credential: its Origin does not matter.
    with httpx.Client(base_url=server.url, trust_env=False) as http:
        response = http.get(
            "/api/v2/users/me",
            headers={"authorization": f"Bearer {owner.token}", "origin": "http://evil.example"},
        )
        assert response.status_code == 200


def test_every_response_carries_the_csp_and_errors_are_pages(web: WebClient) -> None:
    for path, status, kind in (
        ("/login", 303, ""),
        ("/account", 200, "text/html"),
        ("/static/css/stockade.css", 200, "text/css"),
        ("/static/vendor/htmx-2.0.11/htmx.min.js", 200, "javascript"),
        ("/api/v2/buildinfo", 200, "application/json"),
        ("/no/such/page", 404, "text/html"),
        ("/api/v2/no-such-route", 404, "application/json"),
    ):
        response = web.get(path)
        assert response.status_code == status, path
        assert kind in response.headers.get("content-type", ""), path
        assert response.headers["content-security-policy"].startswith(CSP), path
        assert response.headers["x-content-type-options"] == "nosniff"
    missing = web.get("/no/such/page")
    assert "There is no page at this address." in missing.text and "<nav" in missing.text


def test_sign_in_and_account_in_chromium(chromium: Chromium) -> None:
    page = chromium.page
    page.goto(chromium.base_url + "/account")
    page.fill("#f-name", unique("tok"))
    page.click("text=Create token")
    assert page.locator("#new-token").inner_text().strip()
    chromium.screenshot("account")
    page.click("text=Sign out")
    page.wait_for_url("**/login")
    page.fill("#f-username", "owner")
    page.fill("#f-password", "wrong-password-here")
    page.click("button[type=submit]")
    assert "Incorrect username or password" in page.locator("[role=alert]").inner_text()
    chromium.screenshot("login")

    # By keyboard alone: the login form has the focus, Tab moves on, Enter sends.
    page.goto(chromium.base_url + "/login")
    assert page.evaluate("document.activeElement.id") == "f-username"
    page.keyboard.type("owner")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "f-password"
    page.keyboard.type(OWNER_PASSWORD)
    page.keyboard.press("Enter")
    page.wait_for_url("**/workspaces")
    # On every page the first Tab reaches the link that skips the navigation.
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"

    # Dark by the system's preference: the same page, other colours.
    light = page.evaluate("getComputedStyle(document.body).backgroundColor")
    page.emulate_media(color_scheme="dark")
    dark = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert light != dark, (light, dark)
    page.goto(chromium.base_url + "/account")
    chromium.screenshot("account-dark")
