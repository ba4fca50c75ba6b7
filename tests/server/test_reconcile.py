"""The server notices workspaces whose compute died behind its back."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from stockade.sdk import Client
from stockade.sdk.templates import build_archive
from tests.conftest import OWNER_PASSWORD, ServerFactory
from tests.provisioner.conftest import BASE_IMAGE
from tests.server.test_durability import (
    docker_resources,
    require_backend,
    sandbox_inits,
    settle,
)


@pytest.mark.parametrize("kind", ["local", "docker"])
def test_a_dead_compute_is_recorded(
    start_server: ServerFactory, tmp_path: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    require_backend(kind)
    server = start_server(env={"STOCKADE_RECONCILE_INTERVAL_SECONDS": "1"})
    client = Client(server.url)
    request.addfinalizer(client.close)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    directory = tmp_path / "tpl"
    directory.mkdir()
    image = f"compute:\n  image: {BASE_IMAGE}\n" if kind == "docker" else ""
    (directory / "stockade.yaml").write_text(f"name: t\nbackend: {kind}\n{image}")
    client.push_template("t", build_archive(directory))
    ws = client.create_workspace("w", "t")
    assert settle(client, "owner", "w") == "running"

    if kind == "docker":
        containers, _ = docker_resources(ws.id)
        subprocess.run(["docker", "kill", *containers], check=True, capture_output=True)
    else:
        for pid in sandbox_inits(ws.id):
            os.kill(pid, signal.SIGKILL)

    deadline = time.monotonic() + 20
    while True:
        shown = client.get_workspace("owner", "w")
        if shown.compute_status in ("stopped", "missing"):
            break
        assert time.monotonic() < deadline, shown
        time.sleep(0.2)
    # The build history is untouched; a start brings it back.
    assert shown.status == "running" and shown.latest_build.status == "succeeded"
    client.create_build("owner", "w", "start")
    assert settle(client, "owner", "w") == "running"
    deadline = time.monotonic() + 20
    while client.get_workspace("owner", "w").compute_status != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    client.create_build("owner", "w", "delete")
    deadline = time.monotonic() + 60
    while client.list_workspaces().count:
        assert time.monotonic() < deadline, "the delete did not finish"
        time.sleep(0.2)
