"""Workspaces through the API: creation with parameters, the build lifecycle
on the local backend, one build at a time, logs, updates and who may see what."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client, types
from stockade.sdk.templates import build_archive
from tests.builds import (
    agent_lines,
    wait_for_agent,
    wait_for_build,
    workspace_lock,
)
from tests.conftest import UserFactory, unique

TEMPLATE = """\
name: {name}
backend: local
parameters:
  - name: greeting
    type: string
    default: hello
    validation: {{regex: "^[a-z ]+$"}}
    mutable: true
  - name: cores
    type: number
    default: 1
    validation: {{min: 1, max: 4}}
  - name: region
    type: string
    options: [north, south]
    default: north
  - name: tools
    type: list(string)
    default: [git]
  - name: debug
    type: bool
    default: false
    mutable: true
{extra}
compute:
  cpu: ${{cores}}
agent:
  startup_script: |
    echo "greeting is $STOCKADE_PARAMETER_GREETING"
    echo "$STOCKADE_PARAMETER_GREETING" > "$HOME/greeting.txt"
    {script}
"""

FINAL = {"running", "stopped", "failed", "canceled", "deleted"}


def push(owner: Client, tmp_path: Path, *, extra: str = "", script: str = "true") -> str:
    name = unique("tpl")
    directory = tmp_path / name
    directory.mkdir()
    (directory / "stockade.yaml").write_text(TEMPLATE.format(name=name, extra=extra, script=script))
    owner.push_template(name, build_archive(directory))
    return name


def wait_status(client: Client, owner: str, name: str, *, timeout: float = 60) -> types.Workspace:
    deadline = time.monotonic() + timeout
    while True:
        ws = client.get_workspace(owner, name)
        if ws.status in FINAL:
            return ws
        if time.monotonic() > deadline:
            raise AssertionError(f"workspace still {ws.status} after {timeout} s: {ws}")
        time.sleep(0.1)


def problem(exc: pytest.ExceptionInfo[ApiError]) -> str:
    return exc.value.message


@pytest.fixture
def template(owner: Client, tmp_path: Path) -> str:
    return push(owner, tmp_path)


def home_of(server: ServerProcess, ws: types.Workspace) -> Path:
    return server.data_dir / "workspaces" / ws.id / "home"


def held(server: ServerProcess, ws: types.Workspace) -> AbstractContextManager[None]:
    """Builds of ``ws`` wait, in progress, while this is held."""
    return workspace_lock(server.data_dir / "workspaces", ws.id)


def delete(client: Client, ws: types.Workspace) -> None:
    client.create_build(ws.owner_name, ws.name, "delete", cancel_running=True)
    wait_status_gone(client, ws.owner_name, ws.name)


def wait_status_gone(client: Client, owner: str, name: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.get_workspace(owner, name)
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        time.sleep(0.1)
    raise AssertionError(f"{owner}/{name} was not deleted in {timeout} s")


def test_lifecycle_keeps_the_home_until_delete(
    server: ServerProcess, make_user: UserFactory, template: str
) -> None:
    alice, alice_name = make_user()
    created = alice.create_workspace("dev", template, {"greeting": "good day"})
    assert created.status == "pending"
    assert created.latest_build.number == 1 and created.latest_build.transition == "start"
    assert created.parameters == {
        "greeting": "good day",
        "cores": 1,
        "region": "north",
        "tools": ["git"],
        "debug": False,
    }
    ws = wait_status(alice, alice_name, "dev")
    assert ws.status == "running", ws.latest_build.error
    assert ws.latest_build.status == "succeeded"
    assert ws.latest_build.stages[0].name == "Preparing"
    assert all(s.seconds is not None for s in ws.latest_build.stages)
    logs = alice.build_logs(alice_name, "dev")
    assert logs.build_status == "succeeded"
    assert any(line.line.startswith("the agent runs") for line in logs.logs)
    # The agent, launched by the build, runs the startup script with the
    # parameters and reports its output; the build log holds none of it.
    ws = wait_for_agent(alice, alice_name, "dev")
    assert ws.agent is not None and ws.agent.lifecycle_state == "ready"
    assert "greeting is good day" in agent_lines(alice, alice_name, "dev")
    assert not any("greeting is" in line.line for line in logs.logs)
    home = home_of(server, ws)
    assert (home / "greeting.txt").read_text() == "good day\n"

    (home / "notes.txt").write_text("kept")
    alice.create_build(alice_name, "dev", "stop")
    assert wait_status(alice, alice_name, "dev").status == "stopped"
    alice.create_build(alice_name, "dev", "start")
    ws = wait_status(alice, alice_name, "dev")
    assert ws.status == "running"
    assert (home / "notes.txt").read_text() == "kept"

    alice.create_build(alice_name, "dev", "restart")
    deadline = time.monotonic() + 60
    while True:
        builds = alice.list_builds(alice_name, "dev")
        if len(builds) == 5 and builds[-1].status == "succeeded":
            break
        assert time.monotonic() < deadline, builds
        time.sleep(0.1)
    assert [(b.transition, b.restart) for b in builds[-2:]] == [("stop", True), ("start", False)]
    assert alice.get_workspace(alice_name, "dev").status == "running"

    alice.create_build(alice_name, "dev", "delete")
    wait_status_gone(alice, alice_name, "dev")
    assert not home.parent.exists()
    # The name is free again.
    again = alice.create_workspace("dev", template)
    assert again.id != ws.id
    delete(alice, again)


def test_parameters_are_validated_by_name(make_user: UserFactory, template: str) -> None:
    alice, _ = make_user()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"colour": "red"}, "parameter 'colour' unknown parameter"),
        ({"cores": 9}, "parameter 'cores' 9 is more than the maximum 4"),
        ({"cores": "two"}, "parameter 'cores' must be a number"),
        ({"greeting": "Hi!"}, "parameter 'greeting' 'Hi!' does not match the regex"),
        ({"region": "east"}, "parameter 'region' 'east' is not one of the options"),
        ({"tools": "git"}, "parameter 'tools' must be a list of strings"),
        ({"debug": "yes"}, "parameter 'debug' must be true or false"),
    ]
    for values, expected in cases:
        with pytest.raises(ApiError) as exc:
            alice.create_workspace(unique("ws"), template, values)
        assert exc.value.status == 400, values
        assert problem(exc).startswith(expected), (values, problem(exc))
    assert alice.list_workspaces().count == 0  # nothing half-written


def test_required_and_immutable_parameters(
    owner: Client, make_user: UserFactory, tmp_path: Path
) -> None:
    name = push(
        owner,
        tmp_path,
        extra="  - name: project\n    type: string\n    required: true\n",
    )
    alice, alice_name = make_user()
    with pytest.raises(ApiError) as exc:
        alice.create_workspace("ws", name)
    assert exc.value.status == 400
    assert "parameter 'project' is required" in problem(exc)
    ws = alice.create_workspace("ws", name, {"project": "alpha"})
    wait_status(alice, alice_name, "ws")
    with pytest.raises(ApiError) as exc:
        alice.create_build(alice_name, "ws", "start", parameters={"cores": 2})
    assert exc.value.status == 400
    assert "parameter 'cores' is immutable" in problem(exc)
    build = alice.create_build(alice_name, "ws", "start", parameters={"greeting": "bye"})
    assert build.parameters["greeting"] == "bye"
    wait_status(alice, alice_name, "ws")
    assert alice.get_workspace(alice_name, "ws").parameters["greeting"] == "bye"
    delete(alice, ws)


def test_update_moves_to_the_active_version_and_asks_for_new_required_parameters(
    owner: Client, make_user: UserFactory, tmp_path: Path
) -> None:
    name = push(owner, tmp_path)
    alice, alice_name = make_user()
    ws = alice.create_workspace("upd", name)
    wait_status(alice, alice_name, "upd")
    directory = tmp_path / "v2"
    directory.mkdir()
    (directory / "stockade.yaml").write_text(
        TEMPLATE.format(
            name=name,
            extra="  - name: team\n    type: string\n    required: true\n",
            script="echo version two",
        )
    )
    owner.push_template(name, build_archive(directory))
    assert alice.get_workspace(alice_name, "upd").outdated
    with pytest.raises(ApiError) as exc:
        alice.create_build(alice_name, "upd", "start", update=True)
    assert exc.value.status == 400 and "parameter 'team' is required" in problem(exc)
    build = alice.create_build(alice_name, "upd", "start", update=True, parameters={"team": "blue"})
    assert build.template_version == 2
    ws = wait_status(alice, alice_name, "upd")
    assert ws.status == "running" and not ws.outdated and ws.template_version == 2
    # The update's new agent runs version 2's startup script.
    ws = wait_for_agent(alice, alice_name, "upd")
    assert ws.agent is not None and ws.agent.lifecycle_state == "ready"
    assert "version two" in agent_lines(alice, alice_name, "upd")
    delete(alice, ws)


def test_one_build_at_a_time_unless_canceled(
    server: ServerProcess, make_user: UserFactory, template: str
) -> None:
    alice, alice_name = make_user()
    ws = alice.create_workspace("slow", template)
    wait_status(alice, alice_name, "slow")
    alice.create_build(alice_name, "slow", "stop")
    assert wait_status(alice, alice_name, "slow").status == "stopped"
    # A start build ends as soon as the agent is launched: hold this one in
    # its first stage so that it is still running when the next is asked for.
    with held(server, ws):
        alice.create_build(alice_name, "slow", "start")
        wait_for_build(alice, alice_name, "slow", 3)
        with pytest.raises(ApiError) as exc:
            alice.create_build(alice_name, "slow", "stop")
        assert exc.value.status == 409
        assert "build 3 (start, " in problem(exc) and "cancel" in problem(exc)
        build = alice.create_build(alice_name, "slow", "stop", cancel_running=True)
        assert build.number == 4
        # The held start is canceled while it waits; the stop then waits its turn.
        third = wait_for_build(alice, alice_name, "slow", 3, ("canceled", "succeeded", "failed"))
        assert third.status == "canceled" and third.reason == "superseded"
    ws = wait_status(alice, alice_name, "slow")
    assert ws.status == "stopped" and ws.latest_build.number == 4
    assert ws.latest_build.status == "succeeded"
    with pytest.raises(ApiError) as exc:
        alice.cancel_build(alice_name, "slow", 4)
    assert exc.value.status == 409
    delete(alice, ws)


def test_cancel_a_running_build(
    server: ServerProcess, make_user: UserFactory, template: str
) -> None:
    alice, alice_name = make_user()
    ws = alice.create_workspace("c", template)
    wait_status(alice, alice_name, "c")
    alice.create_build(alice_name, "c", "stop")
    assert wait_status(alice, alice_name, "c").status == "stopped"
    with held(server, ws):
        alice.create_build(alice_name, "c", "start")
        wait_for_build(alice, alice_name, "c", 3)
        assert alice.get_workspace(alice_name, "c").status == "starting"
        alice.cancel_build(alice_name, "c", 3)
        ws = wait_status(alice, alice_name, "c")
    assert ws.status == "canceled"
    assert ws.latest_build.number == 3 and ws.latest_build.reason == "canceled"
    # The canceled start launched nothing: no agent reports from the workspace.
    assert ws.agent is None or ws.agent.status == "connecting"
    delete(alice, ws)


def test_logs_follow_streams_until_the_end(
    server: ServerProcess, owner: Client, make_user: UserFactory, tmp_path: Path
) -> None:
    name = push(owner, tmp_path, script="for i in 1 2 3; do echo tick $i; sleep 0.2; done")
    alice, alice_name = make_user()
    ws = alice.create_workspace("f", name)
    wait_status(alice, alice_name, "f")
    alice.create_build(alice_name, "f", "stop")
    wait_status(alice, alice_name, "f")
    # A start held in its first stage: following it streams what is logged
    # while it waits, and goes on until it ends once released.
    with held(server, ws):
        alice.create_build(alice_name, "f", "start")
        wait_for_build(alice, alice_name, "f", 3)
        stream = alice.follow_build_logs(alice_name, "f")
        first = next(stream)
        assert first["type"] == "log" and first["line"].startswith(f"start {alice_name}/f ")
        assert alice.get_build(alice_name, "f", 3).status == "running"
    events = [first, *stream]
    assert events[-1] == {"type": "end", "build_number": 3, "status": "succeeded"}
    lines = [e["line"] for e in events if e["type"] == "log"]
    assert any(x.startswith("the agent runs") for x in lines), lines
    ids = [e["id"] for e in events if e["type"] == "log"]
    assert len(ids) >= 3 and ids == sorted(ids)
    # Resuming after a line id returns only what came later.
    later = alice.build_logs(alice_name, "f", after=ids[1]).logs
    assert [line.id for line in later] == ids[2:]
    # The startup script's output is the agent's, in order, and resumable too.
    wait_for_agent(alice, alice_name, "f")
    agent_log = alice.agent_logs(alice_name, "f").logs
    ticks = [x.line for x in agent_log if x.line.startswith("tick")]
    assert ticks == ["tick 1", "tick 2", "tick 3"]
    resumed = alice.agent_logs(alice_name, "f", after=agent_log[0].id).logs
    assert [x.id for x in resumed] == [x.id for x in agent_log[1:]]
    # The raw stream is NDJSON.
    with httpx.stream(
        "GET",
        f"{server.url}/api/v2/workspaces/{alice_name}/f/logs?follow=true",
        headers={"Authorization": f"Bearer {alice.token}"},
    ) as response:
        assert response.headers["content-type"].startswith("application/x-ndjson")
        assert json.loads(next(response.iter_lines()))["type"] == "log"
    delete(alice, ws)


def test_members_see_only_their_own_workspaces(
    owner: Client, make_user: UserFactory, template: str
) -> None:
    alice, alice_name = make_user()
    bob, bob_name = make_user()
    admin, _ = make_user("user-admin")
    tadmin, _ = make_user("template-admin")
    ws = alice.create_workspace("mine", template)
    assert [w.name for w in bob.list_workspaces().workspaces] == []
    for client in (bob, tadmin):
        calls: list[Callable[[Client], object]] = [
            lambda c: c.get_workspace(alice_name, "mine"),
            lambda c: c.list_builds(alice_name, "mine"),
            lambda c: c.build_logs(alice_name, "mine"),
            lambda c: c.create_build(alice_name, "mine", "stop", cancel_running=True),
            lambda c: c.cancel_build(alice_name, "mine", 1),
            lambda c: c.list_workspaces(owner=alice_name),
        ]
        for call in calls:
            with pytest.raises(ApiError) as exc:
                call(client)
            assert exc.value.status == 404, exc.value.message
            assert alice_name not in exc.value.message
    # Nor can a member create one in someone else's name.
    with pytest.raises(ApiError) as exc:
        bob.create_workspace("theirs", template, owner=alice_name)
    assert exc.value.status == 404
    # Owners and user-admins act on everyone's.
    assert "mine" in [w.name for w in admin.list_workspaces().workspaces]
    assert owner.get_workspace(alice_name, "mine").owner_name == alice_name
    made = admin.create_workspace("for-bob", template, owner=bob_name)
    assert made.owner_name == bob_name
    assert [w.name for w in bob.list_workspaces().workspaces] == ["for-bob"]
    wait_status(admin, alice_name, "mine")
    delete(admin, ws)
    delete(owner, made)


def test_names_are_unique_per_owner_and_follow_the_pattern(
    make_user: UserFactory, template: str
) -> None:
    alice, _ = make_user()
    bob, _ = make_user()
    a = alice.create_workspace("same", template)
    b = bob.create_workspace("same", template)
    with pytest.raises(ApiError) as exc:
        alice.create_workspace("same", template)
    assert exc.value.status == 409 and "already exists" in problem(exc)
    for bad in ("Upper", "-dash", "a" * 33, "under_score", ""):
        with pytest.raises(ApiError) as exc:
            alice.create_workspace(bad, template)
        assert exc.value.status in (400, 422), bad
        assert "name" in problem(exc)
    with pytest.raises(ApiError) as exc:
        alice.create_workspace("x", "no-such-template")
    assert exc.value.status == 404 and "template 'no-such-template' not found" in problem(exc)
    delete(alice, a)
    delete(bob, b)


def test_archived_templates_take_no_new_workspaces(
    owner: Client, make_user: UserFactory, template: str
) -> None:
    alice, _ = make_user()
    owner.archive_template(template)
    with pytest.raises(ApiError) as exc:
        alice.create_workspace("late", template)
    assert exc.value.status == 404


def test_builds_are_audited(owner: Client, make_user: UserFactory, template: str) -> None:
    alice, alice_name = make_user()
    ws = alice.create_workspace("aud", template)
    wait_status(alice, alice_name, "aud")
    entries = owner.list_audit(resource_id=ws.id, limit=50).entries
    actions = {e.action for e in entries}
    assert {"workspace.create", "workspace.build.succeeded"} <= actions
    done = next(e for e in entries if e.action == "workspace.build.succeeded")
    assert done.username == alice_name
    assert done.details["transition"] == "start"
    delete(alice, ws)


def test_a_user_with_workspaces_cannot_be_deleted(
    owner: Client, make_user: UserFactory, template: str
) -> None:
    alice, alice_name = make_user()
    ws = alice.create_workspace("keep", template)
    with pytest.raises(ApiError) as exc:
        owner.delete_user(alice_name)
    assert exc.value.status == 409 and exc.value.reason == "user_has_workspaces"
    assert "1 workspace" in problem(exc)
    wait_status(alice, alice_name, "keep")
    delete(alice, ws)
    owner.delete_user(alice_name)  # the deleted workspace's row goes with its owner
    with pytest.raises(ApiError) as exc:
        owner.get_user(alice_name)
    assert exc.value.status == 404
