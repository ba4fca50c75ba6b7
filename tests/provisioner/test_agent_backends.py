"""The real agent in real workspaces, through a real server: the backends
start it, it connects out, runs the startup script and reports; the CLI waits
for it and shows its output; it comes back by itself after the server is
killed and restarted; a stop revokes it. Docker workspaces reach the server
on a loopback access URL through their network's gateway, where the server
listens too."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import Client, types
from stockade.sdk.templates import build_archive
from tests.cli.test_cli import Run, cli  # noqa: F401  (fixture)
from tests.conftest import OWNER_PASSWORD, RELAXED_LIMITS, stop_workspaces

TEMPLATE = """\
name: {name}
backend: {backend}
parameters:
  - name: colour
    default: blue
{compute}
agent:
  startup_script: |
    echo "hello from the startup script as $(id -un)"
    echo "colour=$STOCKADE_PARAMETER_COLOUR token=${{STOCKADE_AGENT_TOKEN:-none}}"
    {script}
"""
SETTLED = ("ready", "start_error", "start_timeout")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of its own (SQLite: this is about backends and agents, not the
    database), restartable on the same port and data dir."""
    proc = ServerProcess(data_dir=tmp_path / "server", env=RELAXED_LIMITS).start()
    try:
        yield proc
    finally:
        proc.stop()
        stop_workspaces(proc)


@pytest.fixture
def owner(server: ServerProcess) -> Iterator[Client]:
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    yield client
    client.close()


def push(client: Client, tmp_path: Path, backend: str, script: str = "true") -> str:
    name = f"t-{backend}-{abs(hash(script)) % 10000}"
    directory = tmp_path / name
    directory.mkdir()
    compute = "compute:\n  image: stockade-base:bookworm" if backend == "docker" else ""
    (directory / "stockade.yaml").write_text(
        TEMPLATE.format(name=name, backend=backend, compute=compute, script=script)
    )
    client.push_template(name, build_archive(directory))
    return name


def wait_for(
    client: Client, name: str, check: Callable[[types.Workspace], bool], what: str
) -> types.Workspace:
    deadline = time.monotonic() + 60
    while True:
        ws = client.get_workspace("owner", name)
        if check(ws):
            return ws
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {ws}"
        time.sleep(0.05)


def settled(ws: types.Workspace) -> bool:
    return ws.agent is not None and ws.agent.lifecycle_state in SETTLED


def agent_lines(client: Client, name: str) -> list[str]:
    return [line.line for line in client.agent_logs("owner", name).logs]


def agent_rows(server: ServerProcess, workspace_id: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(server.data_dir / "stockade.db") as db:
        return list(
            db.execute(
                "SELECT lifecycle_state, revoked_at IS NOT NULL, disconnected_at IS NOT NULL "
                "FROM workspace_agents WHERE workspace_id = ? ORDER BY created_at",
                (workspace_id,),
            )
        )


def test_a_docker_workspace_agent_runs_the_startup_script_and_survives_a_server_restart(
    server: ServerProcess,
    owner: Client,
    tmp_path: Path,
    base_image: str,
    cli: Run,  # noqa: F811
) -> None:
    template = push(owner, tmp_path, "docker")
    cli("login", server.url, "--username", "owner", "--password", OWNER_PASSWORD)
    created = cli("create", "box", "--template", template, "-p", "colour=green")
    # The CLI followed the build, then the agent, whose output it printed.
    assert "hello from the startup script as stockade" in created.stdout
    assert "colour=green token=none" in created.stdout
    assert "The agent of owner/box is ready" in created.stdout
    ws = owner.get_workspace("owner", "box")
    assert ws.status == "running"
    assert ws.agent is not None
    assert (ws.agent.status, ws.agent.lifecycle_state) == ("connected", "ready")
    assert ws.agent.hostname == "box"
    lines = agent_lines(owner, "box")
    assert "hello from the startup script as stockade" in lines
    # The build log says the agent was launched, and holds no startup output.
    build_lines = [line.line for line in owner.build_logs("owner", "box").logs]
    assert any("The agent runs in the container" in line for line in build_lines)
    assert not any("hello from" in line for line in build_lines)
    # `stockade logs` shows the build log, then the agent's.
    shown = cli("logs", "box").stdout
    assert shown.index("The agent runs in the container") < shown.index("hello from the startup")
    # The server listens on the network's gateway for the agent.
    health = owner.health()
    gateways = health.provisioners["docker_agent_addresses"]
    assert len(gateways) == 1 and not gateways[0].startswith("127.")

    # Killed and restarted on the same port and data dir: the agent comes back
    # by itself, with no new build.
    builds = len(owner.list_builds("owner", "box"))
    server.stop(signal.SIGKILL)
    server.start()
    assert owner.health().provisioners["docker_agent_addresses"] == gateways
    ws = wait_for(
        owner,
        "box",
        lambda w: (
            w.agent is not None
            and w.agent.status == "connected"
            and w.agent.last_connected_at is not None
            and ws.agent is not None
            and ws.agent.last_connected_at is not None
            and w.agent.last_connected_at > ws.agent.last_connected_at
        ),
        "the agent to reconnect",
    )
    assert ws.agent is not None and ws.agent.lifecycle_state == "ready"
    assert len(owner.list_builds("owner", "box")) == builds
    # The startup script ran once.
    assert agent_lines(owner, "box").count("hello from the startup script as stockade") == 1

    # A stop: the agent reports shutting down and off, then its token is revoked.
    cli("stop", "box")
    ws = owner.get_workspace("owner", "box")
    assert ws.status == "stopped" and ws.agent is None
    assert agent_rows(server, ws.id) == [("off", 1, 1)]


@pytest.mark.parametrize("backend", ["local", "docker"])
def test_a_failing_startup_script_is_start_error_and_the_workspace_runs(
    server: ServerProcess,
    owner: Client,
    tmp_path: Path,
    backend: str,
    request: pytest.FixtureRequest,
    cli: Run,  # noqa: F811
) -> None:
    if backend == "docker":
        request.getfixturevalue("base_image")
    template = push(owner, tmp_path, backend, script="echo about to fail; exit 7")
    cli("login", server.url, "--username", "owner", "--password", OWNER_PASSWORD)
    result = cli("create", "w", "--template", template, ok=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "about to fail" in result.stdout
    assert "startup script failed (start_error)" in result.stderr
    assert "stockade logs" in result.stderr
    ws = owner.get_workspace("owner", "w")
    # The build succeeded (the compute runs and the agent was launched): the
    # owner can get in and fix the script.
    assert ws.status == "running" and ws.latest_build.status == "succeeded"
    assert ws.agent is not None and ws.agent.lifecycle_state == "start_error"
    assert "about to fail" in agent_lines(owner, "w")


def test_a_local_workspace_agent_is_ready_restarts_and_stops(
    server: ServerProcess,
    owner: Client,
    tmp_path: Path,
    cli: Run,  # noqa: F811
) -> None:
    script = 'echo "run $(cat runs 2>/dev/null)"; echo x >> runs'
    template = push(owner, tmp_path, "local", script=script)
    owner.create_workspace("dev", template)
    ws = wait_for(owner, "dev", settled, "the agent")
    assert ws.agent is not None and ws.agent.lifecycle_state == "ready"
    assert ws.agent.status == "connected"
    assert "hello from the startup script as owner" in agent_lines(owner, "dev")
    first_agent = ws.agent.id

    # A restart is a new agent, with a new token, which runs the script again
    # (the home kept what the first run wrote).
    cli("login", server.url, "--username", "owner", "--password", OWNER_PASSWORD)
    restarted = cli("restart", "dev")
    assert "run x" in restarted.stdout
    ws = owner.get_workspace("owner", "dev")
    assert ws.agent is not None and ws.agent.id != first_agent
    assert ws.agent.lifecycle_state == "ready"
    assert agent_rows(server, ws.id)[0] == ("off", 1, 1)

    # --no-wait returns when the build ends.
    cli("stop", "dev")
    quick = cli("start", "dev", "--no-wait")
    assert "Waiting for the agent" not in quick.stdout
    wait_for(owner, "dev", settled, "the agent after start")
    cli("stop", "dev")
    ws = owner.get_workspace("owner", "dev")
    assert ws.agent is None
    assert all(revoked for _, revoked, _ in agent_rows(server, ws.id))


def test_the_agent_token_is_not_in_the_server_log_or_build_logs(
    server: ServerProcess, owner: Client, tmp_path: Path
) -> None:
    template = push(owner, tmp_path, "local")
    owner.create_workspace("quiet", template)
    wait_for(owner, "quiet", settled, "the agent")
    ws = owner.get_workspace("owner", "quiet")
    state = subprocess.run(
        ["cat", str(server.data_dir / "workspaces" / ws.id / "agent.log")],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    everything = (
        server.logs()
        + state
        + "\n".join(line.line for line in owner.build_logs("owner", "quiet").logs)
    )
    # The token is "<agent id>-<secret>": the id may be logged, the secret never.
    assert ws.agent is not None
    assert "connected to" in state  # the agent's own log is there
    for line in everything.splitlines():
        assert f"{ws.agent.id}-" not in line, line
