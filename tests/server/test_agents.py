"""A real agent process against a real server: the token from a start build,
lifecycle, startup output and metadata on the workspace, revocation at stop.
The test plays the provisioner (so no backend is involved) and starts the
agent itself, as a backend's compute would."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from stockade.sdk import Client, types
from stockade.sdk.templates import build_archive
from tests.agents import start_agent, wait_until
from tests.conftest import OWNER_PASSWORD, ServerFactory
from tests.server.test_build_queue import Daemon

SQLITE_ONLY = "the agent's protocol; its storage is plain inserts and updates"

TEMPLATE = """\
name: t
backend: local
parameters:
  - name: colour
    default: blue
agent:
  startup_script: |
    echo "hello from the startup script"
    echo "colour=$STOCKADE_PARAMETER_COLOUR token=${STOCKADE_AGENT_TOKEN:-none}"
  metadata:
    - key: answer
      script: echo 42
      interval: 1
"""


@pytest.fixture
def setup(start_server: ServerFactory, tmp_path: Path) -> Iterator[tuple[str, Client, Daemon]]:
    server = start_server(env={"STOCKADE_PROVISIONER_WORKERS": "0"})
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    directory = tmp_path / "tpl"
    directory.mkdir()
    (directory / "stockade.yaml").write_text(TEMPLATE)
    client.push_template("t", build_archive(directory))
    daemon = Daemon(server.url, client.create_provisioner_key("test").key)
    yield server.url, client, daemon
    daemon.http.close()
    client.close()


def test_an_agent_reports_and_is_revoked_at_stop(
    setup: tuple[str, Client, Daemon], tmp_path: Path
) -> None:
    url, client, daemon = setup
    client.create_workspace("w", "t")
    job = daemon.acquire()
    assert job is not None and job["agent_token"], job
    token = str(job["agent_token"])
    assert daemon.complete(job["build_id"]).status_code == 204
    ws = client.get_workspace("owner", "w")
    assert ws.agent is not None and ws.agent.status == "connecting"

    agent = start_agent(url, token, tmp_path / "home")
    try:

        def read() -> types.Workspace:
            return client.get_workspace("owner", "w")

        ws = wait_until(
            read,
            lambda w: w.agent is not None and w.agent.lifecycle_state == "ready",
            "the agent to be ready",
        )
        assert ws.agent is not None
        assert ws.agent.status == "connected"
        assert ws.agent.python and ws.agent.hostname
        lines = [line.line for line in client.agent_logs("owner", "w").logs]
        assert "hello from the startup script" in lines
        # Parameters reach the script; the agent's token does not.
        assert "colour=blue token=none" in lines
        ws = wait_until(
            read,
            lambda w: w.agent is not None and any(m.key == "answer" for m in w.agent.metadata),
            "metadata",
        )
        assert ws.agent is not None
        assert [(m.key, m.value) for m in ws.agent.metadata] == [("answer", "42")]

        # A stop revokes the token: the agent is disconnected and refused.
        client.create_build("owner", "w", "stop")
        stop = daemon.acquire()
        assert stop is not None and stop["agent_token"] is None
        assert daemon.complete(stop["build_id"]).status_code == 204
        assert agent.wait(timeout=30) != 0
        assert client.get_workspace("owner", "w").agent is None
        stderr = agent.stderr.read().decode() if agent.stderr else ""
        assert token not in stderr
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if agent.stderr:
            agent.stderr.close()


def test_a_wrong_or_old_token_is_refused(setup: tuple[str, Client, Daemon], tmp_path: Path) -> None:
    url, client, daemon = setup
    client.create_workspace("w", "t")
    job = daemon.acquire()
    assert job is not None
    daemon.complete(job["build_id"])
    forged = str(job["agent_token"])[:-4] + "abcd"
    agent = start_agent(url, forged, tmp_path / "home")
    try:
        assert agent.wait(timeout=30) != 0
        assert client.get_workspace("owner", "w").agent.status == "connecting"  # type: ignore[union-attr]
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
        if agent.stderr:
            agent.stderr.close()


def test_the_bundle_is_served_with_its_sha(setup: tuple[str, Client, Daemon]) -> None:
    url, _, _ = setup
    first = httpx.get(f"{url}/api/v2/agent/bundle.pyz")
    assert first.status_code == 200
    sha = first.headers["x-stockade-sha256"]
    assert hashlib.sha256(first.content).hexdigest() == sha
    assert first.content[:2] == b"#!" or first.content[:2] == b"PK"
    again = httpx.get(f"{url}/api/v2/agent/bundle.pyz", headers={"If-None-Match": f'"{sha}"'})
    assert again.status_code == 304
    # The bootstrap asks with HEAD whether its cached bundle is current.
    head = httpx.head(f"{url}/api/v2/agent/bundle.pyz")
    assert head.status_code == 200 and head.headers["x-stockade-sha256"] == sha
    assert head.content == b""
