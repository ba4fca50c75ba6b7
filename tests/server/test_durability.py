"""Kill -9 the server in the middle of a start build: after a restart the
build ends, nothing is orphaned, and the workspace works again."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client
from stockade.sdk.templates import build_archive
from tests.conftest import OWNER_PASSWORD, ServerFactory, require
from tests.provisioner.conftest import BASE_IMAGE, docker_available, image_present

SLOW_START = "echo startup begins; sleep 1; echo startup ends"


def require_backend(kind: str) -> None:
    """What a workspace backend needs on this machine (fails in CI when missing)."""
    if kind == "docker":
        require("Docker", docker_available(), "apt-get install docker.io and start dockerd")
        require("the base image", image_present(BASE_IMAGE), "run scripts/build-base-image.sh")
    else:
        require("bubblewrap", os.path.exists("/usr/bin/bwrap"), "apt-get install bubblewrap")


def sandbox_inits(workspace_id: str) -> list[int]:
    """Host pids of the local workspace's sandboxes: bwrap processes that
    carry its marker and are pid 1 of their own pid namespace (read from /proc)."""
    found = []
    marker = f"STOCKADE_SANDBOX_OF={workspace_id}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            status = (entry / "status").read_text()
        except OSError:
            continue
        nspid = next(
            (line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), []
        )
        if marker in environ and len(nspid) > 1 and nspid[-1] == "1" and "State:\tZ" not in status:
            found.append(int(entry.name))
    return found


def docker_resources(workspace_id: str) -> tuple[list[str], list[str]]:
    label = f"label=stockade.workspace_id={workspace_id}"
    containers = subprocess.run(
        ["docker", "ps", "-aq", "--filter", label], capture_output=True, text=True, check=True
    ).stdout.split()
    volumes = subprocess.run(
        ["docker", "volume", "ls", "-q", "--filter", label],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return containers, volumes


def compute_count(kind: str, workspace_id: str) -> tuple[int, int]:
    """(running computes, home stores) of a workspace, seen from outside Stockade."""
    if kind == "local":
        return len(sandbox_inits(workspace_id)), -1
    containers, volumes = docker_resources(workspace_id)
    return len(containers), len(volumes)


def wait_for(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def settle(client: Client, owner: str, name: str, timeout: float = 90) -> str:
    final = {"running", "stopped", "failed", "canceled", "deleted"}
    status = ""

    def done() -> bool:
        nonlocal status
        status = client.get_workspace(owner, name).status
        return status in final

    wait_for(done, timeout, f"{name} to settle")
    return status


@pytest.mark.parametrize("kind", ["local", "docker"])
def test_kill_9_mid_start_build(
    start_server: ServerFactory, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    require_backend(kind)
    server: ServerProcess = start_server(
        env={"STOCKADE_JOB_LEASE_SECONDS": "3", "STOCKADE_RECONCILE_INTERVAL_SECONDS": "2"}
    )
    client = Client(server.url)
    request.addfinalizer(client.close)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    directory = tmp_path / "tpl"
    directory.mkdir()
    image = f"\ncompute:\n  image: {BASE_IMAGE}\n" if kind == "docker" else ""
    (directory / "stockade.yaml").write_text(
        f"name: slow\nbackend: {kind}\nagent:\n  startup_script: {SLOW_START}\n{image}"
    )
    client.push_template("slow", build_archive(directory))
    ws = client.create_workspace("victim", "slow")

    # A start build ends once the agent is launched (well under a second):
    # kill the server as soon as a worker holds the build. The build may still
    # have ended first; what follows must hold either way.
    def acquired() -> bool:
        return client.get_build("owner", "victim", 1).status != "pending"

    deadline = time.monotonic() + 60
    while not acquired():
        assert time.monotonic() < deadline, "no worker took the build"
        time.sleep(0.005)
    server.stop(signal.SIGKILL)

    server.start()
    client = Client(server.url)
    request.addfinalizer(client.close)
    client.login("owner", OWNER_PASSWORD)
    status = settle(client, "owner", "victim")
    build = client.get_build("owner", "victim", 1)
    assert build.status in ("succeeded", "failed"), build
    if build.status == "failed":
        assert build.reason and build.error, build
    else:
        assert status == "running"
    # One compute, adopted or replaced, never two.
    computes, homes = compute_count(kind, ws.id)
    assert computes <= 1 and homes in (-1, 1), (computes, homes)
    if build.status == "succeeded":
        assert computes == 1

        # The agent of the build's compute comes back and runs the startup
        # script to its end.
        def ready() -> bool:
            agent = client.get_workspace("owner", "victim").agent
            return agent is not None and agent.lifecycle_state == "ready"

        wait_for(ready, 60, "the agent to be ready")
        lines = [line.line for line in client.agent_logs("owner", "victim").logs]
        assert lines == ["startup begins", "startup ends"], lines

    # The workspace works again: stop, start, delete.
    client.create_build("owner", "victim", "stop")
    assert settle(client, "owner", "victim") == "stopped"
    assert compute_count(kind, ws.id)[0] == 0
    client.create_build("owner", "victim", "start")
    assert settle(client, "owner", "victim") == "running"
    assert compute_count(kind, ws.id)[0] == 1
    client.create_build("owner", "victim", "delete")

    def gone() -> bool:
        try:
            client.get_workspace("owner", "victim")
        except ApiError as exc:
            return exc.status == 404
        return False

    wait_for(gone, 60, "the delete")
    assert compute_count(kind, ws.id) == (0, -1 if kind == "local" else 0)
    if kind == "local":
        assert not (server.data_dir / "workspaces" / ws.id).exists()
