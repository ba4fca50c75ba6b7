"""Fixtures for backend tests: workspace specs and a progress recorder."""

from __future__ import annotations

import dataclasses
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import docker
import pytest

from stockade.provisioner.backends.base import BackendOptions, WorkspaceSpec
from stockade.provisioner.backends.docker import DockerBackend
from stockade.sdk.templates import Compute, Manifest, resolve_compute
from tests.conftest import require

SpecFactory = Callable[..., WorkspaceSpec]


class RecordedProgress:
    """A ``Progress`` that keeps what it was told."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.lines: list[tuple[str, str]] = []

    async def stage(self, name: str) -> None:
        self.stages.append(name)

    async def log(self, line: str, *, level: Literal["info", "warn", "error"] = "info") -> None:
        self.lines.append((level, line))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


@pytest.fixture
def progress() -> RecordedProgress:
    return RecordedProgress()


@pytest.fixture
def make_spec(tmp_path: Path) -> SpecFactory:
    """A spec for a new workspace; keyword arguments override manifest fields
    (``backend``, ``compute``, ``agent``...) or spec fields (``workspace_id``...)."""
    deployment_id = uuid.uuid4().hex

    def factory(**overrides: Any) -> WorkspaceSpec:
        spec_fields = {f for f in WorkspaceSpec.__dataclass_fields__ if f != "manifest"}
        spec_overrides = {k: overrides.pop(k) for k in list(overrides) if k in spec_fields}
        manifest = Manifest.model_validate({"name": "test", "backend": "local", **overrides})
        parameters = spec_overrides.pop("parameters", {})
        files = tmp_path / "template"
        files.mkdir(exist_ok=True)
        fields: dict[str, Any] = {
            "workspace_id": str(uuid.uuid4()),
            "workspace_name": "ws",
            "owner_id": str(uuid.uuid4()),
            "owner_username": "alice",
            "deployment_id": deployment_id,
            "build_id": str(uuid.uuid4()),
            "build_number": 1,
            "template_name": manifest.name,
            "template_version": 1,
            "manifest": manifest,
            "parameters": parameters,
            "compute": resolve_compute(manifest.compute, parameters),
            "files_dir": files,
            # Nothing listens there: the agent retries until it is stopped.
            "access_url": "http://127.0.0.1:9",
            "env": {},
        }
        fields.update(spec_overrides)
        return WorkspaceSpec(**fields)

    return factory


# --- docker backend ---------------------------------------------------------------------

BASE_IMAGE = "stockade-base:bookworm"


def docker_available() -> bool:
    """Whether the Docker daemon (``$DOCKER_HOST`` or the local socket) answers."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if host.startswith("unix://"):
        # docker-py leaks its socket when it cannot connect (a ResourceWarning,
        # an error under filterwarnings=error); probe with one we close.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(10)
            try:
                probe.connect(host[len("unix://") :])
            except OSError:
                return False
    try:
        client = docker.from_env(version="auto")
    except docker.errors.DockerException:
        return False
    try:
        return bool(client.ping())
    except docker.errors.DockerException:
        return False
    finally:
        client.close()


def image_present(image: str) -> bool:
    """Whether the Docker daemon has ``image`` (never pulled)."""
    if not docker_available():
        return False
    client = docker.from_env(version="auto")
    try:
        client.images.get(image)
    except docker.errors.ImageNotFound:
        return False
    finally:
        client.close()
    return True


@pytest.fixture(scope="session")
def docker_client() -> Iterator[Any]:
    """A client of the local Docker daemon; fails in CI, skips elsewhere, when
    there is none."""
    require("Docker", docker_available(), "apt-get install docker.io and start dockerd")
    client = docker.from_env(version="auto")
    yield client
    client.close()


@pytest.fixture(scope="session")
def base_image(docker_client: Any) -> str:
    """The workspace base image, which tests never pull or build."""
    require(
        f"the base image {BASE_IMAGE}", image_present(BASE_IMAGE), "run scripts/build-base-image.sh"
    )
    return BASE_IMAGE


@pytest.fixture
def docker_deployments(docker_client: Any) -> Iterator[set[str]]:
    """Deployment ids whose containers, volumes and networks are removed after
    the test (everything labelled with them, and nothing else)."""
    deployments: set[str] = set()
    yield deployments
    for deployment_id in deployments:
        mine = {"label": f"stockade.deployment={deployment_id}"}
        for container in docker_client.containers.list(all=True, filters=mine):
            container.remove(force=True)
        for volume in docker_client.volumes.list(filters=mine):
            volume.remove(force=True)
        for network in docker_client.networks.list(filters=mine):
            network.remove()


@pytest.fixture
def make_docker_spec(
    make_spec: SpecFactory, base_image: str, docker_deployments: set[str]
) -> SpecFactory:
    """``make_spec`` for the docker backend and the base image; a ``compute``
    override is merged into ``{"image": base image}``. What is made for its
    specs' deployment is removed after the test, whichever backend made it."""

    def factory(**overrides: Any) -> WorkspaceSpec:
        compute = {"image": base_image, **overrides.pop("compute", {})}
        spec = with_compute(make_spec(backend="docker", **overrides), **compute)
        docker_deployments.add(spec.deployment_id)
        return spec

    return factory


def with_compute(spec: WorkspaceSpec, **compute: Any) -> WorkspaceSpec:
    """``spec`` with these manifest compute fields, resolved again. (``make_spec``
    takes ``compute=`` as the spec's resolved compute, not the manifest's.)"""
    manifest = spec.manifest.model_copy(update={"compute": Compute.model_validate(compute)})
    resolved = resolve_compute(manifest.compute, spec.parameters)
    return dataclasses.replace(spec, manifest=manifest, compute=resolved)


@pytest.fixture
async def docker_backend(
    make_docker_spec: SpecFactory, docker_deployments: set[str], tmp_path: Path
) -> AsyncIterator[DockerBackend]:
    """A docker backend working for the deployment of ``make_docker_spec``'s specs."""
    deployment_id = make_docker_spec().deployment_id
    docker_deployments.add(deployment_id)
    backend = DockerBackend(BackendOptions(workspaces_dir=tmp_path), deployment_id=deployment_id)
    yield backend
    await backend.close()


# --- local backend ---------------------------------------------------------------------


def stop_local_workspaces(workspaces_dir: Path) -> list[str]:
    """Kill the processes of every local workspace under ``workspaces_dir`` and
    remove their directories; the workspace ids found. Local workspaces run
    detached and outlive the server that started them (by design), so a
    fixture that stops a server must call this on its data dir's workspaces
    dir, or their sandboxes keep running after the test. Synchronous: for
    fixtures without an event loop."""
    import asyncio

    from stockade.provisioner.backends.local import LocalBackend

    if not workspaces_dir.is_dir():
        return []
    backend = LocalBackend(BackendOptions(workspaces_dir=workspaces_dir))
    backend.reconcile_grace_seconds = 0
    orphans = asyncio.run(backend.reconcile(set()))
    return sorted({orphan.workspace_id for orphan in orphans})
