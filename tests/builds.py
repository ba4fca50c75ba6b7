"""Helpers for tests of builds on the local backend now that a start build ends
once the agent is launched: holding a build in progress, and waiting for the
agent (which runs the startup script after the build)."""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stockade.sdk import Client, types

# The agent's lifecycle states once the startup script has ended one way or another.
SETTLED = ("ready", "start_error", "start_timeout")


@contextmanager
def workspace_lock(workspaces_dir: Path, workspace_id: str) -> Iterator[None]:
    """Hold the local backend's per-workspace lock (``.locks/<id>.lock`` under
    its workspaces dir), as another worker running a build of the workspace
    would: every build of the workspace then waits in its first stage, in
    progress and cancelable, until the block ends. A startup script no longer
    keeps a build running, so this is how a test gets one that lasts."""
    path = workspaces_dir / ".locks" / f"{workspace_id}.lock"
    # Private like the backend's own (it may not have made them yet).
    missing = [d for d in (path.parent, *path.parent.parents) if not d.exists()]
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        os.close(fd)


def wait_for_build(
    client: Client,
    owner: str,
    name: str,
    number: int,
    statuses: tuple[str, ...] = ("running",),
    *,
    timeout: float = 60,
) -> types.WorkspaceBuild:
    """Build ``number`` of the workspace, once its status is one of ``statuses``."""
    deadline = time.monotonic() + timeout
    while True:
        build = client.get_build(owner, name, number)
        if build.status in statuses:
            return build
        assert time.monotonic() < deadline, f"build {number} still {build.status}: {build}"
        time.sleep(0.05)


def wait_for_agent(
    client: Client, owner: str, name: str, *, timeout: float = 60
) -> types.Workspace:
    """The workspace once its live agent has finished the startup script
    (ready, start_error or start_timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        ws = client.get_workspace(owner, name)
        if ws.agent is not None and ws.agent.lifecycle_state in SETTLED:
            return ws
        assert time.monotonic() < deadline, f"the agent of {owner}/{name} did not settle: {ws}"
        time.sleep(0.05)


def agent_lines(client: Client, owner: str, name: str) -> list[str]:
    """The startup script output the workspace's live agent reported."""
    return [line.line for line in client.agent_logs(owner, name).logs]


def build_lines(client: Client, owner: str, name: str, build: int | None = None) -> list[str]:
    """The lines of a build's log (the latest build's by default)."""
    return [line.line for line in client.build_logs(owner, name, build=build).logs]
