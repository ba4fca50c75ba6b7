"""What the server runs in its own process for builds: a few provisioner
workers on the build queue, the reaper of lost leases, and the reconciler
that finds orphaned and dead compute."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

from stockade import egress
from stockade.provisioner.backends import BackendSet
from stockade.provisioner.backends.base import BackendError, BackendOptions
from stockade.provisioner.worker import LeaseLostError, Worker
from stockade.sdk import types
from stockade.server.events import JOBS, Notifier
from stockade.server.observability import get_logger
from stockade.server.provisioning.service import (
    BUILT_IN_MARK,
    LeaseLost,
    ProvisioningService,
    WorkerIdentity,
)

log = get_logger("stockade.provisioner")

# How long the server waits at startup for Docker to say whether the
# deployment's network exists (a hung dockerd must not hold the server up).
DOCKER_PROBE_SECONDS = 5.0


class InProcessSource:
    """A job source that calls the build queue directly."""

    def __init__(
        self,
        service: ProvisioningService,
        notifier: Notifier,
        worker: WorkerIdentity,
        backends: list[str],
    ) -> None:
        self.service = service
        self.notifier = notifier
        self.worker = worker
        self.backends = backends

    async def acquire(self) -> types.ProvisionerJob | None:
        return await self.service.acquire(self.worker, self.backends)

    async def wait(self, timeout: float) -> None:
        await self.notifier.wait(JOBS, timeout)

    async def heartbeat(self, build_id: str) -> bool:
        try:
            return await self.service.heartbeat(build_id, self.worker.worker_id)
        except LeaseLost as exc:
            raise LeaseLostError(str(exc)) from exc

    async def logs(
        self, build_id: str, lines: list[types.JobLogLine], stage_started: str | None
    ) -> None:
        try:
            await self.service.append_logs(
                build_id, self.worker.worker_id, lines, stage_started=stage_started
            )
        except LeaseLost as exc:
            raise LeaseLostError(str(exc)) from exc

    async def archive(self, build_id: str) -> bytes:
        try:
            return await self.service.archive(build_id, self.worker.worker_id)
        except LeaseLost as exc:
            raise LeaseLostError(str(exc)) from exc

    async def complete(
        self,
        build_id: str,
        status: Literal["succeeded", "failed", "canceled"],
        *,
        state: dict[str, Any] | None,
        reason: str | None = None,
        error: str | None = None,
    ) -> None:
        try:
            await self.service.complete(
                build_id, self.worker.worker_id, status, state=state, reason=reason, error=error
            )
        except LeaseLost as exc:
            raise LeaseLostError(str(exc)) from exc


def _log_worker_error(what: str, exc: BaseException) -> None:
    log.error(what, error=f"{type(exc).__name__}: {exc}", exc_info=exc)


class ProvisionerRunner:
    """The in-server workers, reaper and reconciler."""

    def __init__(
        self,
        service: ProvisioningService,
        notifier: Notifier,
        options: BackendOptions,
        *,
        workers: int,
        backends: list[str],
        cache_dir: Path,
    ) -> None:
        self.service = service
        self.notifier = notifier
        self.options = options
        self.worker_count = workers
        self.backend_names = backends
        self.cache_dir = cache_dir
        self.backends: BackendSet | None = None
        self.workers: list[Worker] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.last_orphans: list[dict[str, str]] = []
        # Built-in workers are named "<host>:<pid>/built-in-<n>".
        self.host_prefix = f"{socket.gethostname()}:"
        # Addresses the server listens on for docker workspaces' agents.
        self.agent_addresses: list[str] = []
        # The Terraform CLI builds run ("Terraform v1.11.4 (/usr/local/bin/terraform)"),
        # or why none can; None until checked.
        self.terraform_cli: str | None = None
        self._terraform_check: asyncio.Task[None] | None = None

    def reach_docker_agents(
        self,
        listen: Callable[[str], Awaitable[None]] | None,
        access_url: str,
    ) -> None:
        """Give docker workspaces on a loopback access URL (which containers
        cannot reach) the URL of the server on their network's gateway, same
        scheme and port. ``listen(address)`` makes the server listen there
        too (None when it listens on every address already); it is called
        before each docker start (the network may have been recreated) and
        at startup when the network exists. Call before ``start``."""
        parts = urlsplit(access_url)
        port = parts.port or (443 if parts.scheme == "https" else 80)

        async def agent_url(gateway: str) -> str:
            if listen is not None:
                try:
                    await listen(gateway)
                except OSError as exc:
                    raise BackendError(
                        f"The server cannot listen on {gateway}:{port}, the address docker "
                        f"workspaces reach it at ({exc.strerror or exc}). Set the server's "
                        "agent_url to an address containers can reach, or listen on "
                        "0.0.0.0.",
                        reason="agent_unreachable",
                        log_message=f"listening on {gateway}:{port} failed: {exc}",
                    ) from exc
            if gateway not in self.agent_addresses:
                self.agent_addresses.append(gateway)
                log.info("docker_agents_listener", address=f"{gateway}:{port}")
            return urlunsplit((parts.scheme, f"{gateway}:{port}", parts.path, "", ""))

        self.options = dataclasses.replace(self.options, docker_agent_url=agent_url)

    async def start(self) -> None:
        deployment_id = await self.service.deployment_id()
        self.backends = BackendSet(self.options, deployment_id)
        if "local" in self.backend_names:
            local = self.backends.get("local")
            if not getattr(local, "sandboxed", True):
                log.warning(
                    "local_workspaces_unsandboxed",
                    message="bubblewrap (bwrap) is missing and unsandboxed local workspaces "
                    "are allowed: local workspaces run as plain processes on this host",
                )
        if "docker" in self.backend_names and self.options.docker_agent_url is not None:
            await self._listen_for_docker_agents(self.options.docker_agent_url)
        if "terraform" in self.backend_names:
            log.warning(
                "terraform_builds_in_server",
                message="the server's workers run terraform builds: a Terraform template's "
                "providers and local-exec commands run as the server's user and can read its "
                "data directory (database, audit key); whoever may push templates can run "
                "commands here. Serve terraform from a `stockade provisionerd` on a host of "
                "its own instead (docs/terraform.md, Security).",
            )
            self._terraform_check = asyncio.create_task(
                self._check_terraform(), name="stockade:terraform-cli"
            )
        host = self.host_prefix.rstrip(":")
        for i in range(self.worker_count if self.backend_names else 0):
            identity = WorkerIdentity(
                worker_id=uuid.uuid4().hex,
                worker_name=f"{host}:{os.getpid()}{BUILT_IN_MARK}{i + 1}",
            )
            source = InProcessSource(self.service, self.notifier, identity, self.backend_names)
            worker = Worker(
                source,
                self.backends.get,
                cache_dir=self.cache_dir,
                name=identity.worker_name,
                on_error=_log_worker_error,
            )
            self.workers.append(worker)
            # The task keeps this context: its connections count as the
            # build workers', not the API's, in the egress report.
            with egress.as_component("provisioner"):
                self._tasks.append(
                    asyncio.create_task(worker.run_forever(), name=f"stockade:worker-{i + 1}")
                )

    async def _listen_for_docker_agents(self, agent_url: Callable[[str], Awaitable[str]]) -> None:
        """Listen on the deployment's network gateway when the network exists,
        so that the agents of running docker workspaces come back after a
        restart. A new network is made (and listened on) by the first docker
        build; a server without Docker simply has none."""
        from stockade.provisioner.backends.docker import DockerBackend

        assert self.backends is not None
        docker = self.backends.get("docker")
        if not isinstance(docker, DockerBackend):
            return
        try:
            gateway = await asyncio.wait_for(docker.existing_gateway(), DOCKER_PROBE_SECONDS)
            if gateway is not None:
                await agent_url(gateway)
        except BackendError as exc:
            level = log.info if exc.reason == "docker_unreachable" else log.warning
            level("docker_agents_not_listened_for", reason=exc.reason, error=exc.log_message)
        except TimeoutError:
            log.warning(
                "docker_agents_not_listened_for",
                reason="docker_slow",
                error=f"Docker did not answer in {DOCKER_PROBE_SECONDS} s",
            )

    async def _check_terraform(self) -> None:
        """Find and check the Terraform CLI at start, so that the log and the
        health page say at once which one builds will run (or why none)."""
        from stockade.provisioner.backends.terraform import TerraformBackend

        assert self.backends is not None
        backend = self.backends.get("terraform")
        if not isinstance(backend, TerraformBackend):
            return
        try:
            cli = await backend.cli()
        except BackendError as exc:
            self.terraform_cli = f"unusable: {exc.message}"
            log.warning("terraform_cli_unusable", reason=exc.reason, error=exc.message)
            return
        self.terraform_cli = cli.label
        log.info("terraform_cli", cli=cli.label, mirror=str(backend.mirror_dir))

    async def stop(self) -> None:
        if self._terraform_check is not None:
            self._terraform_check.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.backends is not None:
            await self.backends.close()

    def status(self) -> dict[str, Any]:
        return {
            "built_in": len(self.workers),
            "busy": sum(1 for w in self.workers if w.current is not None),
            "alive": sum(1 for t in self._tasks if not t.done()),
            "backends": self.backend_names,
            "docker_agent_addresses": self.agent_addresses,
            "terraform_cli": self.terraform_cli,
            "last_orphans_removed": self.last_orphans,
        }

    async def reap(self) -> None:
        await self.service.reap()

    async def reconcile(self) -> None:
        """Remove orphans, and record which running workspaces' compute died."""
        if self.backends is None:
            return
        for name in self.backends.started():
            backend = self.backends.get(name)
            try:
                live = await self.service.live_workspaces(name)
                orphans = await backend.reconcile(live)
            except BackendError as exc:
                log.warning("reconcile_failed", backend=name, reason=exc.reason, error=exc.message)
                continue
            for orphan in orphans:
                log.warning(
                    "orphan_removed",
                    backend=name,
                    kind=orphan.kind,
                    name=orphan.name,
                    workspace_id=orphan.workspace_id,
                )
            if orphans:
                self.last_orphans = [o.__dict__ for o in orphans][-50:]
            running = await self.service.running_workspaces(name, built_by=self.host_prefix)
            for workspace_id, state in running:
                with contextlib.suppress(BackendError):
                    status = await backend.status(workspace_id, state)
                    if status.state != "running":
                        log.warning(
                            "workspace_compute_down",
                            workspace_id=workspace_id,
                            state=status.state,
                            detail=status.detail,
                        )
                    await self.service.record_compute(workspace_id, status.state, status.detail)
