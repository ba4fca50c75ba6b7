"""A workspace whose agent is a real process started by the test, through a
real server: the test plays the provisioner (no backend involved), as a
backend's compute would start the agent. For tests of what the agent serves
(streams, terminals, apps) rather than of the backends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from stockade.sdk import Client, types
from stockade.sdk.templates import build_archive
from tests.server.test_build_queue import Daemon


def start_agent(
    url: str, token: str, home: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The agent, from the source tree, as a workspace's bootstrap runs it."""
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "STOCKADE_ACCESS_URL": url,
        "STOCKADE_AGENT_TOKEN": token,
        **(extra_env or {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "stockade.agent"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_until(
    read: Callable[[], types.Workspace], check: Callable[[types.Workspace], bool], what: str
) -> types.Workspace:
    deadline = time.monotonic() + 30
    while True:
        ws = read()
        if check(ws):
            return ws
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {ws.agent}"
        time.sleep(0.1)


@contextmanager
def agent_workspace(
    url: str,
    owner: Client,
    manifest: str,
    home: Path,
    *,
    agent_env: dict[str, str] | None = None,
) -> Iterator[Path]:
    """Push ``manifest`` as template ``t``, create the owner's workspace
    ``w``, finish its start build as a provisioner would, run its agent with
    ``home`` and wait until it is ready; yields the home. ``owner`` is signed
    in as the site owner."""
    directory = home.with_name(home.name + "-template")
    directory.mkdir()
    (directory / "stockade.yaml").write_text(manifest)
    owner.push_template("t", build_archive(directory))
    daemon = Daemon(url, owner.create_provisioner_key("test").key)
    try:
        owner.create_workspace("w", "t")
        job = daemon.acquire()
        assert job is not None
        assert daemon.complete(job["build_id"]).status_code == 204
        agent = start_agent(url, str(job["agent_token"]), home, agent_env)
        try:
            wait_until(
                lambda: owner.get_workspace("owner", "w"),
                lambda w: w.agent is not None and w.agent.lifecycle_state == "ready",
                "the agent to be ready",
            )
            yield home
        finally:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
            if agent.stderr:
                agent.stderr.close()
    finally:
        daemon.http.close()
