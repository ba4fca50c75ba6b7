"""The docker backend against the real Docker daemon and the offline base
image (scripts/build-base-image.sh). Every test works in a deployment of its
own, and everything labelled with it is removed afterwards."""

from __future__ import annotations

import asyncio
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
)
from stockade.provisioner.backends.docker import (
    DockerBackend,
    container_name,
    hostname_for,
    image_home,
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
        agent={"startup_script": 'echo "hello from $STOCKADE_WORKSPACE_NAME"; id -un; pwd'},
        env={"STOCKADE_AGENT_TOKEN": "secret-token"},
    )
    state = await docker_backend.start(spec, {}, progress)

    assert progress.stages == [
        "Checking image",
        "Preparing network",
        "Preparing home volume",
        "Starting container",
        "Running startup script",
    ]
    text = progress.text()
    assert "hello from My_WS\nstockade\n/home/stockade" in text
    assert "The startup script finished." in text
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
    assert env["STOCKADE_AGENT_TOKEN"] == "secret-token"
    assert env["HOME"] == "/home/stockade"
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


async def test_a_failing_startup_script_is_a_warning(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec(agent={"startup_script": "echo trying; exit 7"})
    await docker_backend.start(spec, {}, progress)
    assert ("info", "trying") in progress.lines
    assert any(level == "warn" and "exit code 7" in line for level, line in progress.lines)
    assert container_of(docker_client, spec.workspace_id).status == "running"


async def test_home_survives_stop_and_start(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec(agent={"startup_script": "echo run >> ~/runs.txt"})
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
    assert run_in(container, "cat ~/work.txt ~/runs.txt") == "precious\nrun\nrun\n"

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
    spec = make_docker_spec(agent={"startup_script": "echo started once"})
    first = await docker_backend.start(spec, {}, progress)
    # A retry after a worker died: the old state, same spec.
    again = RecordedProgress()
    second = await docker_backend.start(spec, {}, again)
    assert second == first
    assert "Adopted the running container" in again.text()
    # The startup output so far is still shown.
    assert ("info", "started once") in again.lines
    mine = {"label": f"stockade.workspace_id={spec.workspace_id}"}
    assert len(docker_client.containers.list(all=True, filters=mine)) == 1


async def test_changed_config_replaces_the_container_and_keeps_the_home(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec(agent={"startup_script": "echo v1"}, compute={"cpu": 1})
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
    assert ("info", "v2") in again.lines and ("info", "v1") not in again.lines
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


async def test_container_exiting_before_the_marker_fails_with_its_output(
    docker_backend: DockerBackend, make_docker_spec: SpecFactory, progress: RecordedProgress
) -> None:
    # Killing the init shell ends the container mid-script.
    spec = make_docker_spec(agent={"startup_script": "echo about to go; kill -9 $PPID; sleep 5"})
    with pytest.raises(BackendError) as caught:
        await docker_backend.start(spec, {}, progress)
    assert caught.value.reason == "compute_exited"
    assert "about to go" in caught.value.message
    status = await docker_backend.status(spec.workspace_id, {})
    assert status.state == "stopped" and "exited with code" in status.detail


async def test_status_of_a_container_stopped_behind_our_back_and_restart(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec(agent={"startup_script": "echo boot >> ~/boots.txt"})
    assert await docker_backend.status(spec.workspace_id, {}) == ComputeStatus("missing")
    state = await docker_backend.start(spec, {}, progress)
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
    assert run_in(container, "cat ~/boots.txt") == "boot\nboot\n"


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


async def test_cancel_while_following_logs_ends_the_log_thread(
    docker_backend: DockerBackend,
    make_docker_spec: SpecFactory,
    progress: RecordedProgress,
    docker_client: Any,
) -> None:
    spec = make_docker_spec(agent={"startup_script": "echo working; sleep 300"})
    task = asyncio.create_task(docker_backend.start(spec, {}, progress))
    deadline = time.monotonic() + 30
    while ("info", "working") not in progress.lines:
        assert time.monotonic() < deadline, progress.lines
        await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    def log_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("stockade-logs-")]

    deadline = time.monotonic() + 5
    while log_threads():
        assert time.monotonic() < deadline, log_threads()
        await asyncio.sleep(0.05)
    # The container was left as it was; stop releases it.
    assert container_of(docker_client, spec.workspace_id).status == "running"
    await docker_backend.stop(spec, {}, progress)
    assert container_of(docker_client, spec.workspace_id) is None
