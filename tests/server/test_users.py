"""User accounts: create, list, search, roles, status, delete."""

from __future__ import annotations

import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client
from tests.conftest import OWNER_PASSWORD, PASSWORD, ServerFactory, UserFactory, unique


def test_create_show_and_conflicts(owner: Client) -> None:
    name = unique("new")
    user = owner.create_user(name, f"{name}@Example.com", PASSWORD, name="New Person")
    assert user.email == f"{name}@example.com" and user.roles == [] and user.status == "active"
    assert owner.get_user(name).id == owner.get_user(user.id).id == user.id
    for username, email, fragment in (
        (name, f"other-{name}@example.com", "username is already taken"),
        (unique("x"), f"{name}@example.com", "email is already taken"),
        ("me", "me@example.com", "reserved"),
        ("Bad_Name", "b@example.com", "lowercase letters, digits and hyphens"),
    ):
        with pytest.raises(ApiError) as exc:
            owner.create_user(username, email, PASSWORD)
        assert exc.value.status in (400, 409) and fragment in exc.value.message


def test_list_pages_and_search(owner: Client) -> None:
    prefix = unique("pg")
    for i in range(5):
        owner.create_user(f"{prefix}-{i}", f"{prefix}-{i}@example.com", PASSWORD, name=f"Page {i}")
    found = owner.list_users(q=prefix, limit=2)
    assert found.count == 5 and [u.username for u in found.users] == [f"{prefix}-0", f"{prefix}-1"]
    second = owner.list_users(q=prefix, limit=2, offset=2)
    assert [u.username for u in second.users] == [f"{prefix}-2", f"{prefix}-3"]
    assert owner.list_users(q=f"{prefix}-4@example").count == 1
    owner.suspend_user(f"{prefix}-3")
    assert [u.username for u in owner.list_users(q=prefix, status="suspended").users] == [
        f"{prefix}-3"
    ]


def test_members_see_only_themselves(make_user: UserFactory, owner: Client) -> None:
    member, name = make_user()
    assert member.me().username == name
    assert member.get_user(name).username == name
    with pytest.raises(ApiError) as other:
        member.get_user("owner")
    with pytest.raises(ApiError) as ghost:
        member.get_user("no-such-user")
    assert other.value.status == ghost.value.status == 404
    assert other.value.message.replace("owner", "X") == ghost.value.message.replace(
        "no-such-user", "X"
    )
    with pytest.raises(ApiError) as listing:
        member.list_users()
    assert listing.value.status == 403


def test_user_admin_limits(make_user: UserFactory, owner: Client) -> None:
    admin, _ = make_user("user-admin")
    _, target = make_user()
    assert admin.set_roles(target, ["template-admin"]).roles == ["template-admin"]
    # Only owners grant owner, user-admin and auditor: a user-admin must not be
    # able to hand itself (or a friend) the audit log.
    for roles in (["owner"], ["auditor"], ["user-admin"]):
        with pytest.raises(ApiError) as refused:
            admin.set_roles(target, roles)  # type: ignore[arg-type]
        assert refused.value.status == 403 and roles[0] in refused.value.message
    with pytest.raises(ApiError) as itself:
        admin.set_roles("me", ["user-admin", "auditor"])
    assert itself.value.status == 403
    for action in (
        lambda: admin.suspend_user("owner"),
        lambda: admin.change_password("owner", "Totally-New-99"),
        lambda: admin.delete_user("owner"),
    ):
        with pytest.raises(ApiError) as exc:
            action()
        assert exc.value.status == 403 and "cannot change owner" in exc.value.message
    admin.change_password(target, "Reset-By-Admin-5")
    with pytest.raises(ApiError) as own_create:
        admin.create_user(unique("o"), f"{unique('o')}@example.com", PASSWORD, roles=["owner"])
    assert own_create.value.status == 403


def test_no_one_changes_their_own_roles_or_status(start_server: ServerFactory) -> None:
    server: ServerProcess = start_server()
    with Client(server.url) as api:
        api.create_first_user("boss", "boss@example.com", OWNER_PASSWORD)
        api.login("boss", OWNER_PASSWORD)
        with pytest.raises(ApiError) as demote:
            api.set_roles("boss", [])
        assert demote.value.status == 403 and "your own roles" in demote.value.message
        with pytest.raises(ApiError) as self_suspend:
            api.suspend_user("boss")
        assert self_suspend.value.status == 400 and "yourself" in self_suspend.value.message
        api.create_user("heir", "heir@example.com", PASSWORD, roles=["owner"])
        with Client(server.url) as heir:
            heir.login("heir", PASSWORD)
            assert heir.set_roles("boss", []).roles == []  # allowed: heir is an owner
            with pytest.raises(ApiError) as own:
                heir.set_roles("heir", ["owner", "auditor"])
            assert own.value.status == 403 and "your own roles" in own.value.message


def test_delete_removes_user_and_tokens(
    owner: Client, make_user: UserFactory, server: ServerProcess
) -> None:
    member, name = make_user()
    token = member.create_token("mine").token
    owner.delete_user(name)
    with pytest.raises(ApiError) as gone:
        owner.get_user(name)
    assert gone.value.status == 404
    with Client(server.url, token) as api, pytest.raises(ApiError) as denied:
        api.me()
    assert denied.value.status == 401
    with pytest.raises(ApiError) as self_delete:
        owner.delete_user("owner")
    assert self_delete.value.status == 400
