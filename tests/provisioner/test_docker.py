"""The docker backend against the real Docker daemon and the offline base
image (scripts/build-base-image.sh). Every test works in a deployment of its
own, and everything labelled with it is removed afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import pytest

from stockade.provisioner.backends.base import (
    BackendError,
    BackendOptions,
    ComputeStatus,
    Orphan,
    token_fingerprint,
)
from stockade.provisioner.backends.docker import (
    DockerBackend,
    container_name,
    hostname_for,
    image_home,
    is_loopback_url,
    volume_name,
)
from tests.provisioner.conftest import RecordedProgress, SpecFactory, with_compute


def container_of(client: Any, workspace_id: str) -> Any:
    """The workspace's container, or None."""
    try:
        return client.containers.get(container_name(workspace_id))
    except docker.errors.NotFound:
        return None


def volume_exists(client: Any, workspace_id: str) -> bool:
    try:
        client.volumes.get(volume_name(workspace_id))
    except docker.errors.NotFound:
        return False
    return True


def run_in(container: Any, command: str) -> str:
    """Run a shell command in the container as its user; its stdout."""
    code, output = container.exec_run(["/bin/sh", "-c", command])
    assert code == 0, output
    return str(output.decode())


# --- pure helpers (no Docker needed) -----------------------------------------------------


def test_image_home_comes_from_env_then_user() -> None:
    assert image_home({"Config": {"Env": ["PATH=/bin", "HOME=/work"], "User": "dev"}}) == "/work"
    assert image_home({"Config": {"Env": None, "User": "dev:dev"}}) == "/home/dev"
    assert image_home({"Config": {"User": ""}}) == "/root"
    assert image_home({"Config": {"User": "0:0"}}) == "/root"
    assert image_home({}) == "/root"


def test_hostname_is_a_valid_label() -> None:
    assert hostname_for("My_Workspace.1") == "my-workspace-1"
    assert hostname_for("___") == "workspace"
    assert len(hostname_for("a" * 100)) == 63


async def test_unreachable_docker_names_the_host(
    make_spec: SpecFactory, progress: RecordedProgress, tmp_path: Path
) -> None:
    host = f"unix://{tmp_path}/no-docker.sock"
    backend = DockerBackend(BackendOptions(workspaces_dir=tmp_path, docker_host=host))
    spec = with_compute(make_spec(backend="docker"), image="stockade-base:bookworm")
    with pytest.raises(BackendError) as caught:
        await backend.start(spec, {}, progress)
    assert caught.value.reason == "docker_unreachable"
    assert host in caught.value.message
    with pytest.raises(BackendError) as caught:
        await backend.status(spec.workspace_id, {})
    assert caught.value.reason == "docker_unreachable"
    await backend.close()


async def test_reconcile_needs_a_deployment_id(tmp_path: Path) -> None:
    backend = DockerBackend(BackendOptions(workspaces_dir=tmp_path))
    with pytest.raises(BackendError) as caught:
        await backend.reconcile(set())
    assert caught.value.reason == "misconfigured"


# --- against Docker ---------------------------------------------------------------------


async def test_start_runs_a_labelled_limited_container_with_a_home_volume(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec(
        workspace_name="My_WS",
        compute={"cpu": 0.5, "memory": "256MiB", "home_size": "1GiB"},
        agent_token="secret-token",
        agent_bundle_sha256="ab" * 32,
    )
    state = await docker_backend.start(spec, {}, progress)

    # The build ends once the agent is launched: no startup script stage.
    assert progress.stages == [
        "Checking image",
        "Preparing network",
        "Preparing home volume",
        "Starting container",
    ]
    assert "The agent runs in the container" in progress.text()
    assert "secret-token" not in progress.text()
    assert any(level == "warn" and "home_size" in line for level, line in progress.lines)

    container = container_of(docker_client, spec.workspace_id)
    assert container is not None and container.status == "running"
    assert state["container_id"] == container.id
    assert state["volume"] == volume_name(spec.workspace_id)
    assert state["config_hash"] == spec.config_hash
    assert state["image_id"] == docker_client.images.get("stockade-base:bookworm").id
    assert container.labels["stockade.deployment"] == spec.deployment_id
    assert container.labels["stockade.workspace_id"] == spec.workspace_id
    assert container.labels["stockade.workspace_name"] == "My_WS"
    assert container.labels["stockade.owner"] == "alice"
    assert container.labels["stockade.config_hash"] == spec.config_hash
    assert container.labels["stockade.agent"] == token_fingerprint("secret-token")

    host_config = container.attrs["HostConfig"]
    assert host_config["NanoCpus"] == 500_000_000
    assert host_config["SecurityOpt"] == ["no-new-privileges"]
    assert host_config["PidsLimit"] == 4096
    assert host_config["Memory"] == 256 * 1024 * 1024
    assert host_config["Init"] is True
    assert "host.docker.internal:host-gateway" in host_config["ExtraHosts"]
    assert container.attrs["Config"]["Hostname"] == "my-ws"
    assert container.attrs["Config"]["User"] == "stockade"  # the image's user
    env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
    assert env["STOCKADE_WORKSPACE_ID"] == spec.workspace_id
    assert env["HOME"] == "/home/stockade"
    assert env["STOCKADE_ACCESS_URL"] == spec.access_url
    assert env["STOCKADE_AGENT_BUNDLE_SHA256"] == "ab" * 32
    # The token is nowhere in what `docker inspect` shows; the bootstrap (still
    # trying to reach a server that is not there) has it, and its file is gone.
    assert "secret-token" not in json.dumps(container.attrs)
    assert (
        run_in(container, "test -e /.stockade/agent-token && echo there || echo gone") == "gone\n"
    )
    holders = run_in(container, "grep -l secret-token /proc/[0-9]*/environ; true").split()
    assert holders, "no process of the workspace got the agent token"
    assert "stockade-bootstrap" in run_in(container, "ps -o args= -p 1,$(pgrep -d, sh)")
    mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
    assert mounts["/home/stockade"]["Type"] == "volume"
    assert mounts["/home/stockade"]["Name"] == volume_name(spec.workspace_id)
    assert list(container.attrs["NetworkSettings"]["Networks"]) == [state["network"]]

    volume = docker_client.volumes.get(volume_name(spec.workspace_id))
    assert volume.attrs["Labels"]["stockade.deployment"] == spec.deployment_id
    assert volume.attrs["Labels"]["stockade.workspace_id"] == spec.workspace_id
    network = docker_client.networks.get(state["network"])
    assert network.attrs["Labels"]["stockade.deployment"] == spec.deployment_id
    # The image's home skeleton was copied into the new volume, owned by the user.
    assert run_in(container, "stat -c %U ~ && ls -A ~").split() == [
        "stockade",
        ".bash_logout",
        ".bashrc",
        ".profile",
    ]
    assert await docker_backend.status(spec.workspace_id, state) == ComputeStatus(
        "running", f"container {container.short_id}"
    )


async def test_home_survives_stop_and_start(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec()
    state = await docker_backend.start(spec, {}, progress)
    run_in(container_of(docker_client, spec.workspace_id), "echo precious > ~/work.txt")

    state = await docker_backend.stop(spec, state, progress)
    assert container_of(docker_client, spec.workspace_id) is None
    assert volume_exists(docker_client, spec.workspace_id)
    assert state["container_id"] is None
    assert state["volume"] == volume_name(spec.workspace_id)
    assert await docker_backend.status(spec.workspace_id, state) == ComputeStatus("missing")

    state = await docker_backend.start(spec, state, progress)
    container = container_of(docker_client, spec.workspace_id)
    assert run_in(container, "cat ~/work.txt") == "precious\n"

    # Stopping twice, as a retried job does, is fine.
    await docker_backend.stop(spec, state, progress)
    await docker_backend.stop(spec, state, progress)
    assert "already gone" in progress.lines[-1][1]


async def test_delete_removes_container_and_volume(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec()
    state = await docker_backend.start(spec, {}, progress)
    await docker_backend.delete(spec, state, progress)
    assert container_of(docker_client, spec.workspace_id) is None
    assert not volume_exists(docker_client, spec.workspace_id)
    # Again, and for a workspace that never existed.
    await docker_backend.delete(spec, state, progress)
    await docker_backend.delete(make_docker_spec(), {}, progress)
    assert await docker_backend.status(spec.workspace_id, state) == ComputeStatus("missing")


async def test_start_twice_adopts_the_running_container(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec(agent_token="token-1")
    first = await docker_backend.start(spec, {}, progress)
    # The same build again (a new backend after a restart): the same spec.
    again = RecordedProgress()
    second = await docker_backend.start(spec, {}, again)
    assert second == first
    assert "Adopted the running container" in again.text()
    mine = {"label": f"stockade.workspace_id={spec.workspace_id}"}
    assert len(docker_client.containers.list(all=True, filters=mine)) == 1
    # A new start build brings a new token (the old one is revoked): the
    # container is replaced, or its agent could never connect again.
    renewed = RecordedProgress()
    third = await docker_backend.start(
        dataclasses.replace(spec, agent_token="token-2"), first, renewed
    )
    assert third["container_id"] != first["container_id"]
    assert "Replaced the container" in renewed.text()
    assert len(docker_client.containers.list(all=True, filters=mine)) == 1


async def test_changed_config_replaces_the_container_and_keeps_the_home(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec(compute={"cpu": 1})
    state = await docker_backend.start(spec, {}, progress)
    run_in(container_of(docker_client, spec.workspace_id), "echo mine > ~/file.txt")

    updated = make_docker_spec(
        workspace_id=spec.workspace_id,
        template_version=2,
        agent={"startup_script": "echo v2"},
        compute={"cpu": 0.25},
    )
    assert updated.config_hash != spec.config_hash
    again = RecordedProgress()
    new_state = await docker_backend.start(updated, state, again)

    assert new_state["container_id"] != state["container_id"]
    assert new_state["config_hash"] == updated.config_hash
    assert "configuration changed" in again.text()
    container = container_of(docker_client, spec.workspace_id)
    assert container.id == new_state["container_id"]
    assert container.labels["stockade.config_hash"] == updated.config_hash
    assert container.attrs["HostConfig"]["NanoCpus"] == 250_000_000
    assert run_in(container, "cat ~/file.txt") == "mine\n"


async def test_missing_image_is_never_pulled(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    image = f"stockade-test-missing-{uuid.uuid4().hex[:8]}:latest"
    spec = make_docker_spec(compute={"image": image})
    with pytest.raises(BackendError) as caught:
        await docker_backend.start(spec, {}, progress)
    assert caught.value.reason == "image_missing"
    assert image in caught.value.message
    assert "docker load -i" in caught.value.message
    assert container_of(docker_client, spec.workspace_id) is None
    with pytest.raises(docker.errors.ImageNotFound):
        docker_client.images.get(image)


async def test_missing_base_image_says_how_to_build_it(
    docker_backend: DockerBackend, make_docker_spec: SpecFactory, progress: RecordedProgress
) -> None:
    # The base image's name with a tag that is not there.
    spec = make_docker_spec(compute={"image": "stockade-base:no-such-tag"})
    with pytest.raises(BackendError) as caught:
        await docker_backend.start(spec, {}, progress)
    assert caught.value.reason == "image_missing"
    assert "stockade-base:no-such-tag" in caught.value.message
    # Only the exact base image gets the build hint.
    assert "build-base-image.sh" not in caught.value.message


async def test_gpu_request_without_gpu_fails_clearly(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec(compute={"gpus": 1})
    with pytest.raises(BackendError) as caught:
        await docker_backend.start(spec, {}, progress)
    assert caught.value.reason == "gpu_unavailable"
    assert "1 GPU" in caught.value.message
    # Nothing half-made remains to be adopted later.
    assert container_of(docker_client, spec.workspace_id) is None
    assert await docker_backend.status(spec.workspace_id, {}) == ComputeStatus("missing")


async def test_an_agent_that_cannot_start_stops_the_container(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    # No access URL: the bootstrap says so and exits, and the container with it.
    spec = make_docker_spec(access_url="")
    await docker_backend.start(spec, {}, progress)
    deadline = time.monotonic() + 30
    while (status := await docker_backend.status(spec.workspace_id, {})).state == "running":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert status == ComputeStatus("stopped", "exited with code 1")
    output = container_of(docker_client, spec.workspace_id).logs().decode()
    assert "STOCKADE_ACCESS_URL is not set" in output


async def test_status_of_a_container_stopped_behind_our_back_and_restart(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec()
    assert await docker_backend.status(spec.workspace_id, {}) == ComputeStatus("missing")
    state = await docker_backend.start(spec, {}, progress)
    run_in(container_of(docker_client, spec.workspace_id), "echo boot >> ~/boots.txt")
    assert (await docker_backend.status(spec.workspace_id, state)).state == "running"

    container_of(docker_client, spec.workspace_id).kill()
    for _ in range(50):
        status = await docker_backend.status(spec.workspace_id, state)
        if status.state != "running":
            break
        await asyncio.sleep(0.1)
    assert status == ComputeStatus("stopped", "exited with code 137")

    # start recreates a container that does not run; the home stays.
    again = RecordedProgress()
    state = await docker_backend.start(spec, state, again)
    assert "Recreated the container" in again.text()
    container = container_of(docker_client, spec.workspace_id)
    assert container.id == state["container_id"]
    assert run_in(container, "cat ~/boots.txt") == "boot\n"


async def test_reconcile_removes_this_deployments_orphans_only(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
    docker_deployments: set[str],
    tmp_path: Path,
) -> None:
    live = make_docker_spec()
    orphan = make_docker_spec()
    other_deployment = uuid.uuid4().hex
    docker_deployments.add(other_deployment)
    foreign = make_docker_spec(deployment_id=other_deployment)
    other = DockerBackend(BackendOptions(workspaces_dir=tmp_path), deployment_id=other_deployment)
    for backend, spec in ((docker_backend, live), (docker_backend, orphan), (other, foreign)):
        await backend.start(spec, {}, progress)

    # Just made: its workspace may be newer than the live set, so it stays.
    assert await docker_backend.reconcile({live.workspace_id}) == []
    assert container_of(docker_client, orphan.workspace_id) is not None
    docker_backend.reconcile_grace_seconds = 0
    removed = await docker_backend.reconcile({live.workspace_id})

    assert sorted(removed, key=lambda o: o.kind) == [
        Orphan("container", container_name(orphan.workspace_id), orphan.workspace_id),
        Orphan("volume", volume_name(orphan.workspace_id), orphan.workspace_id),
    ]
    assert container_of(docker_client, orphan.workspace_id) is None
    assert not volume_exists(docker_client, orphan.workspace_id)
    assert container_of(docker_client, live.workspace_id).status == "running"
    # Another deployment's workspace is not in our live set, and stays.
    assert container_of(docker_client, foreign.workspace_id).status == "running"
    assert volume_exists(docker_client, foreign.workspace_id)
    assert await docker_backend.reconcile({live.workspace_id}) == []
    await other.close()


async def test_another_deployments_container_is_never_touched(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
    docker_deployments: set[str],
    tmp_path: Path,
) -> None:
    spec = make_docker_spec()
    await docker_backend.start(spec, {}, progress)
    other_deployment = uuid.uuid4().hex
    docker_deployments.add(other_deployment)
    other = DockerBackend(BackendOptions(workspaces_dir=tmp_path), deployment_id=other_deployment)
    # The same workspace id in another deployment (a restored backup, say).
    clash = make_docker_spec(workspace_id=spec.workspace_id, deployment_id=other_deployment)
    for call in (other.start, other.stop, other.delete):
        with pytest.raises(BackendError) as caught:
            await call(clash, {}, progress)
        assert caught.value.reason == "name_conflict"
    assert (await other.status(spec.workspace_id, {})).state == "missing"
    assert container_of(docker_client, spec.workspace_id).status == "running"
    await other.close()


async def test_a_canceled_start_leaves_a_container_that_stop_removes(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec()
    ensure_container = docker_backend._ensure_container
    creating, created = threading.Event(), threading.Event()

    def slow_ensure_container(*args: Any) -> Any:
        # Holds the create in its thread long enough that the cancel below
        # always lands while it is on its way to Docker.
        creating.set()
        time.sleep(0.5)
        try:
            return ensure_container(*args)
        finally:
            created.set()

    docker_backend._ensure_container = slow_ensure_container  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(docker_backend.start(spec, {}, progress))
    assert await asyncio.to_thread(creating.wait, 30), progress.stages
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    # Whatever the cancel interrupted, stop removes it, and a start adopts
    # nothing half-made.
    await docker_backend.stop(spec, {}, progress)
    assert await asyncio.to_thread(created.wait, 30)
    assert container_of(docker_client, spec.workspace_id) is None
    docker_backend._ensure_container = ensure_container  # type: ignore[method-assign]
    await docker_backend.start(spec, {}, progress)
    assert container_of(docker_client, spec.workspace_id).status == "running"


async def test_loopback_access_urls_become_the_gateway_when_asked(
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
    tmp_path: Path,
) -> None:
    spec = make_docker_spec(access_url="http://127.0.0.1:7123")
    asked: list[str] = []

    async def agent_url(gateway: str) -> str:
        asked.append(gateway)
        return f"http://{gateway}:7123"

    backend = DockerBackend(
        BackendOptions(workspaces_dir=tmp_path, docker_agent_url=agent_url),
        deployment_id=spec.deployment_id,
    )
    try:
        assert await backend.existing_gateway() is None  # no network yet
        state = await backend.start(spec, {}, progress)
        network = docker_client.networks.get(state["network"])
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
        assert asked == [gateway]
        assert await backend.existing_gateway() == gateway
        container = container_of(docker_client, spec.workspace_id)
        env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
        assert env["STOCKADE_ACCESS_URL"] == f"http://{gateway}:7123"
        # A URL that is not on loopback is left as it is.
        other = make_docker_spec(access_url="http://stockade.internal:7080")
        await backend.start(other, {}, progress)
        container = container_of(docker_client, other.workspace_id)
        env = dict(item.split("=", 1) for item in container.attrs["Config"]["Env"])
        assert env["STOCKADE_ACCESS_URL"] == "http://stockade.internal:7080"
        assert asked == [gateway]
    finally:
        await backend.close()


def test_loopback_urls_are_recognised() -> None:
    for url in (
        "http://127.0.0.1:7080",
        "http://localhost",
        "https://[::1]:8443",
        "http://127.9.0.1",
    ):
        assert is_loopback_url(url), url
    for url in ("http://10.1.2.3:7080", "http://stockade.internal", "http://0.0.0.0:7080"):
        assert not is_loopback_url(url), url
