"""``stockade orgs``, ``stockade groups`` and ``stockade templates acl`` as
people run them: an owner sets up an organization, a group and a template
open to that group only; who is in the group uses it, who is not cannot see it.
(Who may do what is tested through the API on both databases in
tests/server/test_orgs.py; this is the command line's half.)"""

from __future__ import annotations

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from stockade.devtools.server import ServerProcess
from tests.cli.test_cli import Run, cli  # noqa: F401  (fixture)
from tests.cli.test_workspaces_cli import Cleanup, cleanup  # noqa: F401  (fixture)
from tests.conftest import OWNER_PASSWORD, UserFactory, unique

TEMPLATE = "name: {name}\nbackend: local\n"


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


Call = tuple[list[str], str | None]  # arguments, and the token to run them with


def side_by_side(cli: Run, calls: dict[str, Call]) -> dict[str, subprocess.CompletedProcess[str]]:  # noqa: F811
    """Run independent commands at the same time (each one is a Python process
    to start, the slow part); their results by key, failed or not."""
    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = {
            key: pool.submit(cli, *args, token=token, ok=False)
            for key, (args, token) in calls.items()
        }
        return {key: future.result() for key, future in futures.items()}


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}: {result.stderr}{result.stdout}"
    return result


def test_an_organization_with_a_group_and_a_template_only_the_group_may_use(
    cli: Run,  # noqa: F811
    server: ServerProcess,
    make_user: UserFactory,
    cleanup: Cleanup,  # noqa: F811
    tmp_path: Path,
) -> None:
    in_group, alice = make_user()
    outside, bob = make_user()
    _, carol = make_user()
    as_alice, as_bob = in_group.token, outside.token
    cli("login", server.url, "--username", "owner", "--password", OWNER_PASSWORD)
    org, group, template = unique("org"), unique("grp"), unique("tpl")
    source = tmp_path / template
    source.mkdir()
    (source / "stockade.yaml").write_text(TEMPLATE.format(name=template))

    created = as_json(cli("orgs", "create", org, "--display-name", "Team X", "-o", "json"))
    assert (created["name"], created["display_name"], created["is_default"]) == (
        org,
        "Team X",
        False,
    )
    first = side_by_side(
        cli,
        {
            "alice": (["orgs", "add-member", org, alice], None),
            "bob": (["orgs", "add-member", org, bob], None),
            "carol": (["orgs", "add-member", org, carol, "--role", "org-admin", "-o", "json"],
                      None),
            "push": (["templates", "push", template, "-d", str(source), "--org", org,
                      "-o", "json"], None),
        },
    )  # fmt: skip
    admin = as_json(ok(first["carol"]))
    assert (admin["username"], admin["roles"]) == (carol, ["org-admin"])
    assert as_json(ok(first["push"]))["number"] == 1
    ok(first["alice"]), ok(first["bob"])

    made = as_json(cli("groups", "create", group, "--member", alice, "--org", org, "-o", "json"))
    assert (made["name"], made["organization"], made["members"]) == (group, org, [alice])
    # A new template is open to the whole organization (everyone: use) until
    # an admin narrows its ACL, here to the group.
    narrowed = as_json(
        cli("templates", "acl", "set", template, "--org", org,
            "--group", f"{group}=use", "--group", "everyone=none", "-o", "json")
    )  # fmt: skip
    assert (narrowed["template"], narrowed["organization"]) == (template, org)
    assert [(g["name"], g["role"]) for g in narrowed["groups"]] == [(group, "use")]
    assert narrowed["users"] == []

    done = side_by_side(
        cli,
        {
            "bad role": (["orgs", "add-member", org, bob, "--role", "owner"], None),
            "bad entry": (["templates", "acl", "set", template, "--org", org,
                           "--user", f"{alice}=owner"], None),
            "no template": (["create", "dev"], as_alice),
            "members": (["orgs", "members", org, "-o", "json"], None),
            "list": (["templates", "list"], None),
            "alice sees": (["templates", "list", "-o", "json"], as_alice),
            "alice creates": (["create", "dev", "-t", template, "--org", org, "--no-follow",
                               "-o", "json"], as_alice),
            "bob show": (["templates", "show", template, "--org", org], as_bob),
            "bob create": (["create", "dev", "-t", template, "--org", org, "--no-follow"],
                           as_bob),
        },
    )  # fmt: skip
    cleanup.append((alice, "dev"))

    assert done["bad role"].returncode == 1
    assert "unknown organization role(s) owner; roles are: org-admin" in done["bad role"].stderr
    bad = done["bad entry"]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "Invalid value for '--user'" in bad.stderr
    assert "give NAME=ROLE, where ROLE is use, admin or none" in bad.stderr
    # Typer's own usage errors are usage errors too, not "unexpected error".
    missing = done["no template"]
    assert missing.returncode == 2 and "Missing option '--template'" in missing.stderr
    members = as_json(ok(done["members"]))
    assert {(m["username"], tuple(m["roles"])) for m in members} == {
        (alice, ()),
        (bob, ()),
        (carol, ("org-admin",)),
    }
    assert "ORGANIZATION" in ok(done["list"]).stdout and org in done["list"].stdout
    # alice (in the group) sees the template and creates a workspace from it;
    # bob (in the organization, not in the group) is told it does not exist.
    seen = {(t["name"], t["organization"]) for t in as_json(ok(done["alice sees"]))}
    assert (template, org) in seen
    ws = as_json(ok(done["alice creates"]))
    assert (ws["owner_name"], ws["template_name"], ws["organization"]) == (alice, template, org)
    for key in ("bob show", "bob create"):
        assert done[key].returncode == 1, done[key]
        assert f"template {template!r} not found" in done[key].stderr, done[key].stderr

    grown = as_json(cli("groups", "add-members", group, bob, "--org", org, "-o", "json"))
    assert grown["members"] == sorted([alice, bob])
