"""The audit log: what is recorded, who may read it, tamper evidence, export,
retention."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client
from stockade.server.audit import service as audit
from stockade.server.db import AuditEntry, Database, migrate
from stockade.server.db.models import utcnow
from tests.conftest import (
    OWNER_PASSWORD,
    PASSWORD,
    ServerFactory,
    UserFactory,
    run_sql,
    unique,
)


def test_actions_are_recorded_with_actor_ip_and_redacted_diff(
    owner: Client, server: ServerProcess
) -> None:
    name = unique("aud")
    user = owner.create_user(name, f"{name}@example.com", PASSWORD, roles=["auditor"])
    entry = owner.list_audit(action="user.create", resource_id=user.id).entries[0]
    assert entry.username == "owner" and entry.ip == "127.0.0.1"
    assert entry.status_code == 201 and entry.resource_name == name
    assert entry.diff["roles"] == [None, ["auditor"]]
    assert entry.diff["password"] == ["[redacted]", "[redacted]"]
    assert entry.request_id and entry.user_agent and entry.user_agent.startswith("python-httpx")
    assert PASSWORD not in json.dumps(entry.model_dump(mode="json"))


def test_login_attempts_are_recorded_success_and_failure(
    owner: Client, make_user: UserFactory, server: ServerProcess
) -> None:
    _, name = make_user()
    with Client(server.url) as api, pytest.raises(ApiError):
        api.login(name, "not-the-Password-1")
    # A failed login has no actor (nobody proved who they are): it is found by
    # the account it was against.
    entries = [
        e
        for e in owner.list_audit(action="user.login", limit=50).entries
        if e.resource_name == name
    ]
    results = [(e.details.get("result"), e.status_code) for e in entries]
    assert ("failure", 401) in results and ("success", 200) in results
    failed = next(e for e in entries if e.status_code == 401)
    assert (
        failed.details["username"] == name and "not-the-Password-1" not in failed.model_dump_json()
    )
    unknown = owner.list_audit(action="user.login", limit=50).entries
    with Client(server.url) as api, pytest.raises(ApiError):
        api.login("ghost-user", "x-Password-1")
    newest = owner.list_audit(action="user.login", limit=1).entries[0]
    assert newest.details == {"username": "ghost-user", "result": "failure"}
    assert newest.user_id is None and len(unknown) >= 1


def test_only_owner_and_auditor_read_the_log(make_user: UserFactory) -> None:
    for role in ("auditor", "owner"):
        client, _ = make_user(role)
        assert client.list_audit(limit=1).count >= 1
        assert client.verify_audit().ok
    for roles in ((), ("user-admin",), ("template-admin",)):
        client, _ = make_user(*roles)
        for call in (client.list_audit, client.verify_audit):
            with pytest.raises(ApiError) as denied:
                call()
            assert denied.value.status == 403
        with pytest.raises(ApiError) as export_denied:
            list(client.export_audit())
        assert export_denied.value.status == 403


def test_filters_and_export(owner: Client, make_user: UserFactory) -> None:
    _, name = make_user()
    before = utcnow() - timedelta(seconds=1)
    owner.suspend_user(name)
    owner.activate_user(name)
    recent = owner.list_audit(resource_type="user", since=before.isoformat(), limit=100)
    actions = [
        e.action
        for e in recent.entries
        if e.resource_name == name and e.action in ("user.suspend", "user.activate")
    ]
    assert actions == ["user.activate", "user.suspend"]  # newest first
    assert owner.list_audit(actor="owner", action="user.suspend", limit=1).entries
    assert owner.list_audit(since=(utcnow() + timedelta(days=1)).isoformat()).count == 0
    exported = list(owner.export_audit(action="user.suspend"))
    assert exported and all(e.action == "user.suspend" for e in exported)
    assert [e.seq for e in exported] == sorted(e.seq for e in exported)  # oldest first


@pytest.mark.parametrize("tampering", ["edit", "delete", "truncate_tail"])
def test_verify_names_the_tampered_entry(
    start_server: ServerFactory, request: pytest.FixtureRequest, tampering: str
) -> None:
    server = start_server()
    with Client(server.url) as api:
        api.create_first_user("boss", "boss@example.com", OWNER_PASSWORD)
        api.login("boss", OWNER_PASSWORD)
        for i in range(3):
            api.create_user(f"staff{i}", f"staff{i}@example.com", PASSWORD)
        assert api.verify_audit().ok
        entries = api.list_audit().entries
        victim = next(e for e in entries if e.resource_name == "staff1")
        if tampering == "edit":
            run_sql(
                server,
                request,
                f"UPDATE audit_log SET username = 'mallory' WHERE seq = {victim.seq}",
            )
        elif tampering == "delete":
            run_sql(server, request, f"DELETE FROM audit_log WHERE seq = {victim.seq}")
        else:
            run_sql(server, request, f"DELETE FROM audit_log WHERE seq >= {victim.seq}")
        result = api.verify_audit()
    assert not result.ok and result.first_bad_seq == victim.seq + (tampering == "delete")
    if tampering == "edit":
        assert result.first_bad_id == victim.id
        assert f"entry {victim.seq} was modified" in (result.problem or "")
    elif tampering == "delete":
        assert f"entries {victim.seq}..{victim.seq}" in (result.problem or "")
    else:
        assert "newest entries were deleted" in (result.problem or "")


KEY = b"test-audit-key"


@pytest.fixture
async def database(empty_database: Database) -> Database:
    await migrate.upgrade(empty_database)
    return empty_database


async def test_retention_purge_keeps_the_rest_verifiable(database: Database) -> None:
    now = utcnow()
    async with database.transaction() as session:
        for age_days in (40, 35, 31, 10, 1):
            await audit.append(
                session,
                key=KEY,
                action="test.event",
                status_code=200,
                when=now - timedelta(days=age_days),
            )
    assert (await audit.verify(database, key=KEY)).ok
    assert await audit.purge(database, key=KEY, older_than_days=30, now=now) == 3
    result = await audit.verify(database, key=KEY)
    assert result.ok and result.checked == 3  # two kept entries and the purge record
    rows, _ = await audit.list_entries(database, audit.AuditFilter(), limit=10, offset=0)
    assert [r.action for r in rows] == ["audit.purge", "test.event", "test.event"]
    assert rows[0].details["purged"] == 3 and rows[0].details["anchor_seq"] == 3
    assert await audit.purge(database, key=KEY, older_than_days=30, now=now) == 0

    # Deleting the oldest remaining entry, as a purge would but without one, shows.
    async with database.transaction() as session:
        from sqlalchemy import delete

        await session.execute(delete(AuditEntry).where(AuditEntry.seq == 4))
    broken = await audit.verify(database, key=KEY)
    assert not broken.ok and broken.first_bad_seq == 5


async def test_concurrent_appends_keep_one_chain(database: Database) -> None:
    import asyncio

    async def one(i: int) -> None:
        await audit.write_record(database, audit.AuditRecord(action=f"test.{i}"), 200, key=KEY)

    await asyncio.gather(*(one(i) for i in range(40)))
    result = await audit.verify(database, key=KEY)
    assert result.ok and result.checked == 40


def test_retention_setting_purges_at_start(start_server: ServerFactory) -> None:
    server = start_server(env={"STOCKADE_AUDIT_RETENTION_DAYS": "30"})
    with Client(server.url) as api:
        api.create_first_user("boss", "boss@example.com", OWNER_PASSWORD)
        api.login("boss", OWNER_PASSWORD)
        health = httpx.get(
            f"{server.url}/api/v2/debug/health", headers={"Authorization": f"Bearer {api.token}"}
        ).json()
        assert health["workers"]["audit_retention"]["alive"] is True
        assert api.verify_audit().ok


def test_requests_refused_before_a_handler_are_recorded_by_route(
    owner: Client, make_user: UserFactory, server: ServerProcess
) -> None:
    member, _ = make_user()
    with pytest.raises(ApiError):
        member.create_user(unique("x"), "x@example.com", PASSWORD)
    long_path = "/api/v2/" + "x" * 300
    assert httpx.post(server.url + long_path, json={}).status_code == 404
    entries = owner.list_audit(limit=20).entries
    refused = next(e for e in entries if e.action == "POST /api/v2/users")
    assert refused.status_code == 403 and refused.user_id == member.me().id
    unmatched = next(e for e in entries if e.action == "POST unmatched")
    assert unmatched.status_code == 404 and unmatched.details["path"] == long_path[:256]


async def test_rewriting_history_needs_the_key(database: Database) -> None:
    """Someone who can write the database but not read the key recomputes an
    edited entry's hash and the next entry's link: the chain still breaks."""
    from sqlalchemy import select, update

    for i in range(3):
        await audit.write_record(database, audit.AuditRecord(action=f"test.{i}"), 200, key=KEY)
    async with database.transaction() as session:
        second = (await session.execute(select(AuditEntry).where(AuditEntry.seq == 2))).scalar_one()
        fields = {**audit.row_fields(second), "username": "mallory"}
        forged = audit.entry_hash(fields, b"a guessed key")
        await session.execute(
            update(AuditEntry).where(AuditEntry.seq == 2).values(username="mallory", hash=forged)
        )
        await session.execute(
            update(AuditEntry).where(AuditEntry.seq == 3).values(prev_hash=forged)
        )
    result = await audit.verify(database, key=KEY)
    assert not result.ok and result.first_bad_seq == 2
    assert "modified" in (result.problem or "")
