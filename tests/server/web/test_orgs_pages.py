"""The organization pages and a template's Access section, in Chromium: an
owner creates an organization and a group, adds members, and narrows a
template's ACL to the group; refusals are shown next to the field. Who may do
what is tested through the API on both databases (tests/server/test_orgs.py);
this is the dashboard's half."""

from __future__ import annotations

import re

import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client
from tests.conftest import PASSWORD, UserFactory, unique
from tests.server.test_templates import simple_archive
from tests.server.web.conftest import Chromium, WebClient

SQLITE_ONLY = "pages call the same services the API tests cover on both databases"


def test_an_owner_sets_up_an_organization_and_a_template_for_one_group(
    chromium: Chromium, server: ServerProcess, owner: Client, make_user: UserFactory
) -> None:
    in_group, alice = make_user()
    outside, bob = make_user()
    _, auditor = make_user("auditor")
    org, group, template = unique("org"), unique("grp"), unique("tpl")
    page = chromium.page
    page.on("dialog", lambda dialog: dialog.accept())

    # The organization, from the list page.
    page.goto(chromium.base_url + "/workspaces")
    page.get_by_role("navigation", name="Main").get_by_role("link", name="Organizations").click()
    page.wait_for_url("**/admin/orgs")
    page.fill("#f-name", "Not Valid")
    page.click("button:has-text('Create organization')")
    page.locator("#e-name").wait_for()  # refused next to the field, nothing created
    assert page.locator("#f-name").get_attribute("aria-invalid") == "true"
    page.fill("#f-name", org)
    page.fill("#f-display_name", "Team X")
    page.click("button:has-text('Create organization')")
    page.wait_for_url(f"**/admin/orgs/{org}")
    page.get_by_text(f"Organization {org} created").wait_for()

    # Members: one not a user is refused by the field; then alice and bob.
    page.fill("#f-username", "nobody-here")
    page.click("#members form.row button[type=submit]")
    page.locator("#e-username").wait_for()
    assert "nobody-here" in page.locator("#e-username").inner_text()
    page.fill("#f-username", f"{alice}, {bob}")
    page.click("#members form.row button[type=submit]")
    page.get_by_text(f"{alice}, {bob} are now in {org}").wait_for()
    bob_row = page.locator("table.org-members tr", has_text=bob)
    bob_row.get_by_role("button", name="Make org-admin").click()
    page.get_by_text(f"{bob} is an admin of {org}").wait_for()
    page.locator("table.org-members tr", has_text=bob).get_by_role(
        "button", name="Remove org-admin"
    ).click()
    page.get_by_text(f"{bob} is no longer an admin of {org}").wait_for()
    assert {(m.username, tuple(m.roles)) for m in owner.list_members(org).members} == {
        (alice, ()),
        (bob, ()),
    }

    # A group with alice; a member from outside the organization is refused.
    page.fill("#f-name", group)
    page.fill("#f-members", f"{alice}, {auditor}")
    page.click("button:has-text('Create group')")
    page.locator("#e-members").wait_for()
    assert "not a member" in page.locator("#e-members").inner_text()
    assert page.locator("#f-name").input_value() == group  # what was typed stays
    page.fill("#f-members", alice)
    page.click("button:has-text('Create group')")
    page.get_by_text(f"Group {group} created").wait_for()
    assert owner.get_group(org, group).members == [alice]
    chromium.screenshot("org")

    # The template, pushed into the organization, is open to all of it...
    owner.push_template(template, simple_archive(template), org=org)
    page.goto(chromium.base_url + "/templates")
    row = page.locator("tr", has=page.get_by_role("link", name=template, exact=True))
    assert org in row.inner_text()  # the deployment has several organizations
    row.get_by_role("link", name=template, exact=True).click()
    page.wait_for_url(re.compile(rf".*/templates/{template}\?org={org}$"))
    access = page.locator("#access")
    assert access.locator("tr", has_text="everyone").count() == 1

    # ...until its admin gives the group access and removes everyone's.
    page.select_option("#f-kind", "user")
    page.fill("#f-name", "nobody-here")
    page.click("button:has-text('Give access')")
    page.locator("#e-name").wait_for()
    assert "not a member" in page.locator("#e-name").inner_text()
    page.select_option("#f-kind", "group")
    page.fill("#f-name", group)
    page.select_option("#f-role", "use")
    page.click("button:has-text('Give access')")
    page.get_by_text(f"The group {group} may now use {template}").wait_for()
    page.locator("#access tr", has_text="everyone").get_by_role("button", name="Remove").click()
    page.get_by_text(f"The group everyone is off the access list of {template}").wait_for()
    chromium.screenshot("template-access")
    acl = owner.template_acl(template, org=org)
    assert [(g.name, g.role) for g in acl.groups] == [(group, "use")] and acl.users == []

    # alice (in the group) sees it; bob (not in it) is told it does not exist.
    assert template in {t.name for t in in_group.list_templates().templates}
    with pytest.raises(ApiError) as hidden:
        outside.get_template(template, org=org)
    assert hidden.value.status == 404

    # An auditor reads the list without controls; bob, a plain member, may
    # look at the organization but not change it, and the template is not there.
    auditor_web, bob_web = WebClient(server), WebClient(server)
    try:
        auditor_web.login(auditor, PASSWORD)
        seen = auditor_web.get(f"/templates/{template}?org={org}")
        assert seen.status_code == 200 and 'id="access"' in seen.text and group in seen.text
        assert "Give access" not in seen.text and "/acl" not in seen.text
        refused = auditor_web.post(
            f"/templates/{template}/acl?org={org}", {"kind": "user", "name": alice, "role": "use"}
        )
        assert refused.status_code == 403
        assert 'role="alert"' in refused.text and "permission to administer" in refused.text
        bob_web.login(bob, PASSWORD)
        shown = bob_web.get(f"/admin/orgs/{org}")
        assert shown.status_code == 200 and group in shown.text and "Create group" not in shown.text
        denied = bob_web.post(f"/admin/orgs/{org}/delete")
        assert (
            denied.status_code == 403 and "Only site owners can delete organizations" in denied.text
        )
        assert bob_web.get(f"/templates/{template}?org={org}").status_code == 404
    finally:
        auditor_web.close()
        bob_web.close()
    assert owner.template_acl(template, org=org).users == []
