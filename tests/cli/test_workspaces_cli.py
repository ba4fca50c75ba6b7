"""``stockade create/list/show/start/stop/restart/update/delete/logs/cancel``
and ``stockade provisioner-keys`` as a user runs them, against a real server
whose built-in workers run the builds on the local backend. Every test
deletes the workspaces it made."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from stockade.cli.common import UserError
from stockade.cli.workspaces import (
    LiveDisplay,
    PlainDisplay,
    convert_value,
    parse_parameters,
)
from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client, types
from stockade.sdk.templates import Manifest, Parameter, build_archive
from tests.builds import build_lines, wait_for_build, workspace_lock
from tests.cli.test_cli import Run, cli  # noqa: F401  (fixture)
from tests.conftest import OWNER_PASSWORD, PASSWORD, UserFactory, unique

TEMPLATE = """\
name: {name}
backend: local
parameters:
  - name: greeting
    type: string
    default: hello
    mutable: true
  - name: cores
    type: number
    default: 1
    validation: {{min: 1, max: 4}}
  - name: debug
    type: bool
    default: false
    mutable: true
  - name: tools
    type: list(string)
    default: [git]
{extra}
agent:
  startup_script: |
    echo "greeting is $STOCKADE_PARAMETER_GREETING"
    echo "cores=$STOCKADE_PARAMETER_CORES debug=$STOCKADE_PARAMETER_DEBUG"
    echo "tools=$STOCKADE_PARAMETER_TOOLS"
"""


def push(owner: Client, directory: Path, name: str, extra: str = "") -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stockade.yaml").write_text(TEMPLATE.format(name=name, extra=extra))
    owner.push_template(name, build_archive(directory))


def login(cli: Run, server: ServerProcess, username: str, password: str = PASSWORD) -> None:  # noqa: F811
    cli("login", server.url, "--username", username, "--password", password)


def as_json(result: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(result.stdout)


Cleanup = list[tuple[str, str]]


@pytest.fixture
def cleanup(owner: Client) -> Iterator[Cleanup]:
    """(owner, name) of workspaces to delete after the test, whatever it left."""
    made: Cleanup = []
    yield made
    for owner_name, name in made:
        try:
            owner.create_build(owner_name, name, "delete", cancel_running=True)
        except ApiError as exc:
            if exc.status == 404:
                continue
            raise
        deadline = time.monotonic() + 60
        while True:
            try:
                owner.get_workspace(owner_name, name)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                break
            assert time.monotonic() < deadline, f"{owner_name}/{name} was not deleted"
            time.sleep(0.1)


# --- without a server ---------------------------------------------------------------


def _param(kind: str, name: str = "p") -> Parameter:
    return Parameter.model_validate({"name": name, "type": kind})


def test_parameter_values_are_converted_by_type() -> None:
    assert convert_value(_param("number"), "2") == 2
    assert isinstance(convert_value(_param("number"), "2"), int)
    assert convert_value(_param("number"), "2.5") == 2.5
    assert convert_value(_param("number"), "two") == "two"  # the server says why
    assert convert_value(_param("number"), "nan") == "nan"
    for text in ("true", "YES", "1", "on"):
        assert convert_value(_param("bool"), text) is True
    for text in ("false", "no", "0", "Off"):
        assert convert_value(_param("bool"), text) is False
    assert convert_value(_param("bool"), "maybe") == "maybe"
    assert convert_value(_param("list(string)"), "a, b,,c") == ["a", "b", "c"]
    assert convert_value(_param("list(string)"), '["a,b", "c"]') == ["a,b", "c"]
    assert convert_value(_param("list(string)"), "") == []
    assert convert_value(_param("string"), " 42 ") == " 42 "
    assert convert_value(None, "7") == "7"
    with pytest.raises(UserError, match="not a JSON list"):
        convert_value(_param("list(string)"), "[a")
    with pytest.raises(UserError, match="takes a list of strings"):
        convert_value(_param("list(string)"), "[1]")

    manifest = Manifest.model_validate(
        {"name": "t", "backend": "local", "parameters": [{"name": "cpu", "type": "number"}]}
    )
    assert parse_parameters(["cpu=4", "other=4", "eq=a=b"], manifest) == {
        "cpu": 4,
        "other": "4",
        "eq": "a=b",
    }
    with pytest.raises(UserError, match="NAME=VALUE"):
        parse_parameters(["cpu"], manifest)


def _build(status: types.BuildStatus, stages: list[types.BuildStage]) -> types.WorkspaceBuild:
    now = datetime.now(UTC)
    return types.WorkspaceBuild(
        id="b",
        workspace_id="w",
        workspace_name="dev",
        owner_name="alice",
        number=1,
        transition="start",
        restart=False,
        status=status,
        initiator_id="u",
        initiator_name="alice",
        template_version_id="v",
        template_version=1,
        parameters={},
        stages=stages,
        attempts=1,
        created_at=now,
    )


def test_build_displays_render_stages_and_lines() -> None:
    """The live display (terminals) and the plain one, without a server."""
    start = datetime.now(UTC) - timedelta(seconds=3)
    done = types.BuildStage(
        name="Preparing", started_at=start, finished_at=start + timedelta(seconds=1), seconds=1.0
    )
    current = types.BuildStage(name="Running [bold]script", started_at=start)
    line = types.BuildLogLine(id=1, time=start, stage="Preparing", level="warn", line="[red]x")

    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=100, markup=False)
    live = LiveDisplay(terminal, "Build 1 (start) of alice/dev")
    live.update(_build("running", [done, current]))
    live.line(line)
    live.update(_build("failed", [done, current.model_copy(update={"seconds": 2.0})]))
    live.close()
    text = buffer.getvalue()
    assert "Preparing" in text and "1.0s" in text
    assert "Running [bold]script" in text  # data, not markup
    assert "warning: " in text and "[red]x" in text

    buffer = io.StringIO()
    plain = PlainDisplay(Console(file=buffer, width=20, markup=False), "Build 1 (start)")
    plain.update(_build("running", [done]))
    plain.line(line.model_copy(update={"line": "a long line that must not be wrapped at all"}))
    plain.line(line.model_copy(update={"stage": "Next", "level": "info", "line": "y"}))
    plain.close()
    assert buffer.getvalue().splitlines() == [
        "Build 1 (start)",
        "==> Preparing",
        "warning: a long line that must not be wrapped at all",
        "==> Next",
        "y",
        "stages: Preparing 1.0s",
    ]


# --- against a server ---------------------------------------------------------------


def test_workspace_lifecycle(
    cli: Run,  # noqa: F811
    server: ServerProcess,
    owner: Client,
    make_user: UserFactory,
    cleanup: Cleanup,
    tmp_path: Path,
) -> None:
    template = unique("tpl")
    push(owner, tmp_path / "v1", template)
    _, alice = make_user()
    login(cli, server, alice)
    cleanup.append((alice, "dev"))

    created = cli(
        "create", "dev", "--template", template,
        "-p", "greeting=good day", "-p", "cores=2", "-p", "debug=yes", "-p", "tools=git,make",
    )  # fmt: skip
    out = created.stdout
    assert "Build 1 (start) of " + alice + "/dev" in out
    assert "greeting is good day" in out
    assert "cores=2 debug=true" in out and 'tools=["git", "make"]' in out
    assert f"{alice}/dev is running" in out
    shown = as_json(cli("show", "dev", "--output", "json"))
    assert shown["status"] == "running" and shown["owner_name"] == alice
    assert shown["latest_build"]["status"] == "succeeded"
    assert shown["parameters"] == {
        "greeting": "good day",
        "cores": 2,
        "debug": True,
        "tools": ["git", "make"],
    }
    assert "running" in cli("show", f"{alice}/dev").stdout
    listed = as_json(cli("list", "-o", "json"))
    assert [w["name"] for w in listed] == ["dev"]

    assert f"{alice}/dev is stopped" in cli("stop", "dev").stdout
    started = as_json(cli("start", "dev", "-p", "greeting=hi", "-o", "json"))
    assert started["status"] == "running" and started["parameters"]["greeting"] == "hi"
    assert started["latest_build"]["number"] == 3

    restarted = cli("restart", "dev").stdout
    assert "Build 4 (restart: stop)" in restarted and "Build 5 (start)" in restarted
    assert f"{alice}/dev is running (build 5 succeeded" in restarted

    # The latest build's log, then what its agent's startup script printed.
    latest = cli("logs", "dev").stdout
    assert "greeting is hi" in latest
    assert "greeting is good day" not in latest
    assert (
        latest.index("the agent runs")
        < latest.index("== startup script")
        < latest.index("greeting is hi")
    )
    # An earlier build: its own log only (each build launches its own agent,
    # identified by its pid; the agent output belongs to the latest start).
    agent_of = {
        number: next(x for x in build_lines(owner, alice, "dev", number) if "agent runs" in x)
        for number in (1, 5)
    }
    assert agent_of[1] != agent_of[5]
    first = cli("logs", "dev", "--build", "1").stdout
    assert agent_of[1] in first and agent_of[5] not in first
    assert "== startup script" not in first and "greeting is" not in first
    followed = cli("logs", "dev", "--build", "1", "--follow")
    assert agent_of[1] in followed.stdout and "greeting is" not in followed.stdout
    assert "build 1 succeeded" in followed.stderr
    # --output json: the build's lines only.
    lines = [line["line"] for line in as_json(cli("logs", "dev", "-o", "json"))]
    assert agent_of[5] in lines and "greeting is hi" not in lines
    events = [json.loads(x) for x in cli("logs", "dev", "-f", "-o", "json").stdout.splitlines()]
    assert events[-1] == {"type": "end", "build_number": 5, "status": "succeeded"}
    refused = cli("cancel", "dev", ok=False)
    assert refused.returncode == 1 and "nothing to cancel" in refused.stderr

    # A new version with a required parameter: update asks for it on a
    # terminal; without one it fails with the server's message.
    push(
        owner,
        tmp_path / "v2",
        template,
        extra="  - name: project\n    type: string\n    required: true\n    mutable: true\n",
    )
    assert as_json(cli("show", "dev", "-o", "json"))["outdated"] is True
    missing = cli("update", "dev", ok=False)
    assert missing.returncode == 1
    assert "parameter 'project' is required" in missing.stderr
    updated = as_json(cli("update", "dev", "-p", "project=alpha", "-o", "json"))
    assert updated["template_version"] == 2 and updated["outdated"] is False
    assert updated["parameters"]["project"] == "alpha" and updated["status"] == "running"

    unconfirmed = cli("delete", "dev", ok=False)
    assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr
    assert f"Deleted {alice}/dev." in cli("delete", "dev", "--yes").stdout
    gone = cli("show", "dev", ok=False)
    assert gone.returncode == 1 and "workspace not found" in gone.stderr


def test_errors_and_other_users_workspaces(
    cli: Run,  # noqa: F811
    server: ServerProcess,
    owner: Client,
    make_user: UserFactory,
    cleanup: Cleanup,
    tmp_path: Path,
) -> None:
    template = unique("tpl")
    push(owner, tmp_path, template)
    bob_client, bob = make_user()
    bob_client.create_workspace("secret", template)
    cleanup.append((bob, "secret"))
    _, alice = make_user()
    login(cli, server, alice)

    for args, expected in [
        (["-p", "cores=9"], "parameter 'cores' 9 is more than the maximum 4"),
        (["-p", "cores=two"], "parameter 'cores' must be a number"),
        (["-p", "colour=red"], "parameter 'colour' unknown parameter"),
        (["-p", "cores"], "--parameter takes NAME=VALUE, got 'cores'"),
    ]:
        result = cli("create", "bad", "--template", template, *args, ok=False)
        assert result.returncode == 1, args
        assert expected in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    result = cli("create", "bad", "--template", "no-such-template", ok=False)
    assert "template 'no-such-template' not found" in result.stderr
    assert as_json(cli("list", "-o", "json")) == []

    for args in (["show", f"{bob}/secret"], ["stop", f"{bob}/secret"], ["logs", f"{bob}/secret"]):
        hidden = cli(*args, ok=False)
        assert hidden.returncode == 1 and "workspace not found" in hidden.stderr, args
    assert "workspace not found" in cli("show", "nothing-here", ok=False).stderr
    assert "name a workspace NAME or OWNER/NAME" in cli("show", "a/b/c", ok=False).stderr

    queued = as_json(cli("create", "mine", "--template", template, "--no-follow", "-o", "json"))
    cleanup.append((alice, "mine"))
    assert queued["name"] == "mine" and queued["owner_name"] == alice
    assert queued["latest_build"]["number"] == 1
    assert queued["latest_build"]["transition"] == "start"
    assert queued["status"] in ("pending", "starting", "running")

    # The owner reaches everyone's workspaces as OWNER/NAME.
    login(cli, server, "owner", OWNER_PASSWORD)
    assert as_json(cli("show", f"{bob}/secret", "-o", "json"))["owner_name"] == bob
    everyone = as_json(cli("list", "--all", "-o", "json"))
    assert {(bob, "secret"), (alice, "mine")} <= {(w["owner_name"], w["name"]) for w in everyone}
    assert all(w["owner_name"] == "owner" for w in as_json(cli("list", "-o", "json")))
    stopped = as_json(cli("stop", f"{bob}/secret", "--cancel-running", "-o", "json"))
    assert stopped["status"] == "stopped"
    for_bob = as_json(
        cli("create", "gift", "-t", template, "--owner", bob, "--no-follow", "-o", "json")
    )
    cleanup.append((bob, "gift"))
    assert for_bob["owner_name"] == bob and for_bob["latest_build"]["initiator_name"] == "owner"


def test_provisioner_keys(
    cli: Run,  # noqa: F811
    server: ServerProcess,
    owner: Client,
    make_user: UserFactory,
) -> None:
    login(cli, server, "owner", OWNER_PASSWORD)
    first, second = unique("pk"), unique("pk")
    created = as_json(cli("provisioner-keys", "create", first, "-o", "json"))
    assert created["name"] == first and created["key"]
    shown = cli("provisioner-keys", "create", second).stdout
    key = shown.splitlines()[1]
    assert f"STOCKADE_PROVISIONER_KEY={key} stockade provisionerd start --url {server.url}" in shown
    listed = as_json(cli("provisioner-keys", "list", "-o", "json"))
    assert {first, second} <= {k["name"] for k in listed}
    assert all("key" not in k for k in listed)
    duplicate = cli("provisioner-keys", "create", first, ok=False)
    assert duplicate.returncode == 1 and "exists" in duplicate.stderr
    assert "--yes" in cli("provisioner-keys", "delete", first, ok=False).stderr
    cli("provisioner-keys", "delete", first, "--yes")
    cli("provisioner-keys", "delete", second, "--yes")
    names = [k["name"] for k in as_json(cli("provisioner-keys", "list", "-o", "json"))]
    assert first not in names and second not in names
    missing = cli("provisioner-keys", "delete", first, "--yes", ok=False)
    assert "not found" in missing.stderr

    _, member = make_user()
    login(cli, server, member)
    denied = cli("provisioner-keys", "list", ok=False)
    assert denied.returncode == 1 and "permission" in denied.stderr


def test_a_canceled_build_fails_the_command_following_it(
    cli: Run,  # noqa: F811
    server: ServerProcess,
    owner: Client,
    make_user: UserFactory,
    cleanup: Cleanup,
    tmp_path: Path,
) -> None:
    template = unique("tpl")
    push(owner, tmp_path / "slow", template)
    alice_client, alice = make_user()
    login(cli, server, alice)
    cleanup.append((alice, "slow"))
    ws = alice_client.create_workspace("slow", template)
    wait_for_build(alice_client, alice, "slow", 1, ("succeeded",))
    cli("stop", "slow")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env.update(STOCKADE_CONFIG_DIR=str(cli.config_dir), COLUMNS="200")  # type: ignore[attr-defined]
    # A start build ends once the agent is launched: holding the workspace's
    # lock keeps this one waiting in its first stage, in progress.
    with workspace_lock(server.data_dir / "workspaces", ws.id):
        following = subprocess.Popen(
            [sys.executable, "-m", "stockade", "start", "slow"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
            env=env, text=True,
        )  # fmt: skip
        try:
            started = f"start {alice}/slow with template {template} v1"
            deadline = time.monotonic() + 30
            while True:
                try:
                    lines = build_lines(alice_client, alice, "slow", 3)
                except ApiError:
                    lines = []
                if any(x.startswith(started) for x in lines):
                    break
                assert time.monotonic() < deadline, lines
                time.sleep(0.1)
            asked = cli("cancel", "slow").stdout
            assert f"build 3 of {alice}/slow" in asked
            out, err = following.communicate(timeout=60)
        finally:
            if following.poll() is None:
                following.kill()
                following.wait()
    assert following.returncode == 1, (out, err)
    assert started in out
    assert f"error: build 3 (start) of {alice}/slow canceled: the build was canceled" in err
    assert "Waiting for the agent" not in out
    shown = as_json(cli("show", "slow", "-o", "json"))
    assert shown["status"] == "canceled"
    assert shown["latest_build"]["error"] == "the build was canceled"
