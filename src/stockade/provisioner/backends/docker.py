"""The docker backend: one container per workspace, on a Docker Engine.

What a workspace is made of, all found by name and labelled with the
deployment and the workspace (``stockade.deployment``, ``stockade.workspace_id``,
``stockade.workspace_name``, ``stockade.owner``, and on the container
``stockade.config_hash``):

* the container ``stockade-ws-<workspace id>``, made from the template's image
  (``compute.image``), whose main process is the workspace agent (the
  bootstrap in ``stockade.agent.bundle``, which fetches the agent bundle from
  the control plane, caches it in the home and execs it) under Docker's init
  (tini, so SIGTERM reaches the agent), as the image's user, with CPU, memory
  and GPU requests as the template resolves them;
* the named volume ``stockade-home-<workspace id>`` mounted at the image's home
  directory: it survives stop and start and goes with delete only;
* the bridge network of the deployment (``BackendOptions.docker_network``, or
  ``stockade-<deployment id[:12]>``), shared by the deployment's workspaces and
  never removed by the backend.

The agent's token never appears in the container's configuration (``docker
inspect`` shows the environment to anyone with access to Docker): it is
copied into the created container as a file (``TOKEN_FILE``, in a directory
nobody can list) before it starts, and the entrypoint reads it into the
agent's environment and removes it. The control plane's private CA, when it
has one, is copied in the same way to ``CA_FILE`` (world-readable, and
kept). The agent reaches the control plane at
the access URL, or, when that is on loopback (which a container cannot
reach) and the server asks for it (``BackendOptions.docker_agent_url``), at
the network's gateway, where the server then listens too.

Images are never pulled (the machines are offline): a missing image is an
error that says how to load it. The Docker SDK is synchronous, so every call
runs in a worker thread.

``start`` adopts a running container with the same config hash and agent
token (``stockade.agent`` label: a fingerprint, not the token), replaces one
with another, and *recreates* a container that exists but does not run
(exited, created by a worker that died, stopped behind our back). ``stop``
stops (SIGTERM, so the agent reports shutting_down and off; SIGKILL after
``STOP_TIMEOUT`` seconds) and removes the container; the home volume stays.
A canceled ``start`` leaves the container as it is: the next ``start``
replaces it, ``stop`` and ``delete`` remove it.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import logging
import os
import re
import socket
import tarfile
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, ClassVar, Literal, TypeVar
from urllib.parse import urlsplit

import docker
import docker.errors
import docker.types
import requests

from stockade.agent.bundle import BOOTSTRAP_SCRIPT
from stockade.provisioner.backends.base import (
    AGENT_TOKEN_ENV,
    Backend,
    BackendError,
    BackendOptions,
    ComputeStatus,
    Orphan,
    Progress,
    WorkspaceSpec,
    agent_environment,
    token_fingerprint,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_DEPLOYMENT = "stockade.deployment"
LABEL_WORKSPACE_ID = "stockade.workspace_id"
LABEL_WORKSPACE_NAME = "stockade.workspace_name"
LABEL_OWNER = "stockade.owner"
LABEL_OWNER_ID = "stockade.owner_id"
LABEL_CONFIG_HASH = "stockade.config_hash"
LABEL_TEMPLATE = "stockade.template"
LABEL_AGENT = "stockade.agent"

DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
BASE_IMAGE = "stockade-base:bookworm"
# Seconds between SIGTERM and SIGKILL when a container stops (the agent
# reports shutting_down and off in that time).
STOP_TIMEOUT = 10
# Where the agent's token waits for the entrypoint, which removes it at once.
# Its directory is write-and-search only (0733, not sticky): the image's user,
# whoever it is, can read the token by its name and remove it, and nobody can
# list the directory.
TOKEN_DIR = ".stockade"
TOKEN_FILE = f"/{TOKEN_DIR}/agent-token"
# The container's entrypoint: the token from its file into the environment
# (never on a command line), then the bootstrap ($1), which execs the agent.
ENTRYPOINT = f"""\
if [ -f {TOKEN_FILE} ]; then
  {AGENT_TOKEN_ENV}=$(cat {TOKEN_FILE}) && export {AGENT_TOKEN_ENV}
  rm -f {TOKEN_FILE}
fi
exec /bin/sh -c "$1" stockade-bootstrap
"""
# Where the control plane's private CA (spec.agent_ca) is put before start.
CA_FILE = "/etc/stockade/ca.pem"
# The workspace's own output goes to the container log too; bound it.
LOG_CONFIG = {"max-size": "10m", "max-file": "3"}
PIDS_LIMIT = 4096  # processes per workspace container
_HOSTNAME_INVALID = re.compile(r"[^a-z0-9-]+")


def container_name(workspace_id: str) -> str:
    """The name of a workspace's container."""
    return f"stockade-ws-{workspace_id}"


def volume_name(workspace_id: str) -> str:
    """The name of a workspace's home volume."""
    return f"stockade-home-{workspace_id}"


def network_name(options: BackendOptions, deployment_id: str) -> str:
    """The network a deployment's workspaces join."""
    return options.docker_network or f"stockade-{deployment_id[:12]}"


def image_home(image_attrs: dict[str, Any]) -> str:
    """The home directory of an image's user: ``HOME`` from the image's
    environment, else ``/root`` for root, else ``/home/<user>``."""
    config = image_attrs.get("Config") or {}
    for item in config.get("Env") or []:
        if item.startswith("HOME=") and len(item) > len("HOME="):
            return str(item[len("HOME=") :])
    user = str(config.get("User") or "").split(":", 1)[0]
    if user in ("", "root", "0"):
        return "/root"
    return f"/home/{user}"


def hostname_for(workspace_name: str) -> str:
    """A valid host name (RFC 1123 label) made from a workspace name."""
    name = _HOSTNAME_INVALID.sub("-", workspace_name.lower()).strip("-")[:63].rstrip("-")
    return name or "workspace"


def is_loopback_url(url: str) -> bool:
    """Whether ``url``'s host is a loopback address (or ``localhost``), which
    a container cannot reach the host on."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def network_gateway(attrs: dict[str, Any]) -> str | None:
    """The IPv4 gateway of a Docker network (as ``docker network inspect``
    shows it): the host's address on that network."""
    for config in (attrs.get("IPAM") or {}).get("Config") or []:
        gateway = str((config or {}).get("Gateway") or "").split("/")[0]
        with contextlib.suppress(ValueError):
            if ipaddress.ip_address(gateway).version == 4:
                return gateway
    return None


def _file_archive(path: str, content: str, *, directory_mode: int) -> bytes:
    """A tar of one read-only file at ``path`` (and its directory, with
    ``directory_mode``) for ``put_archive`` at ``/``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        directory = tarfile.TarInfo(os.path.dirname(path).lstrip("/"))
        directory.type = tarfile.DIRTYPE
        directory.mode = directory_mode
        archive.addfile(directory)
        data = content.encode()
        entry = tarfile.TarInfo(path.lstrip("/"))
        entry.size = len(data)
        entry.mode = 0o444
        archive.addfile(entry, io.BytesIO(data))
    return buffer.getvalue()


def _token_archive(token: str) -> bytes:
    """TOKEN_FILE, in a directory others may enter but not list (0733)."""
    return _file_archive(TOKEN_FILE, token, directory_mode=0o733)


def _ca_archive(pem: str) -> bytes:
    """CA_FILE, readable by the image's user, whoever it is."""
    return _file_archive(CA_FILE, pem, directory_mode=0o755)


def _gpu_error(explanation: str) -> bool:
    text = explanation.lower()
    return "gpu" in text or "device driver" in text or "nvidia" in text


async def _finish_before_cancel(call: Awaitable[T]) -> T:
    """Await ``call``; when cancelled, wait for it to finish, then re-raise.

    A thread cannot be interrupted: a canceled build whose ``containers.create``
    is on the wire would otherwise create the container after the build ended,
    behind the back of the stop that follows, whose own create then collides
    with it. Docker's client timeout bounds the wait.
    """
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError as cancel:
        while not task.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.shield(task)
        if not task.cancelled():
            task.exception()  # retrieved: the cancel is what the caller sees
        raise cancel


class DockerBackend(Backend):
    """Workspaces as Docker containers with a home volume; see the module
    docstring. ``deployment_id`` is the deployment this backend works for; it
    is needed by ``reconcile`` only (the other calls take it from the spec)."""

    name: ClassVar[str] = "docker"

    def __init__(self, options: BackendOptions, *, deployment_id: str | None = None) -> None:
        self.options = options
        self.deployment_id = deployment_id
        self.host = options.docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        # The client is made on first use: making it asks the daemon for its
        # API version, which blocks and may fail.
        self._client: Any = None
        self._client_lock = threading.Lock()

    # --- plumbing --------------------------------------------------------------------

    def _docker(self) -> Any:
        """The Docker client (blocking; call from a worker thread)."""
        with self._client_lock:
            if self._client is None:
                if self.host.startswith("unix://"):
                    # docker-py leaks its socket when the connect fails (a
                    # ResourceWarning per attempt); a probe of our own closes it.
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                        probe.settimeout(10)
                        try:
                            probe.connect(self.host[len("unix://") :])
                        except OSError as exc:
                            raise self._unreachable(exc) from exc
                if self.options.docker_host:
                    self._client = docker.DockerClient(
                        base_url=self.options.docker_host, version="auto"
                    )
                else:
                    self._client = docker.from_env(version="auto")
            return self._client

    def _unreachable(self, exc: BaseException) -> BackendError:
        return BackendError(
            f"Cannot reach Docker at {self.host}: is dockerd running, and may the "
            "provisioner use its socket? (Set the Docker host with DOCKER_HOST or "
            "the docker_host option.)",
            reason="docker_unreachable",
            log_message=f"Docker at {self.host} unreachable: {exc}",
        )

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a blocking Docker call in a worker thread; Docker's failures
        become ``BackendError``s."""
        try:
            return await _finish_before_cancel(asyncio.to_thread(fn, *args, **kwargs))
        except BackendError:
            raise
        except requests.exceptions.RequestException as exc:
            raise self._unreachable(exc) from exc
        except docker.errors.APIError as exc:
            raise BackendError(
                f"Docker at {self.host} refused a request: {exc.explanation or exc}",
                reason="docker_error",
                log_message=str(exc),
            ) from exc
        except docker.errors.DockerException as exc:
            # Raised when the client is made (no socket, bad DOCKER_HOST...).
            raise self._unreachable(exc) from exc

    def _check_owned(
        self, kind: str, name: str, labels: dict[str, str] | None, deployment: str
    ) -> None:
        """Refuse to touch a resource with our name that another deployment made."""
        owner = (labels or {}).get(LABEL_DEPLOYMENT)
        if owner != deployment:
            raise BackendError(
                f"The Docker {kind} {name} exists but belongs to "
                f"{'another Stockade deployment' if owner else 'something other than Stockade'}; "
                "Stockade will not touch it. An administrator must remove or rename it.",
                reason="name_conflict",
                log_message=f"{kind} {name}: {LABEL_DEPLOYMENT}={owner!r}, not {deployment!r}",
            )

    def _find_container(self, name: str) -> Any:
        try:
            return self._docker().containers.get(name)
        except docker.errors.NotFound:
            return None

    # --- start -----------------------------------------------------------------------

    def _get_image(self, ref: str) -> Any:
        try:
            return self._docker().images.get(ref)
        except docker.errors.ImageNotFound:
            raise self._image_missing(ref) from None

    def _image_missing(self, ref: str) -> BackendError:
        how = f"load it with `docker load -i FILE` (a file made by `docker save {ref}` elsewhere)"
        if ref == BASE_IMAGE:
            how = f"build it with scripts/build-base-image.sh, or {how}"
        return BackendError(
            f"The image {ref} is not on the Docker host {self.host}, and Stockade never "
            f"pulls images. Ask an administrator to {how}.",
            reason="image_missing",
        )

    def _find_network(self, name: str) -> Any:
        # The name filter matches substrings; only an exact match is ours.
        found = [n for n in self._docker().networks.list(names=[name]) if n.name == name]
        return found[0] if found else None

    def _ensure_network(self, deployment_id: str) -> tuple[str, str | None]:
        """The deployment's network, made when missing, and its gateway."""
        name = network_name(self.options, deployment_id)
        network = self._find_network(name)
        if network is None:
            try:
                self._docker().networks.create(
                    name,
                    driver="bridge",
                    check_duplicate=True,
                    labels={LABEL_DEPLOYMENT: deployment_id},
                )
            except docker.errors.APIError as exc:
                # Another worker made it in the meantime.
                if exc.status_code != 409:
                    raise
            network = self._find_network(name)
        gateway = network_gateway(network.attrs) if network is not None else None
        return name, gateway

    async def existing_gateway(self) -> str | None:
        """The gateway address of this deployment's network when the network
        exists already (a restarted server listens there at once, so that the
        agents of running workspaces come back); ``None`` otherwise."""
        if not self.deployment_id:
            return None

        def find() -> str | None:
            network = self._find_network(network_name(self.options, self.deployment_id or ""))
            return network_gateway(network.attrs) if network is not None else None

        return await self._run(find)

    def _ensure_volume(self, spec: WorkspaceSpec) -> str:
        name = volume_name(spec.workspace_id)
        client = self._docker()
        try:
            volume = client.volumes.get(name)
        except docker.errors.NotFound:
            volume = client.volumes.create(
                name=name,
                driver="local",
                labels={
                    LABEL_DEPLOYMENT: spec.deployment_id,
                    LABEL_WORKSPACE_ID: spec.workspace_id,
                    LABEL_WORKSPACE_NAME: spec.workspace_name,
                    LABEL_OWNER: spec.owner_username,
                    LABEL_OWNER_ID: spec.owner_id,
                },
            )
        self._check_owned("volume", name, volume.attrs.get("Labels"), spec.deployment_id)
        return name

    def _ensure_container(
        self, spec: WorkspaceSpec, image: Any, home: str, network: str, volume: str, agent_url: str
    ) -> tuple[Any, Literal["adopted", "created", "replaced", "recreated"]]:
        """The running container of the workspace, and what was done to get it."""
        name = container_name(spec.workspace_id)
        existing = self._find_container(name)
        action: Literal["created", "replaced", "recreated"] = "created"
        if existing is not None:
            self._check_owned("container", name, existing.labels, spec.deployment_id)
            running = existing.status == "running"
            if (
                running
                and existing.labels.get(LABEL_CONFIG_HASH) == spec.config_hash
                and existing.labels.get(LABEL_AGENT, "") == token_fingerprint(spec.agent_token)
            ):
                return existing, "adopted"
            if running:
                # Let the workspace's processes write their files before it goes.
                existing.stop(timeout=STOP_TIMEOUT)
            existing.remove(force=True)
            action = "replaced" if running else "recreated"
        container = self._create_container(spec, image, home, network, volume, agent_url)
        try:
            if spec.agent_token:
                container.put_archive("/", _token_archive(spec.agent_token))
            if spec.agent_ca:
                container.put_archive("/", _ca_archive(spec.agent_ca))
            container.start()
        except docker.errors.APIError as exc:
            # A container that never started must not be adopted or reported
            # as "stopped" later: nothing of this attempt remains.
            with contextlib.suppress(docker.errors.APIError):
                container.remove(force=True)
            explanation = str(exc.explanation or exc)
            if spec.compute.gpus > 0 and _gpu_error(explanation):
                raise BackendError(
                    f"The workspace asks for {spec.compute.gpus} GPU(s), but the Docker host "
                    f"{self.host} cannot provide any ({explanation}). Ask an administrator to "
                    "install a GPU and the NVIDIA container toolkit, or choose no GPU.",
                    reason="gpu_unavailable",
                    log_message=str(exc),
                ) from exc
            raise BackendError(
                f"Docker could not start the workspace container: {explanation}",
                reason="container_start_failed",
                log_message=str(exc),
            ) from exc
        container.reload()
        return container, action

    def _create_container(
        self, spec: WorkspaceSpec, image: Any, home: str, network: str, volume: str, agent_url: str
    ) -> Any:
        compute = spec.compute
        assert compute.image is not None  # checked by start()
        agent_env = agent_environment(spec, agent_url, ca_path=CA_FILE)
        # The token goes in as a file (see the module docstring), never here.
        agent_env.pop(AGENT_TOKEN_ENV, None)
        env = {
            **spec.env,
            "HOME": home,
            "STOCKADE_WORKSPACE_ID": spec.workspace_id,
            "STOCKADE_WORKSPACE_NAME": spec.workspace_name,
            **agent_env,
        }
        limits: dict[str, Any] = {}
        if compute.cpu is not None:
            limits["nano_cpus"] = round(compute.cpu * 1e9)
        if compute.memory_bytes is not None:
            limits["mem_limit"] = compute.memory_bytes
        if compute.gpus > 0:
            limits["device_requests"] = [
                docker.types.DeviceRequest(count=compute.gpus, capabilities=[["gpu"]])
            ]
        try:
            return self._docker().containers.create(
                # create, never run(): run() pulls a missing image.
                compute.image,
                name=container_name(spec.workspace_id),
                # The entrypoint, not the command, so that an image's own
                # ENTRYPOINT cannot swallow the agent; "stockade-init" is $0.
                entrypoint=["/bin/sh", "-c", ENTRYPOINT, "stockade-init", BOOTSTRAP_SCRIPT],
                environment=env,
                hostname=hostname_for(spec.workspace_name),
                init=True,
                labels={
                    LABEL_DEPLOYMENT: spec.deployment_id,
                    LABEL_WORKSPACE_ID: spec.workspace_id,
                    LABEL_WORKSPACE_NAME: spec.workspace_name,
                    LABEL_OWNER: spec.owner_username,
                    LABEL_OWNER_ID: spec.owner_id,
                    LABEL_CONFIG_HASH: spec.config_hash,
                    LABEL_TEMPLATE: spec.template_name,
                    LABEL_AGENT: token_fingerprint(spec.agent_token),
                },
                mounts=[docker.types.Mount(target=home, source=volume, type="volume")],
                network=network,
                # So that the compute reaches the control plane on the host.
                extra_hosts={"host.docker.internal": "host-gateway"},
                log_config=docker.types.LogConfig(type="json-file", config=LOG_CONFIG),
                # No setuid escalation inside; a fork bomb stops at a bound.
                security_opt=["no-new-privileges"],
                pids_limit=PIDS_LIMIT,
                detach=True,
                **limits,
            )
        except docker.errors.ImageNotFound:
            raise self._image_missing(compute.image) from None
        except docker.errors.APIError as exc:
            raise BackendError(
                f"Docker refused the workspace container: {exc.explanation or exc}",
                reason="container_create_failed",
                log_message=str(exc),
            ) from exc

    async def start(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]:
        """Create what is missing and run the workspace; see the module docstring."""
        ref = spec.compute.image
        if not ref:
            raise BackendError(
                "The template sets no compute.image, which the docker backend needs.",
                reason="image_unset",
            )
        await progress.stage("Checking image")
        image = await self._run(self._get_image, ref)
        home = image_home(image.attrs)
        await progress.log(f"Image {ref} ({image.id[:19]}), home directory {home}")

        await progress.stage("Preparing network")
        network, gateway = await self._run(self._ensure_network, spec.deployment_id)
        agent_url = spec.access_url
        if self.options.docker_agent_url is not None and is_loopback_url(agent_url):
            if gateway is None:
                raise BackendError(
                    f"The Docker network {network} has no IPv4 gateway, so its containers "
                    "cannot reach the server on a loopback access URL. Set the server's "
                    "agent_url (or access_url) to an address containers can reach.",
                    reason="network_unusable",
                )
            agent_url = await self.options.docker_agent_url(gateway)

        await progress.stage("Preparing home volume")
        volume = await self._run(self._ensure_volume, spec)
        if spec.compute.home_bytes is not None:
            await progress.log(
                f"home_size ({spec.compute.home_bytes} bytes) is not enforced: local Docker "
                "volumes have no size limit.",
                level="warn",
            )

        await progress.stage("Starting container")
        container, action = await self._run(
            self._ensure_container, spec, image, home, network, volume, agent_url
        )
        said = {
            "adopted": "Adopted the running container {name}",
            "created": "Started the container {name}",
            "replaced": "Replaced the container {name}: the workspace's configuration changed",
            "recreated": "Recreated the container {name}, which was not running",
        }[action]
        await progress.log(said.format(name=container.name))
        if action != "adopted":
            await progress.log(
                f"The agent runs in the container and reaches the server at {agent_url}; it "
                "runs the startup script and reports on the workspace (`stockade logs` shows "
                "its output)."
            )
        return {
            "container_id": container.id,
            "container": container.name,
            "volume": volume,
            "network": network,
            "image": ref,
            "image_id": image.id,
            "home": home,
            "config_hash": spec.config_hash,
        }

    # --- stop, delete ------------------------------------------------------------------

    def _remove_container(self, spec: WorkspaceSpec, *, graceful: bool) -> bool:
        name = container_name(spec.workspace_id)
        container = self._find_container(name)
        if container is None:
            return False
        self._check_owned("container", name, container.labels, spec.deployment_id)
        try:
            if graceful and container.status == "running":
                container.stop(timeout=STOP_TIMEOUT)
            container.remove(force=True)
        except docker.errors.NotFound:
            return False  # removed by someone else meanwhile
        except docker.errors.APIError as exc:
            # "removal already in progress": the other remover wins.
            if exc.status_code != 409:
                raise
        return True

    def _remove_volume(self, spec: WorkspaceSpec) -> bool:
        name = volume_name(spec.workspace_id)
        client = self._docker()
        try:
            volume = client.volumes.get(name)
        except docker.errors.NotFound:
            return False
        self._check_owned("volume", name, volume.attrs.get("Labels"), spec.deployment_id)
        try:
            volume.remove()
        except docker.errors.NotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                raise BackendError(
                    f"The home volume {name} is still used by another container; remove "
                    "that container first.",
                    reason="volume_in_use",
                    log_message=str(exc),
                ) from exc
            raise
        return True

    async def stop(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]:
        """Stop and remove the container; the home volume stays."""
        await progress.stage("Stopping container")
        name = container_name(spec.workspace_id)
        if await self._run(self._remove_container, spec, graceful=True):
            await progress.log(f"Stopped and removed the container {name}")
        else:
            await progress.log(f"The container {name} was already gone")
        return {**state, "container_id": None, "volume": volume_name(spec.workspace_id)}

    async def delete(self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress) -> None:
        """Remove the container and the home volume."""
        await progress.stage("Removing container")
        name = container_name(spec.workspace_id)
        # Everything goes: no point in waiting for processes to save files.
        if await self._run(self._remove_container, spec, graceful=False):
            await progress.log(f"Removed the container {name}")
        await progress.stage("Removing home volume")
        volume = volume_name(spec.workspace_id)
        if await self._run(self._remove_volume, spec):
            await progress.log(f"Removed the home volume {volume}")
        else:
            await progress.log(f"The home volume {volume} was already gone")

    # --- status, reconcile, close -------------------------------------------------------

    def _status(self, workspace_id: str) -> ComputeStatus:
        name = container_name(workspace_id)
        container = self._find_container(name)
        if container is None:
            return ComputeStatus("missing")
        if self.deployment_id and container.labels.get(LABEL_DEPLOYMENT) != self.deployment_id:
            # Somebody else's container with our name: ours is not there.
            return ComputeStatus("missing", f"{name} belongs to another deployment")
        state = container.attrs.get("State", {})
        if container.status == "running":
            return ComputeStatus("running", f"container {container.short_id}")
        if container.status == "exited":
            detail = f"exited with code {state.get('ExitCode')}"
            if state.get("OOMKilled"):
                detail += " (out of memory)"
            return ComputeStatus("stopped", detail)
        return ComputeStatus("stopped", str(container.status))

    async def status(self, workspace_id: str, state: dict[str, Any]) -> ComputeStatus:
        """running, stopped (with the exit code), or missing."""
        return await self._run(self._status, workspace_id)

    def _reconcile(self, deployment_id: str, live: set[str]) -> list[Orphan]:
        client = self._docker()
        mine = {"label": f"{LABEL_DEPLOYMENT}={deployment_id}"}
        removed: list[Orphan] = []
        for container in client.containers.list(all=True, filters=mine):
            # The daemon filtered; check again, as this is about deleting.
            if container.labels.get(LABEL_DEPLOYMENT) != deployment_id:
                continue
            workspace_id = container.labels.get(LABEL_WORKSPACE_ID)
            if not workspace_id or workspace_id in live:
                continue
            if _age_seconds(container.attrs.get("Created")) < self.reconcile_grace_seconds:
                continue  # its workspace may be newer than ``live``
            try:
                container.remove(force=True)
            except docker.errors.NotFound:
                continue
            log.info("removed orphan container %s of workspace %s", container.name, workspace_id)
            removed.append(Orphan("container", str(container.name), workspace_id))
        for volume in client.volumes.list(filters=mine):
            labels = volume.attrs.get("Labels") or {}
            workspace_id = labels.get(LABEL_WORKSPACE_ID)
            if labels.get(LABEL_DEPLOYMENT) != deployment_id or not workspace_id:
                continue
            if workspace_id in live:
                continue
            if _age_seconds(volume.attrs.get("CreatedAt")) < self.reconcile_grace_seconds:
                continue
            try:
                volume.remove()
            except docker.errors.NotFound:
                continue
            except docker.errors.APIError as exc:
                # Used by a container that is not ours; leave it to an administrator.
                log.warning("cannot remove orphan volume %s: %s", volume.name, exc)
                continue
            log.info("removed orphan volume %s of workspace %s", volume.name, workspace_id)
            removed.append(Orphan("volume", str(volume.name), workspace_id))
        return removed

    async def reconcile(self, live: set[str]) -> list[Orphan]:
        """Remove this deployment's containers and volumes whose workspace is
        not in ``live``."""
        if not self.deployment_id:
            raise BackendError(
                "The docker backend was made without a deployment id, so it cannot tell "
                "this deployment's containers from others'.",
                reason="misconfigured",
            )
        return await self._run(self._reconcile, self.deployment_id, set(live))

    async def close(self) -> None:
        """Close the Docker client."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.close)


def _age_seconds(created: object) -> float:
    """Seconds since Docker's RFC 3339 creation time (nanoseconds and all);
    unreadable times count as old."""
    if not isinstance(created, str) or not created:
        return float("inf")
    text = created.replace("Z", "+00:00")
    main, dot, rest = text.partition(".")
    if dot:  # Python parses at most microseconds
        zone_at = next((i for i, c in enumerate(rest) if not c.isdigit()), len(rest))
        digits, zone = rest[:zone_at], rest[zone_at:]
        text = f"{main}.{digits[:6]}{zone}"
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return float("inf")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (datetime.now(UTC) - when).total_seconds()
