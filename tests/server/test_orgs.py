"""Organizations, groups and template ACLs through the API: who sees which
templates and workspaces, what each role may change, and the refusals."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from stockade.sdk import ApiError, Client
from stockade.server.db import Database
from stockade.server.db.migrate import alembic_config
from tests.builds import wait_for_build
from tests.conftest import UserFactory, unique
from tests.server.test_templates import simple_archive


def refused(call: Callable[[], object], status: int, text: str = "") -> ApiError:
    with pytest.raises(ApiError) as exc:
        call()
    assert exc.value.status == status, (exc.value.status, exc.value.message)
    assert text in exc.value.message, exc.value.message
    return exc.value


def names(client: Client, org: str | None = None) -> set[str]:
    return {t.name for t in client.list_templates(org=org).templates}


def test_a_user_of_org_a_sees_nothing_of_org_b(make_user: UserFactory, owner: Client) -> None:
    inside, inside_name = make_user()
    outside, _ = make_user()
    org = unique("org")
    created = owner.create_organization(org, display_name="Team B")
    assert not created.is_default and created.display_name == "Team B"
    owner.set_member(org, inside_name)
    template = unique("tb")
    owner.push_template(template, simple_archive(template), org=org)

    # A member sees it (a new template is open to its organization's everyone group).
    assert template in names(inside)
    assert inside.get_template(template).organization == org
    assert org in {o.name for o in inside.list_organizations().organizations}
    # Someone else: 404 everywhere, exactly as for what does not exist.
    assert template not in names(outside)
    assert org not in {o.name for o in outside.list_organizations().organizations}
    missing = refused(lambda: outside.get_template(template), 404)
    assert refused(lambda: outside.get_template(unique("nope")), 404).reason == missing.reason
    refused(lambda: outside.get_template(template, org=org), 404, "organization")
    refused(lambda: outside.get_organization(org), 404)
    refused(lambda: outside.list_groups(org), 404)
    refused(lambda: outside.list_members(org), 404)
    refused(lambda: outside.template_acl(template, org=org), 404)
    refused(lambda: outside.create_workspace(unique("w"), template), 404, "template")
    refused(lambda: outside.create_workspace(unique("w"), template, org=org), 404)
    # Pushing the same name lands in the default organization, not in B's template.
    refused(lambda: outside.push_template(template, simple_archive(template)), 403, "create")
    assert owner.list_template_versions(template, org=org)[-1].number == 1


def test_template_acl_follows_groups(make_user: UserFactory, owner: Client) -> None:
    dev, dev_name = make_user()
    other, other_name = make_user()
    group = unique("devs")
    owner.create_group("default", group, members=[dev_name])
    template = unique("acl")
    owner.push_template(template, simple_archive(template))
    acl = owner.template_acl(template)
    assert [(g.name, g.role) for g in acl.groups] == [("everyone", "use")]

    acl = owner.update_template_acl(template, groups={"everyone": None, group: "use"})
    assert [(g.name, g.role) for g in acl.groups] == [(group, "use")]
    assert template in names(dev) and template not in names(other)
    refused(lambda: other.get_template(template), 404)
    # Users see the ACL only as its admins; a user entry grants it too.
    refused(lambda: dev.template_acl(template), 403)
    owner.update_template_acl(template, users={other_name: "use"})
    assert template in names(other)
    owner.update_template_acl(template, users={other_name: None})
    assert template not in names(other)

    # The group's member builds from it; dropped from the group, they lose it:
    # no new workspace, no start of the one they have, but stop still works.
    ws = unique("w")
    dev.create_workspace(ws, template)
    wait_for_build(dev, dev_name, ws, 1, ("succeeded", "failed"))
    owner.update_group("default", group, remove=[dev_name])
    assert template not in names(dev)
    refused(lambda: dev.create_workspace(unique("w"), template), 404)
    refused(lambda: dev.create_build(dev_name, ws, "start"), 403, "may no longer use")
    stop = dev.create_build(dev_name, ws, "stop")
    wait_for_build(dev, dev_name, ws, stop.number, ("succeeded",))
    assert dev.get_workspace(dev_name, ws).organization == "default"

    # An ACL admin administers that template only.
    owner.update_template_acl(template, users={dev_name: "admin"})
    assert dev.push_template(template, simple_archive(template)).number == 2
    assert {u.username: u.role for u in dev.template_acl(template).users} == {dev_name: "admin"}
    refused(lambda: dev.push_template(unique("new"), simple_archive("x")), 403)
    dev.archive_template(template)
    assert template in {t.name for t in dev.list_templates(include_archived=True).templates}
    assert template not in names(other)


def test_org_admins_run_their_organization_only(make_user: UserFactory, owner: Client) -> None:
    admin, admin_name = make_user()
    member, member_name = make_user()
    org, elsewhere = unique("org"), unique("org")
    owner.create_organization(org)
    owner.create_organization(elsewhere)
    assert owner.set_member(org, admin_name, ["org-admin"]).roles == ["org-admin"]
    refused(lambda: admin.create_organization(unique("org")), 403)
    refused(lambda: admin.get_organization(elsewhere), 404)

    # Members and groups of their organization.
    admin.set_member(org, member_name)
    group = admin.create_group(org, "platform", members=[member_name])
    assert group.members == [member_name] and group.source == "manual"
    assert {m.username for m in admin.list_members(org).members} == {admin_name, member_name}
    refused(lambda: member.create_group(org, "mine"), 403, "admins")
    refused(lambda: member.set_member(org, member_name, ["org-admin"]), 403)
    # Templates in their organization, and the workspaces made from them.
    template = unique("ot")
    admin.push_template(template, simple_archive(template), org=org)
    refused(lambda: admin.push_template(unique("x"), simple_archive("x")), 403)
    ws = unique("w")
    member.create_workspace(ws, template)
    assert ws in {w.name for w in admin.list_workspaces().workspaces}
    wait_for_build(admin, member_name, ws, 1, ("succeeded", "failed"))
    build = admin.create_build(member_name, ws, "stop")
    wait_for_build(admin, member_name, ws, build.number, ("succeeded",))
    # The default organization's workspaces are not theirs to see.
    mine = unique("w")
    default_template = unique("dt")
    owner.push_template(default_template, simple_archive(default_template))
    member.create_workspace(mine, default_template)
    refused(lambda: admin.get_workspace(member_name, mine), 404)
    assert mine not in {w.name for w in admin.list_workspaces().workspaces}

    # Removing the member takes away the organization and its templates.
    admin.remove_member(org, member_name)
    assert template not in names(member)
    refused(lambda: member.get_organization(org), 404)
    assert member_name not in admin.get_group(org, "platform").members


def test_names_may_repeat_across_organizations(owner: Client) -> None:
    org = unique("org")
    owner.create_organization(org)
    template = unique("same")
    owner.push_template(template, simple_archive(template))
    owner.push_template(template, simple_archive(template), org=org)
    error = refused(lambda: owner.get_template(template), 409, org)
    assert error.reason == "template_ambiguous" and "default" in error.message
    assert owner.get_template(template, org=org).organization == org
    assert owner.get_template(template, org="default").organization == "default"
    listed = [(t.name, t.organization) for t in owner.list_templates().templates]
    assert (template, org) in listed and (template, "default") in listed


def test_bad_input_and_what_cannot_change(make_user: UserFactory, owner: Client) -> None:
    _, stranger = make_user()
    org = unique("org")
    owner.create_organization(org)
    refused(lambda: owner.create_organization(org), 409, "already exists")
    refused(lambda: owner.create_organization("Not A Name"), 400)
    template = unique("b")
    owner.push_template(template, simple_archive(template), org=org)
    # ACL entries must name members and groups of the template's organization.
    refused(lambda: owner.update_template_acl(template, users={stranger: "use"}), 400, "member")
    refused(lambda: owner.update_template_acl(template, groups={"nope": "use"}), 400, "no group")
    bad_role = owner.request(
        "PATCH", f"/api/v2/templates/{template}/acl", json_body={"users": {}}
    )  # an empty change is fine
    assert bad_role.status_code == 200
    with pytest.raises(ApiError) as exc:
        owner.request("PATCH", f"/api/v2/templates/{template}/acl",
                      json_body={"users": {stranger: "owner"}})  # fmt: skip
    assert exc.value.status == 400
    refused(lambda: owner.create_group(org, "-bad-"), 400)
    refused(lambda: owner.create_group(org, "g", members=[stranger]), 400, "not a member")
    assert "g" not in {g.name for g in owner.list_groups(org).groups}  # nothing half-made
    refused(lambda: owner.update_group(org, "everyone", add=[stranger]), 400, "everyone")
    refused(lambda: owner.delete_group(org, "everyone"), 409)
    refused(lambda: owner.delete_organization("default"), 409, "default")
    refused(lambda: owner.delete_organization(org), 409, "template")
    refused(lambda: owner.remove_member("default", stranger), 409, "default organization")
    refused(lambda: owner.remove_member(org, stranger), 404)
    empty = unique("org")
    owner.create_organization(empty)
    owner.delete_organization(empty)
    refused(lambda: owner.get_organization(empty), 404)


async def test_the_migration_moves_existing_templates_into_the_default_organization(
    empty_database: Database,
) -> None:
    from alembic import command

    db = empty_database
    async with db.engine.begin() as conn:
        await conn.run_sync(lambda sync: command.upgrade(alembic_config(sync), "0006"))
        await conn.execute(
            sa.text(
                "INSERT INTO templates (id, name, display_name, description, backend, "
                "created_by, created_at, updated_at) VALUES ('t1', 'old', '', '', 'local', "
                "'u', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        await conn.run_sync(lambda sync: command.upgrade(alembic_config(sync), "head"))
        org = (
            await conn.execute(sa.text("SELECT id, name FROM organizations WHERE is_default"))
        ).one()
        assert org.name == "default"
        moved = (await conn.execute(sa.text("SELECT organization_id FROM templates"))).scalar()
        assert moved == org.id
        acl = (await conn.execute(sa.text("SELECT group_id, role FROM template_group_acl"))).one()
        assert tuple(acl) == (org.id, "use")
        # Names are unique per organization now, not across the site.
        await conn.execute(
            sa.text(
                "INSERT INTO organizations (id, name, display_name, description, is_default, "
                "created_at, updated_at) VALUES ('o2', 'two', '', '', false, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
        await conn.execute(
            sa.text(
                "INSERT INTO templates (id, organization_id, name, display_name, description, "
                "backend, created_by, created_at, updated_at) VALUES ('t2', 'o2', 'old', '', "
                "'', 'local', 'u', CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"
            )
        )
