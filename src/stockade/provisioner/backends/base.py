"""The contract every workspace backend keeps.

A backend turns a workspace build into compute: it starts, stops and deletes
the resources of one workspace, and says whether they run. It is a small
plug-in in the spirit of JupyterHub's ``Spawner`` (start / stop / poll), with
three differences that come from builds being jobs in a database queue:

* **State is data, not memory.** Every call gets the JSON ``state`` the
  previous successful call returned (``{}`` for a new workspace) and returns
  the new one; the provisioner stores it in the database. Any worker, in any
  process, may run the next build of a workspace, so a backend keeps nothing
  about a workspace in its own attributes.
* **Every call is idempotent and finds its resources by name.** A worker can
  be killed (``kill -9``) at any point of a build; the job is then retried on
  another worker with the *old* state. ``start`` must therefore adopt compute
  that is already there (named after ``spec.workspace_id``) instead of
  creating a second one; ``stop`` and ``delete`` of something already gone
  succeed.
* **Progress and errors are typed.** Calls report what they do through
  ``progress`` (stages and log lines, shown live to the user and stored with
  the build) and fail only with ``BackendError``, whose message a user can act
  on and whose ``reason`` is a short metrics label.

Calls:

``start(spec, state, progress) -> state``
    Create what is missing (home storage, compute) and start the compute with
    the workspace agent as its main process: ``BOOTSTRAP_SCRIPT`` (from
    ``stockade.agent.bundle``) under ``/bin/sh``, given ``agent_environment(spec)``
    (the control plane's URL, the agent token, the bundle's sha256). Returns
    once the compute runs and the agent has been launched: the build does not
    wait for the agent to connect nor for the template's startup script, which
    the agent runs and reports (its lifecycle and output are on the workspace's
    agent, not in the build log). If the compute already runs with the same
    ``spec.config_hash`` *and* the same agent token it is adopted; otherwise
    it is replaced (an update, or a new start build: every start build brings
    a new token and revokes the old one, so an agent left running with the
    old token could never connect again). The home storage always survives.
``stop(spec, state, progress) -> state``
    Stop the compute and release it; the home storage stays. The agent gets
    SIGTERM first and a few seconds (``AGENT_STOP_SECONDS`` at least) to
    report ``shutting_down`` and ``off`` before the compute is killed.
``delete(spec, state, progress) -> None``
    Remove the compute and the home storage. Nothing of the workspace remains.
``status(workspace_id, state) -> ComputeStatus``
    Whether the compute runs now (cheap; called by the reconciler).
``reconcile(live) -> list[Orphan]``
    Remove every resource this backend made for this deployment whose
    workspace id is not in ``live`` (workspaces that are not deleted), and
    return what was removed. Called periodically by the server. Resources
    younger than ``RECONCILE_GRACE_SECONDS`` are left alone: ``live`` was read
    before the backend looked, so a workspace created in between is not in it.
``close()``
    Release clients and connections.

Secrets in state: whatever a backend puts under ``state[SEALED_STATE_KEY]``
(a JSON object) is encrypted by the server before it is stored and given back
decrypted with the next build; the rest of ``state`` is stored as it is.

Failures that leave something behind: a ``BackendError`` may carry the
``state`` of what exists after the failure (a Terraform apply that created
half its resources); the server stores it, so that the next build (a retry, a
stop, a delete) finds and removes those resources.

Cancellation: a build can be canceled; the worker then cancels the task that
awaits the call (``asyncio.CancelledError`` is raised inside it). A backend
cleans up what it must and lets the error propagate.
"""

from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

from stockade.agent.bundle import BUNDLE_SHA256_ENV
from stockade.sdk.templates import Manifest, ResolvedCompute

RECONCILE_GRACE_SECONDS = 60.0
# What a stopping agent gets, at least, between SIGTERM and SIGKILL: it
# reports shutting_down and off (each flushed for up to 2 s) before it exits.
AGENT_STOP_SECONDS = 5.0

# The part of a backend's state the server keeps encrypted at rest.
SEALED_STATE_KEY = "sealed"

AGENT_TOKEN_ENV = "STOCKADE_AGENT_TOKEN"
ACCESS_URL_ENV = "STOCKADE_ACCESS_URL"
# Where the bootstrap and the agent find the control plane's private CA (the
# same name as stockade.agent.agent.CA_FILE_ENV, not imported: that module
# pulls in the agent's SSH server).
AGENT_CA_ENV = "STOCKADE_AGENT_CA_FILE"


def agent_environment(
    spec: WorkspaceSpec, access_url: str | None = None, *, ca_path: str | None = None
) -> dict[str, str]:
    """What the agent's bootstrap needs in its environment: where the control
    plane is (``access_url``, default ``spec.access_url``), its token, the
    bundle's sha256 (a restart then runs the cached bundle without a request)
    and, when the control plane has a private CA (``spec.agent_ca``), the path
    ``ca_path`` the backend installed it at inside the workspace."""
    env = {ACCESS_URL_ENV: access_url or spec.access_url}
    if spec.agent_ca:
        if not ca_path:
            raise ValueError("the backend must install spec.agent_ca and give its path")
        env[AGENT_CA_ENV] = ca_path
    if spec.agent_token:
        env[AGENT_TOKEN_ENV] = spec.agent_token
    if spec.agent_bundle_sha256:
        env[BUNDLE_SHA256_ENV] = spec.agent_bundle_sha256
    return env


def token_fingerprint(token: str | None) -> str:
    """Tells whether running compute has this build's agent token, without
    storing the token: a truncated sha256 of a random secret reveals nothing."""
    if not token:
        return ""
    return hashlib.sha256(token.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class WorkspaceSpec:
    """Everything a backend needs to know about one workspace for one build."""

    workspace_id: str
    workspace_name: str
    owner_id: str
    owner_username: str
    # Labels resources so that reconcile() only ever touches this deployment's.
    deployment_id: str
    build_id: str
    build_number: int
    template_name: str
    template_version: int
    manifest: Manifest
    parameters: dict[str, Any]
    compute: ResolvedCompute
    # The template's files, extracted; read-only for the backend.
    files_dir: Path
    # The URL the compute reaches the control plane at (for the agent).
    access_url: str
    # Environment for the workspace's processes (ids, parameters...).
    env: dict[str, str] = field(default_factory=dict)
    # Start builds: the new agent's token (a secret: never logged, never in
    # a build log, kept out of command lines and, where possible, of metadata
    # others can read such as `docker inspect`).
    agent_token: str | None = field(default=None, repr=False)
    # The sha256 of the agent bundle the control plane serves, when known.
    agent_bundle_sha256: str | None = None
    # The PEM CA bundle the agent trusts for the control plane (a private
    # CA), which the backend installs in the compute; None: the system's CAs.
    agent_ca: str | None = None

    @property
    def config_hash(self) -> str:
        """Changes when anything the compute is made from changes."""
        data = {
            "version": [self.template_name, self.template_version],
            "parameters": self.parameters,
            "compute": self.compute.__dict__,
            "startup": self.manifest.agent.startup_script,
        }
        if self.agent_ca:
            # Only when set, so that hashes (and running workspaces) without
            # a CA stay as they were.
            data["agent_ca"] = hashlib.sha256(self.agent_ca.encode()).hexdigest()
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class BackendOptions:
    """How the host running the provisioner is set up (server settings or
    ``stockade provisionerd start`` flags)."""

    # local: each workspace gets WORKSPACES_DIR/<workspace id>/ (home and run files).
    workspaces_dir: Path
    # local: run workspaces without bubblewrap when bwrap is missing.
    allow_unsandboxed: bool = False
    # docker: the Engine API URL; empty = $DOCKER_HOST or the local socket.
    docker_host: str = ""
    # docker: the network workspaces join; empty = stockade-<deployment id[:12]>.
    docker_network: str = ""
    # docker: how agents in containers reach the control plane when the
    # access URL is on loopback, which a container cannot reach. Called with
    # the gateway address of the workspaces' network before a container
    # starts, it makes the server listen there and returns the URL to give
    # the agents. None (a provisionerd, or an explicit agent URL): the access
    # URL as it is.
    docker_agent_url: Callable[[str], Awaitable[str]] | None = None
    # terraform: the CLI to run (terraform, tofu or a path) and the provider
    # mirror it installs providers from; None: WORKSPACES_DIR/../terraform-mirror.
    terraform_binary: str = "terraform"
    terraform_mirror_dir: Path | None = None
    # kubernetes: a kubeconfig ("" = in-cluster, else ~/.kube/config), the
    # namespace workspaces live in, and where the control plane is for the
    # NetworkPolicy (address blocks, when it runs outside the cluster).
    kubernetes_config: str = ""
    kubernetes_namespace: str = "stockade-workspaces"
    kubernetes_control_plane_cidrs: tuple[str, ...] = ()


class Progress(Protocol):
    """Where a backend reports what it is doing."""

    async def stage(self, name: str) -> None:
        """Begin a stage ("Creating home volume", "Starting container"...);
        the previous one ends. Stages and their timings are shown per build."""

    async def log(self, line: str, *, level: Literal["info", "warn", "error"] = "info") -> None:
        """One line of output (no trailing newline)."""


@dataclass(frozen=True)
class ComputeStatus:
    """``running``; ``stopped`` (exists, not running: ``detail`` says why, such
    as an exit code); or ``missing`` (nothing there)."""

    state: Literal["running", "stopped", "missing"]
    detail: str = ""


@dataclass(frozen=True)
class Orphan:
    """A resource reconcile() removed: kind ("container", "volume", "process",
    "home"), its name, and the workspace id it belonged to."""

    kind: str
    name: str
    workspace_id: str


class BackendError(Exception):
    """A build step failed. ``message`` is for the workspace's owner and says
    what to do; ``reason`` is a low-cardinality label (``image_missing``,
    ``docker_unreachable``...); ``log_message`` may add detail for operators;
    ``state``, when not None, is what exists after the failure (stored by the
    server in place of the previous state)."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        log_message: str | None = None,
        state: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason
        self.log_message = log_message or message
        self.state = state


class Backend(abc.ABC):
    """A workspace backend; see the module docstring for the whole contract."""

    name: ClassVar[str]
    # See reconcile(); tests set it to 0 to reconcile what they just made.
    reconcile_grace_seconds: float = RECONCILE_GRACE_SECONDS

    @abc.abstractmethod
    async def start(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def stop(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]: ...

    @abc.abstractmethod
    async def delete(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> None: ...

    @abc.abstractmethod
    async def status(self, workspace_id: str, state: dict[str, Any]) -> ComputeStatus: ...

    @abc.abstractmethod
    async def reconcile(self, live: set[str]) -> list[Orphan]: ...

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release clients; the default has nothing to release."""
