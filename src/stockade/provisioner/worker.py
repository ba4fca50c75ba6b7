"""The provisioner worker: takes builds from a job source, runs them on a
backend, and reports logs, stages and the outcome.

The same worker runs inside the server (its job source calls the build queue
directly) and in ``stockade provisionerd`` on another host (its job source
speaks HTTP to the server). While a build runs the worker heartbeats its
lease; a cancel request or a lost lease cancels the backend call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol

from stockade.provisioner.backends.base import Backend, BackendError, WorkspaceSpec
from stockade.sdk import types
from stockade.sdk.templates import (
    ArchiveError,
    ComputeError,
    Manifest,
    extract_archive,
    resolve_compute,
)

FLUSH_SECONDS = 0.1
FLUSH_LINES = 200


class LeaseLostError(Exception):
    """The job source says this worker no longer holds the build."""


class JobSource(Protocol):
    """Where a worker gets builds and reports on them. Every method but
    ``acquire`` and ``wait`` raises ``LeaseLostError`` when the build is no
    longer this worker's."""

    async def acquire(self) -> types.ProvisionerJob | None:
        """Lease the next build, or ``None`` when there is none now."""

    async def wait(self, timeout: float) -> None:
        """Return when a build may have been queued, or after ``timeout``."""

    async def heartbeat(self, build_id: str) -> bool:
        """Renew the lease; True when the build is to be canceled."""

    async def logs(
        self, build_id: str, lines: list[types.JobLogLine], stage_started: str | None
    ) -> None: ...

    async def archive(self, build_id: str) -> bytes: ...

    async def complete(
        self,
        build_id: str,
        status: Literal["succeeded", "failed", "canceled"],
        *,
        state: dict[str, Any] | None,
        reason: str | None = None,
        error: str | None = None,
    ) -> None: ...


class _Progress:
    """Buffers a build's log lines and sends them in batches (a startup
    script can print thousands of lines; one write per line would not do)."""

    def __init__(self, source: JobSource, build_id: str) -> None:
        self.source = source
        self.build_id = build_id
        self._lines: list[types.JobLogLine] = []
        self._stage: str | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def stage(self, name: str) -> None:
        await self.flush()
        async with self._lock:
            await self.source.logs(self.build_id, [], name)

    async def log(self, line: str, *, level: Literal["info", "warn", "error"] = "info") -> None:
        self._lines.append(types.JobLogLine(level=level, line=line[:65536]))
        if len(self._lines) >= FLUSH_LINES:
            await self.flush()
        elif self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_SECONDS)
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            lines, self._lines = self._lines, []
            if lines:
                await self.source.logs(self.build_id, lines, None)

    async def close(self) -> None:
        """Send what is buffered. A pending delayed flush is awaited, not
        canceled: it may be sending lines already taken from the buffer."""
        if self._flusher is not None and not self._flusher.done():
            with contextlib.suppress(LeaseLostError):
                await self._flusher
        await self.flush()


class Worker:
    """Runs builds one at a time until stopped."""

    def __init__(
        self,
        source: JobSource,
        backends: Callable[[str], Backend],
        *,
        cache_dir: Path,
        name: str,
        on_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self.source = source
        self.backend_for = backends
        self.cache_dir = cache_dir
        self.name = name
        self.on_error = on_error or (lambda _msg, _exc: None)
        self.current: str | None = None

    async def run_forever(self, idle_wait: float = 5.0) -> None:
        """Take and run builds until canceled. Nothing but cancellation ends
        the loop: a failing database or server is retried after a pause (a
        build in hand then ends by its lease)."""
        while True:
            try:
                job = await self.source.acquire()
                if job is None:
                    await self.source.wait(idle_wait)
                    continue
                await self.run(job)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.current = None
                self.on_error("worker_error", exc)
                await asyncio.sleep(2.0)

    async def run(self, job: types.ProvisionerJob) -> None:
        """Run one leased build to its end (or until the lease is lost)."""
        self.current = job.build_id
        progress = _Progress(self.source, job.build_id)
        task = asyncio.create_task(self._execute(job, progress))
        cancel_reason: list[str] = []
        beat = asyncio.create_task(self._heartbeat(job, task, cancel_reason))
        outcome: tuple[
            Literal["succeeded", "failed", "canceled"],
            dict[str, Any] | None,
            str | None,
            str | None,
        ]
        try:
            state = await task
            outcome = ("succeeded", state, None, None)
        except asyncio.CancelledError:
            if not cancel_reason:
                raise  # the worker itself is shutting down: the lease will run out
            if cancel_reason[0] == "lease_lost":
                self.current = None
                return
            outcome = ("canceled", None, "canceled", "the build was canceled")
        except TimeoutError:
            outcome = (
                "failed",
                None,
                "timeout",
                f"the build took longer than {job.timeout_seconds} s",
            )
        except BackendError as exc:
            current = asyncio.current_task()
            if cancel_reason:
                # The backend stopped on the cancel and said what it left.
                if cancel_reason[0] == "lease_lost":
                    self.current = None
                    return
                outcome = ("canceled", exc.state, "canceled", "the build was canceled")
            elif current is not None and current.cancelling():
                # The worker is stopping and the backend answered the cancel
                # with what it left (a Terraform state): keep that, end the
                # build, and go on stopping.
                with contextlib.suppress(Exception):  # best effort: we are stopping
                    await progress.close()
                    await self.source.complete(
                        job.build_id,
                        "failed",
                        state=exc.state,
                        reason="interrupted",
                        error="the provisioner stopped during the build; start the workspace again",
                    )
                self.current = None
                raise asyncio.CancelledError from exc
            else:
                outcome = ("failed", exc.state, exc.reason, exc.message)
        except Exception as exc:  # a bug in a backend must not kill the worker
            self.on_error("build_crashed", exc)
            outcome = (
                "failed",
                None,
                "internal_error",
                f"the provisioner hit an unexpected error ({type(exc).__name__}); an "
                "administrator can find it in the provisioner's log",
            )
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                try:
                    await beat
                except Exception as exc:  # reported; the outcome stands
                    self.on_error("heartbeat_failed", exc)
        status, new_state, reason, error = outcome
        try:
            if error:
                await progress.log(error, level="error")
            await progress.close()
            await self.source.complete(
                job.build_id, status, state=new_state, reason=reason, error=error
            )
        except LeaseLostError:
            pass
        self.current = None

    async def _heartbeat(
        self, job: types.ProvisionerJob, task: asyncio.Task[Any], why: list[str]
    ) -> None:
        interval = max(0.5, job.lease_seconds / 3)
        while not task.done():
            await asyncio.sleep(interval)
            try:
                cancel = await self.source.heartbeat(job.build_id)
            except LeaseLostError:
                why.append("lease_lost")
                task.cancel()
                return
            except Exception as exc:  # the next beat may get through before the lease ends
                self.on_error("heartbeat_failed", exc)
                continue
            if cancel:
                why.append("canceled")
                task.cancel()
                return

    async def _execute(self, job: types.ProvisionerJob, progress: _Progress) -> dict[str, Any]:
        async with asyncio.timeout(job.timeout_seconds):
            await progress.stage("Preparing")
            manifest = Manifest.model_validate(job.manifest)
            try:
                compute = resolve_compute(manifest.compute, job.parameters)
            except ComputeError as exc:
                raise BackendError(str(exc), reason="invalid_parameters") from exc
            files = await self._template_files(job)
            backend = self.backend_for(manifest.backend)
            spec = WorkspaceSpec(
                workspace_id=job.workspace_id,
                workspace_name=job.workspace_name,
                owner_id=job.owner_id,
                owner_username=job.owner_name,
                deployment_id=job.deployment_id,
                build_id=job.build_id,
                build_number=job.build_number,
                template_name=job.template_name,
                template_version=job.template_version,
                manifest=manifest,
                parameters=job.parameters,
                compute=compute,
                files_dir=files,
                access_url=job.access_url,
                env=parameter_env(job.parameters),
                agent_token=job.agent_token,
                agent_bundle_sha256=job.agent_bundle_sha256,
                agent_ca=job.agent_ca,
            )
            await progress.log(
                f"{job.transition} {job.owner_name}/{job.workspace_name} with template "
                f"{job.template_name} v{job.template_version} on {self.name}"
            )
            if job.transition == "start":
                return await backend.start(spec, dict(job.state), progress)
            if job.transition == "stop":
                return await backend.stop(spec, dict(job.state), progress)
            await backend.delete(spec, dict(job.state), progress)
            return {}

    async def _template_files(self, job: types.ProvisionerJob) -> Path:
        """The template's files, extracted once per archive and kept in the cache."""
        target = self.cache_dir / "templates" / job.archive_sha256
        if target.is_dir():
            return target
        data = await self.source.archive(job.build_id)
        if hashlib.sha256(data).hexdigest() != job.archive_sha256:
            raise BackendError(
                "the template archive changed in transit; retry the build",
                reason="archive_mismatch",
            )
        return await asyncio.to_thread(_extract, data, target)


def parameter_env(parameters: dict[str, Any]) -> dict[str, str]:
    """Parameters as environment variables for the startup script:
    ``STOCKADE_PARAMETER_<NAME>``; lists as JSON, booleans as true/false."""
    env = {}
    for name, value in parameters.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, float) and value.is_integer():
            text = str(int(value))
        elif isinstance(value, list):
            text = json.dumps(value)
        else:
            text = str(value)
        env[f"STOCKADE_PARAMETER_{name.upper()}"] = text
    return env


def _extract(data: bytes, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    scratch = Path(tempfile.mkdtemp(dir=target.parent, prefix=".extract-"))
    try:
        extract_archive(data, scratch)
        with contextlib.suppress(OSError):  # another worker extracted it first
            os.rename(scratch, target)
    except ArchiveError as exc:
        raise BackendError(
            f"the template archive is unusable: {exc}", reason="bad_archive"
        ) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
