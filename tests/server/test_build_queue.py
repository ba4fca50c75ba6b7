"""The build queue seen from a worker: the test plays a provisioner daemon
over the real protocol (the server runs no workers of its own), so each step
of a race happens exactly when the test says."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade.sdk import ApiError, Client
from stockade.sdk.templates import build_archive
from tests.conftest import OWNER_PASSWORD, ServerFactory


class Daemon:
    """Speaks /api/v2/provisionerd/* with a provisioner key."""

    def __init__(self, url: str, key: str) -> None:
        self.http = httpx.Client(
            base_url=url, headers={"Stockade-Provisioner-Key": key}, trust_env=False
        )

    def acquire(self) -> dict[str, Any] | None:
        response = self.http.post(
            "/api/v2/provisionerd/acquire", json={"worker_id": "w1", "backends": ["local"]}
        )
        response.raise_for_status()
        return None if response.status_code == 204 else dict(response.json())

    def complete(self, build_id: str, status: str = "succeeded") -> httpx.Response:
        return self.http.post(
            f"/api/v2/provisionerd/jobs/{build_id}/complete",
            json={"worker_id": "w1", "status": status, "state": {}},
        )


@pytest.fixture
def queue(start_server: ServerFactory, tmp_path: Path) -> Iterator[tuple[Client, Daemon]]:
    server = start_server(
        env={
            "STOCKADE_PROVISIONER_WORKERS": "0",
            "STOCKADE_BUILD_TIMEOUT_SECONDS": "10",
            # The reaper runs every lease/3 seconds.
            "STOCKADE_JOB_LEASE_SECONDS": "3",
        }
    )
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    directory = tmp_path / "tpl"
    directory.mkdir()
    (directory / "stockade.yaml").write_text("name: t\nbackend: local\n")
    client.push_template("t", build_archive(directory))
    daemon = Daemon(server.url, client.create_provisioner_key("test").key)
    yield client, daemon
    daemon.http.close()
    client.close()


def running(client: Client, daemon: Daemon) -> None:
    """Create workspace "w" and finish its first start."""
    client.create_workspace("w", "t")
    job = daemon.acquire()
    assert job is not None and job["build_number"] == 1
    assert daemon.complete(job["build_id"]).status_code == 204
    assert client.get_workspace("owner", "w").status == "running"


def test_a_restart_superseded_while_its_stop_runs_queues_no_second_start(
    queue: tuple[Client, Daemon],
) -> None:
    client, daemon = queue
    running(client, daemon)
    client.create_build("owner", "w", "restart")
    stop = daemon.acquire()
    assert stop is not None and stop["transition"] == "stop"
    start = client.create_build("owner", "w", "start", cancel_running=True)
    assert start.number == 3
    # The stop finished before the worker saw the cancel: it stands, and the
    # restart's own start is not queued on top of the user's.
    assert daemon.complete(stop["build_id"]).status_code == 204
    builds = client.list_builds("owner", "w")
    assert [(b.number, b.transition, b.status) for b in builds] == [
        (1, "start", "succeeded"),
        (2, "stop", "succeeded"),
        (3, "start", "pending"),
    ]
    assert builds[1].reason is None
    nxt = daemon.acquire()
    assert nxt is not None and nxt["build_number"] == 3


def test_builds_queued_behind_a_delete_are_canceled_with_it(
    queue: tuple[Client, Daemon],
) -> None:
    client, daemon = queue
    running(client, daemon)
    client.create_build("owner", "w", "delete")
    delete = daemon.acquire()
    assert delete is not None and delete["transition"] == "delete"
    client.create_build("owner", "w", "start", cancel_running=True)
    assert daemon.complete(delete["build_id"]).status_code == 204
    with pytest.raises(ApiError) as exc:
        client.get_workspace("owner", "w")
    assert exc.value.status == 404
    assert daemon.acquire() is None  # the start has nothing left to start


def test_a_build_no_worker_takes_fails_with_a_reason(queue: tuple[Client, Daemon]) -> None:
    client, _ = queue
    client.create_workspace("w", "t")
    deadline = time.monotonic() + 30
    while (ws := client.get_workspace("owner", "w")).status == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.5)
    assert ws.status == "failed"
    assert ws.latest_build.reason == "no_provisioner"
    assert "local backend" in (ws.latest_build.error or "")


def test_text_that_cannot_be_stored_is_refused(queue: tuple[Client, Daemon]) -> None:
    client, _ = queue
    for raw in ('"\\ud800"', '"a\\u0000b"', '"' + "x" * 5000 + '"', '{"a": 1}'):
        reply = httpx.post(
            f"{client.url}/api/v2/workspaces",
            content=f'{{"name": "s", "template": "t", "parameters": {{"p": {raw}}}}}',
            headers={"Authorization": f"Bearer {client.token}", "Content-Type": "application/json"},
        )
        assert reply.status_code == 400, (raw[:20], reply.text)
        assert "parameter" in reply.json()["message"] or "Unicode" in reply.json()["message"]
    assert client.list_workspaces().count == 0
