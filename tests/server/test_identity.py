"""First-user setup, login, sessions, rate limits, API tokens, suspension."""

from __future__ import annotations

import httpx
import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client
from tests.conftest import (
    OWNER_PASSWORD,
    PASSWORD,
    ServerFactory,
    UserFactory,
    run_sql,
    unique,
)


def test_first_user_setup_happens_once(start_server: ServerFactory) -> None:
    server = start_server()
    with Client(server.url) as api:
        assert api.first_user_required() is True
        with pytest.raises(ApiError) as weak:
            api.create_first_user("boss", "boss@example.com", "short")
        assert weak.value.status == 400 and "at least 8 characters" in weak.value.message
        user = api.create_first_user("boss", "boss@example.com", OWNER_PASSWORD)
        assert user.roles == ["owner"]
        assert api.first_user_required() is False
        with pytest.raises(ApiError) as again:
            api.create_first_user("mallory", "m@example.com", OWNER_PASSWORD)
        assert again.value.status == 409
        assert "already exists" in again.value.message


def test_concurrent_first_user_requests_create_one_owner(start_server: ServerFactory) -> None:
    import concurrent.futures

    server = start_server()

    def attempt(i: int) -> int:
        body = {"username": f"first{i}", "email": f"f{i}@example.com", "password": OWNER_PASSWORD}
        return httpx.post(f"{server.url}/api/v2/users/first", json=body, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        codes = sorted(pool.map(attempt, range(8)))
    assert codes.count(201) == 1 and codes.count(409) == 7, codes


def test_login_errors_do_not_reveal_whether_the_user_exists(
    owner: Client, server: ServerProcess
) -> None:
    with Client(server.url) as api:
        with pytest.raises(ApiError) as unknown:
            api.login("nobody-here", "whatever-Pa55")
        with pytest.raises(ApiError) as wrong:
            api.login("owner", "wrong-Pa55word")
    assert unknown.value.status == wrong.value.status == 401
    assert unknown.value.message == wrong.value.message == "incorrect username or password"


def test_session_cookie_and_bearer_header(owner: Client, server: ServerProcess) -> None:
    response = httpx.post(
        f"{server.url}/api/v2/users/login",
        json={"username": "owner", "password": OWNER_PASSWORD},
    )
    assert response.status_code == 200
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=lax" in cookie and "secure" not in cookie
    token = response.json()["session_token"]
    by_cookie = httpx.get(f"{server.url}/api/v2/users/me", cookies={"stockade_session": token})
    by_header = httpx.get(
        f"{server.url}/api/v2/users/me", headers={"Authorization": f"Bearer {token}"}
    )
    assert by_cookie.json()["username"] == by_header.json()["username"] == "owner"
    assert "hashed_password" not in by_cookie.text


def test_logout_ends_the_session(make_user: UserFactory) -> None:
    client, _ = make_user()
    token = client.token
    client.logout()
    with Client(client.url, token) as stale, pytest.raises(ApiError) as denied:
        stale.me()
    assert denied.value.status == 401


def test_rate_limits_answer_429_with_retry_after(start_server: ServerFactory) -> None:
    server = start_server(
        env={"STOCKADE_LOGIN_RATE_PER_IP": "30", "STOCKADE_LOGIN_FAILURES_PER_USER": "3"}
    )
    with Client(server.url) as api:
        api.create_first_user("boss", "boss@example.com", OWNER_PASSWORD)
    body = {"username": "boss", "password": "wrong-Pa55word"}
    codes = [
        httpx.post(f"{server.url}/api/v2/users/login", json=body).status_code for _ in range(4)
    ]
    assert codes == [401, 401, 401, 429]
    limited = httpx.post(f"{server.url}/api/v2/users/login", json=body)
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) > 0
    assert "too many failed logins" in limited.json()["message"]
    # Another username from the same address is still allowed until the IP limit.
    # Other usernames from the same address: refused once the address has made
    # 30 attempts (5 of them above; refused attempts count too).
    codes = [
        httpx.post(
            f"{server.url}/api/v2/users/login",
            json={"username": f"someone{i}", "password": "wrong-Pa55word"},
        ).status_code
        for i in range(28)
    ]
    assert codes == [401] * 25 + [429] * 3
    last = httpx.post(f"{server.url}/api/v2/users/login", json={"username": "x", "password": "y"})
    assert "from your address" in last.json()["message"]


def test_password_policy_messages(owner: Client) -> None:
    name = unique("pw")
    cases = {
        "short": "at least 8 characters",
        "password123": "most common passwords",
        "aaaaaaaaaaaa": "too few different characters",
        f"{name}-Xyz123": "must not contain your username",
    }
    for password, message in cases.items():
        with pytest.raises(ApiError) as exc:
            owner.create_user(name, f"{name}@example.com", password)
        assert exc.value.status == 400 and message in exc.value.message, password


def test_api_tokens_lifecycle(owner: Client, make_user: UserFactory, server: ServerProcess) -> None:
    member, name = make_user()
    created = owner.create_token("ci", user=name, lifetime_seconds=3600)
    assert created.token and created.name == "ci"
    listed = owner.list_tokens(name)
    assert [t.name for t in listed] == ["ci"]
    assert (
        created.token
        not in httpx.get(
            f"{server.url}/api/v2/users/{name}/tokens",
            headers={"Authorization": f"Bearer {owner.token}"},
        ).text
    )
    with Client(server.url, created.token) as as_member:
        assert as_member.me().username == name
        assert as_member.list_tokens()[0].last_used_at is not None
        with pytest.raises(ApiError) as minted:
            as_member.create_token("from-a-token")
        assert minted.value.status == 403 and "signed-in session" in minted.value.message
        with pytest.raises(ApiError) as logout:
            as_member.logout()
        assert logout.value.status == 400 and "tokens revoke" in logout.value.message
        with pytest.raises(ApiError) as dup:
            member.create_token("ci")
        assert dup.value.status == 409
        with pytest.raises(ApiError) as too_long:
            member.create_token("long", lifetime_seconds=10**9)
        assert too_long.value.status == 400 and "maximum" in too_long.value.message
        member.revoke_token("ci")
        with pytest.raises(ApiError) as revoked:
            as_member.me()
        assert revoked.value.status == 401


def test_expired_token_is_rejected(
    make_user: UserFactory, server: ServerProcess, request: pytest.FixtureRequest
) -> None:
    member, _ = make_user()
    token = member.create_token("short", lifetime_seconds=60)
    past = (
        "CURRENT_TIMESTAMP - INTERVAL '1 second'"
        if server.postgres_url
        else "datetime('now', '-1 second')"
    )
    run_sql(server, request, f"UPDATE api_keys SET expires_at = {past} WHERE id = '{token.id}'")
    with Client(server.url, token.token) as api, pytest.raises(ApiError) as expired:
        api.me()
    assert expired.value.status == 401 and "expired" in expired.value.message


def test_suspended_user_is_locked_out_at_once(
    owner: Client, make_user: UserFactory, server: ServerProcess
) -> None:
    member, name = make_user()
    token = owner.create_token("t", user=name).token
    owner.suspend_user(name)
    for credential in (member.token, token):
        with Client(server.url, credential) as api, pytest.raises(ApiError) as denied:
            api.me()
        assert denied.value.status == 401 and "suspended" in denied.value.message
    with Client(server.url) as api, pytest.raises(ApiError) as login:
        api.login(name, PASSWORD)
    assert login.value.status == 403
    owner.activate_user(name)
    with Client(server.url, token) as api:
        assert api.me().status == "active"


def test_changing_password_ends_other_sessions(
    make_user: UserFactory, server: ServerProcess
) -> None:
    first, name = make_user()
    with Client(server.url) as second:
        second.login(name, PASSWORD)
        with pytest.raises(ApiError) as missing_old:
            first.change_password("me", "brand-New-pass-42")
        assert missing_old.value.status == 400 and "old_password" in missing_old.value.message
        first.change_password("me", "brand-New-pass-42", old_password=PASSWORD)
        assert first.me().username == name  # the session that changed it stays
        with pytest.raises(ApiError) as ended:
            second.me()
        assert ended.value.status == 401
        second.login(name, "brand-New-pass-42")


def test_sessions_slide_and_tokens_do_not(
    make_user: UserFactory, server: ServerProcess, request: pytest.FixtureRequest
) -> None:
    member, _ = make_user()
    token = member.create_token("fixed", lifetime_seconds=3600)
    session_id = (member.token or "").split("-")[0]
    # Pretend both were last used two minutes ago and expire in five.
    for key_id in (session_id, token.id):
        run_sql(
            server,
            request,
            "UPDATE api_keys SET last_used_at = CURRENT_TIMESTAMP - INTERVAL '2 minutes', "
            "expires_at = CURRENT_TIMESTAMP + INTERVAL '5 minutes' "
            f"WHERE id = '{key_id}'"
            if server.postgres_url
            else "UPDATE api_keys SET last_used_at = datetime('now', '-2 minutes'), "
            f"expires_at = datetime('now', '+5 minutes') WHERE id = '{key_id}'",
        )
    member.me()
    with Client(server.url, token.token) as api:
        api.me()
        fixed = next(t for t in api.list_tokens() if t.name == "fixed")
    session_expiry = _expiry(server, request, session_id)
    assert session_expiry > 23 * 3600  # slid forward to a full day from now
    assert fixed.last_used_at is not None
    assert (fixed.expires_at - fixed.last_used_at).total_seconds() < 6 * 60  # tokens never slide


def _expiry(server: ServerProcess, request: pytest.FixtureRequest, key_id: str) -> float:
    """Seconds until the key expires, read from the database."""
    import asyncio
    import sqlite3
    from datetime import UTC, datetime

    if server.postgres_url:
        import asyncpg

        async def read() -> datetime:
            conn = await asyncpg.connect(server.postgres_url)
            value = await conn.fetchval("SELECT expires_at FROM api_keys WHERE id = $1", key_id)
            await conn.close()
            return value  # type: ignore[no-any-return]

        expires = asyncio.run(read())
    else:
        with sqlite3.connect(server.data_dir / "stockade.db") as db:
            (text,) = db.execute(
                "SELECT expires_at FROM api_keys WHERE id = ?", (key_id,)
            ).fetchone()
        expires = datetime.fromisoformat(text).replace(tzinfo=UTC)
    return (expires - datetime.now(UTC)).total_seconds()


def test_revoke_prefers_the_token_id_over_a_same_named_token(make_user: UserFactory) -> None:
    member, _ = make_user()
    first = member.create_token("first")
    impostor = member.create_token(first.id)  # named like the first one's id
    member.revoke_token(first.id)
    assert [t.id for t in member.list_tokens()] == [impostor.id]
    member.revoke_token(first.id)  # now only the name matches
    assert member.list_tokens() == []


def test_path_parameters_stay_one_segment(owner: Client) -> None:
    # Unquoted, this would have been GET /api/v2/audit (a 200 for an owner).
    with pytest.raises(ApiError) as odd:
        owner.get_user("a/../../audit")
    assert odd.value.status == 404


def test_the_browser_cookie_slides_with_the_session(
    make_user: UserFactory, server: ServerProcess, request: pytest.FixtureRequest
) -> None:
    _, name = make_user()
    login = httpx.post(
        f"{server.url}/api/v2/users/login", json={"username": name, "password": PASSWORD}
    )
    token = login.json()["session_token"]
    assert "Max-Age=86400" in login.headers["set-cookie"]
    fresh = httpx.get(f"{server.url}/api/v2/users/me", cookies={"stockade_session": token})
    assert "set-cookie" not in fresh.headers  # used within the minute: nothing to slide
    two_minutes_ago = (
        "CURRENT_TIMESTAMP - INTERVAL '2 minutes'"
        if server.postgres_url
        else "datetime('now', '-2 minutes')"
    )
    key_id = token.split("-")[0]
    run_sql(
        server,
        request,
        f"UPDATE api_keys SET last_used_at = {two_minutes_ago} WHERE id = '{key_id}'",
    )
    slid = httpx.get(f"{server.url}/api/v2/users/me", cookies={"stockade_session": token})
    cookie = slid.headers["set-cookie"]
    assert cookie.startswith(f"stockade_session={token}") and "Max-Age=86400" in cookie
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    # A bearer client gets no cookie it did not ask for.
    run_sql(
        server,
        request,
        f"UPDATE api_keys SET last_used_at = {two_minutes_ago} WHERE id = '{key_id}'",
    )
    bearer = httpx.get(
        f"{server.url}/api/v2/users/me", headers={"Authorization": f"Bearer {token}"}
    )
    assert "set-cookie" not in bearer.headers


def test_old_password_guesses_share_the_login_budget(start_server: ServerFactory) -> None:
    server = start_server(env={"STOCKADE_LOGIN_FAILURES_PER_USER": "3"})
    with Client(server.url) as api:
        api.create_first_user("boss", "boss@example.com", OWNER_PASSWORD)
        api.login("boss", OWNER_PASSWORD)
        codes = []
        for _ in range(4):
            try:
                api.change_password("me", "Brand-New-Pass-9", old_password="guess-Number-1")
            except ApiError as exc:
                codes.append(exc.status)
        assert codes == [400, 400, 400, 429]
    with Client(server.url) as other, pytest.raises(ApiError) as login:
        other.login("boss", OWNER_PASSWORD)  # the account's budget is spent for logins too
    assert login.value.status == 429
