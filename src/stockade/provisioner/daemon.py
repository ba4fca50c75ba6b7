"""``stockade provisionerd``: provisioner workers on another host, taking
builds from the server over HTTP.

Each worker has an ``HttpJobSource``: the ``JobSource`` protocol spoken to
``/api/v2/provisionerd/...`` with a provisioner key (the
``Stockade-Provisioner-Key`` header). ``acquire`` long-polls the server, so an
idle daemon makes one request per worker every ``wait`` seconds.

Failures are sorted by what they mean:

* the server cannot be reached, or answers 5xx/429: retried with backoff and
  logged, never fatal (``heartbeat`` alone does not retry: the worker logs the
  miss and beats again at its next interval);
* 409 (or 404) on a build: the lease is gone (``LeaseLostError``), the worker
  drops the build;
* 401/403: the key was refused (deleted, revoked or mistyped); the daemon
  stops with ``KeyRefusedError``.

Backends are made lazily: the deployment id they label resources with comes
with each job, so the first job of a deployment makes its ``BackendSet``.
SIGTERM and SIGINT stop the daemon at once; a build in progress is abandoned,
its lease runs out and the server gives it to another worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

import stockade
from stockade import egress
from stockade.provisioner.backends import NAMES as BACKEND_NAMES
from stockade.provisioner.backends import BackendSet
from stockade.provisioner.backends.base import Backend, BackendError, BackendOptions
from stockade.provisioner.worker import LeaseLostError, Worker
from stockade.sdk import types
from stockade.sdk.tls import client_ssl_context

KEY_HEADER = "Stockade-Provisioner-Key"
API = "/api/v2/provisionerd"
# How often the egress guard's counts go to the server.
EGRESS_REPORT_SECONDS = 10.0
PROVISIONERD_COMPONENT = "provisionerd"
# Request field limits of the protocol (see stockade.sdk.types): a value over
# them would be a 422 that no retry fixes, so they are cut here.
MAX_STAGE = 128
MAX_REASON = 64
MAX_ERROR = 8192
MAX_LINE = 65536
MAX_LINES_PER_CALL = 1000

log = logging.getLogger("stockade.provisionerd")


# --- logging ---------------------------------------------------------------------------


def _value(value: Any) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def event(level: int, what: str, /, **fields: Any) -> None:
    """One log line: the event name, then ``key=value`` pairs."""
    parts = [what, *(f"{k}={_value(v)}" for k, v in fields.items() if v is not None)]
    log.log(level, " ".join(parts))


def configure_logging(level: int = logging.INFO) -> None:
    """Log lines to stderr: ``TIME LEVEL event key=value ...``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S%z")
    )
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


# --- errors ----------------------------------------------------------------------------


class KeyRefusedError(Exception):
    """The server refused the provisioner key: the daemon must stop."""


class ServerUnavailableError(ConnectionError):
    """The server could not be reached or answered with a transient error."""


class ProtocolError(Exception):
    """The server rejected a request as malformed (a bug, not a condition to retry)."""


def _message(response: httpx.Response) -> tuple[str, str]:
    """The server's message and reason, or a generic description."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "message" in body:
        return str(body["message"]), str(body.get("reason", ""))
    return f"HTTP {response.status_code} from {response.request.url}", ""


# --- the job source ----------------------------------------------------------------------


class Backoff:
    """Exponential delays with jitter: 0.5 s, 1 s, 2 s ... up to ``cap``."""

    def __init__(self, first: float = 0.5, cap: float = 10.0) -> None:
        self.first = first
        self.cap = cap
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.first * 2.0**self.attempt)
        self.attempt += 1
        return delay * random.uniform(0.8, 1.2)


class HttpJobSource:
    """A worker's ``JobSource`` over the provisionerd HTTP API. One per worker:
    it remembers the deployment id of the build its worker holds."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        worker_id: str,
        worker_name: str,
        backends: list[str],
        wait_seconds: float = 10.0,
        retry_cap: float = 10.0,
        refused: asyncio.Event | None = None,
    ) -> None:
        self.http = http
        self.worker_id = worker_id
        self.worker_name = worker_name
        self.backends = list(backends)
        self.wait_seconds = wait_seconds
        self.retry_cap = retry_cap
        self.refused = refused or asyncio.Event()
        self.deployment_id: str | None = None
        self._last_poll = 0.0
        self._unreachable = False

    async def _call(
        self,
        method: str,
        path: str,
        *,
        body: types.Request | None = None,
        params: dict[str, Any] | None = None,
        retry: bool,
        build_id: str | None = None,
        timeout: httpx.Timeout | None = None,
    ) -> httpx.Response:
        """One protocol request. Transient failures are retried (``retry``)
        or raised as ``ServerUnavailableError``; see the module docstring for
        the rest."""
        backoff = Backoff(cap=self.retry_cap)
        payload = body.model_dump(mode="json", exclude_none=True) if body is not None else None
        while True:
            problem: str
            try:
                response = await self.http.request(
                    method,
                    path,
                    json=payload,
                    params=params,
                    timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
                )
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                status = response.status_code
                if status < 400:
                    if self._unreachable:
                        self._unreachable = False
                        event(logging.INFO, "server_reachable", worker=self.worker_name)
                    return response
                message, reason = _message(response)
                if status in (401, 403):
                    if not self.refused.is_set():
                        event(logging.ERROR, "key_refused", status=status, error=message)
                    self.refused.set()
                    raise KeyRefusedError(
                        f"the server refused the provisioner key (deleted, revoked or "
                        f"mistyped?): {message}"
                    )
                if build_id is not None and status in (404, 409):
                    raise LeaseLostError(message or f"lost the lease on build {build_id}")
                if status < 500 and status != 429:
                    raise ProtocolError(f"{method} {path}: {status} {reason}: {message}")
                problem = f"HTTP {status}: {message}"
            if not retry:
                raise ServerUnavailableError(problem)
            delay = backoff.next()
            self._unreachable = True
            event(
                logging.WARNING,
                "server_unreachable",
                worker=self.worker_name,
                request=f"{method} {path}",
                error=problem,
                retry_in=f"{delay:.1f}s",
            )
            await asyncio.sleep(delay)

    async def acquire(self) -> types.ProvisionerJob | None:
        body = types.AcquireJobRequest(
            worker_id=self.worker_id,
            worker_name=self.worker_name,
            backends=self.backends,  # checked by the model
        )
        started = time.monotonic()
        response = await self._call(
            "POST",
            f"{API}/acquire",
            body=body,
            params={"wait": self.wait_seconds} if self.wait_seconds > 0 else None,
            retry=True,
            timeout=httpx.Timeout(30.0, read=self.wait_seconds + 30.0),
        )
        self._last_poll = time.monotonic() - started
        if response.status_code == 204:
            return None
        job = types.ProvisionerJob.model_validate(response.json())
        self.deployment_id = job.deployment_id
        event(
            logging.INFO,
            "build_acquired",
            worker=self.worker_name,
            build_id=job.build_id,
            workspace=f"{job.owner_name}/{job.workspace_name}",
            build=job.build_number,
            transition=job.transition,
        )
        return job

    async def wait(self, timeout: float) -> None:
        """``acquire`` already waited on the server; pause only when it
        answered at once (a server that does not long-poll)."""
        if self._last_poll < min(1.0, self.wait_seconds / 2):
            await asyncio.sleep(min(timeout, 1.0))

    async def heartbeat(self, build_id: str) -> bool:
        response = await self._call(
            "POST",
            f"{API}/jobs/{build_id}/heartbeat",
            body=types.JobHeartbeatRequest(worker_id=self.worker_id),
            retry=False,
            build_id=build_id,
        )
        return types.JobHeartbeat.model_validate(response.json()).cancel

    async def logs(
        self, build_id: str, lines: list[types.JobLogLine], stage_started: str | None
    ) -> None:
        lines = [
            line.model_copy(update={"stage": line.stage[:MAX_STAGE], "line": line.line[:MAX_LINE]})
            for line in lines
        ]
        stage = stage_started[:MAX_STAGE] if stage_started is not None else None
        for start in range(0, max(len(lines), 1), MAX_LINES_PER_CALL):
            await self._call(
                "POST",
                f"{API}/jobs/{build_id}/logs",
                body=types.JobLogs(
                    worker_id=self.worker_id,
                    stage_started=stage if start == 0 else None,
                    lines=lines[start : start + MAX_LINES_PER_CALL],
                ),
                retry=True,
                build_id=build_id,
            )

    async def archive(self, build_id: str) -> bytes:
        response = await self._call(
            "GET",
            f"{API}/jobs/{build_id}/archive",
            params={"worker_id": self.worker_id},
            retry=True,
            build_id=build_id,
        )
        return response.content

    async def complete(
        self,
        build_id: str,
        status: Literal["succeeded", "failed", "canceled"],
        *,
        state: dict[str, Any] | None,
        reason: str | None = None,
        error: str | None = None,
    ) -> None:
        await self._call(
            "POST",
            f"{API}/jobs/{build_id}/complete",
            body=types.CompleteJobRequest(
                worker_id=self.worker_id,
                status=status,
                state=state,
                reason=reason[:MAX_REASON] if reason else None,
                error=error[:MAX_ERROR] if error else None,
            ),
            retry=True,
            build_id=build_id,
        )
        event(
            logging.INFO if status == "succeeded" else logging.WARNING,
            "build_finished",
            worker=self.worker_name,
            build_id=build_id,
            status=status,
            reason=reason,
            error=error,
        )


# --- the daemon ------------------------------------------------------------------------


@dataclass(frozen=True)
class DaemonConfig:
    """What ``stockade provisionerd start`` was told."""

    url: str
    key: str
    data_dir: Path
    backends: list[str] = field(default_factory=lambda: list(BACKEND_NAMES))
    workers: int = 1
    name: str = ""
    allow_unsandboxed: bool = False
    docker_host: str = ""
    docker_network: str = ""
    terraform_binary: str = "terraform"
    terraform_mirror_dir: Path | None = None
    kubernetes_config: str = ""
    kubernetes_namespace: str = "stockade-workspaces"
    wait_seconds: float = 10.0

    @property
    def options(self) -> BackendOptions:
        return BackendOptions(
            workspaces_dir=self.data_dir / "workspaces",
            allow_unsandboxed=self.allow_unsandboxed,
            docker_host=self.docker_host,
            docker_network=self.docker_network,
            terraform_binary=self.terraform_binary,
            terraform_mirror_dir=self.terraform_mirror_dir or self.data_dir / "terraform-mirror",
            kubernetes_config=self.kubernetes_config,
            kubernetes_namespace=self.kubernetes_namespace,
        )


class _Backends:
    """One ``BackendSet`` per deployment id, made when its first job comes."""

    def __init__(self, options: BackendOptions, names: list[str]) -> None:
        self.options = options
        self.names = names
        self._sets: dict[str, BackendSet] = {}

    def for_deployment(self, deployment_id: str) -> BackendSet:
        found = self._sets.get(deployment_id)
        if found is not None:
            return found
        if self._sets:
            event(
                logging.WARNING,
                "deployment_changed",
                deployment_id=deployment_id,
                known=",".join(self._sets),
            )
        made = BackendSet(self.options, deployment_id)
        self._sets[deployment_id] = made
        event(logging.INFO, "backends_ready", deployment_id=deployment_id)
        if "local" in self.names:
            try:
                local = made.get("local")
            except BackendError as exc:
                event(logging.ERROR, "local_backend_unavailable", error=exc.message)
            else:
                if not getattr(local, "sandboxed", True):
                    event(
                        logging.WARNING,
                        "local_workspaces_unsandboxed",
                        message="bubblewrap (bwrap) is missing and unsandboxed local workspaces "
                        "are allowed: local workspaces run as plain processes on this host",
                    )
        return made

    def getter(self, source: HttpJobSource) -> Callable[[str], Backend]:
        """The ``backends`` callable of the worker that uses ``source``."""

        def get(name: str) -> Backend:
            if source.deployment_id is None:
                raise BackendError(
                    "the provisioner has no deployment id yet", reason="no_deployment"
                )
            return self.for_deployment(source.deployment_id).get(name)

        return get

    async def close(self) -> None:
        for made in self._sets.values():
            with contextlib.suppress(Exception):
                await made.close()


def _log_worker_error(what: str, exc: BaseException) -> None:
    event(logging.ERROR, what, error=f"{type(exc).__name__}: {exc}")
    if log.isEnabledFor(logging.DEBUG):
        log.debug("traceback", exc_info=exc)


class Daemon:
    """Runs ``config.workers`` workers until stopped or refused."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.name = config.name or f"{socket.gethostname()}:{os.getpid()}"
        self.refused = asyncio.Event()
        self.stopping = asyncio.Event()
        self.workers: list[Worker] = []
        self.refusal: str | None = None

    def stop(self) -> None:
        self.stopping.set()

    async def run(self) -> None:
        """Serve builds until ``stop()``; raises ``KeyRefusedError`` when the
        server refuses the key."""
        config = self.config
        self.config.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        backends = _Backends(config.options, config.backends)
        http = httpx.AsyncClient(
            base_url=config.url.rstrip("/"),
            headers={
                KEY_HEADER: config.key,
                "User-Agent": f"stockade-provisionerd/{stockade.__version__}",
            },
            timeout=httpx.Timeout(30.0),
            limits=httpx.Limits(max_connections=max(10, config.workers * 3)),
            trust_env=False,
            # A server with a private CA: $STOCKADE_CA_FILE, as for the CLI.
            verify=client_ssl_context() if config.url.startswith("https://") else True,
        )
        event(
            logging.INFO,
            "provisionerd_started",
            url=config.url,
            name=self.name,
            workers=config.workers,
            backends=",".join(config.backends),
            data_dir=str(config.data_dir),
            version=stockade.__version__,
        )
        tasks: dict[asyncio.Task[Any], int] = {}
        reporter = asyncio.create_task(self._report_egress(http), name="provisionerd:egress")
        try:
            for i in range(config.workers):
                tasks[self._start_worker(i, http, backends)] = i
            stop = asyncio.create_task(self.stopping.wait())
            refused = asyncio.create_task(self.refused.wait())
            try:
                while not (self.stopping.is_set() or self.refused.is_set()):
                    done, _ = await asyncio.wait(
                        [*tasks, stop, refused], return_when=asyncio.FIRST_COMPLETED
                    )
                    for task in done:
                        index = tasks.pop(task, None)
                        if index is None:
                            continue
                        exc = task.exception() if not task.cancelled() else None
                        if isinstance(exc, KeyRefusedError):
                            self.refusal = str(exc)
                            self.refused.set()
                            continue
                        # A worker must not end; a bug that ends one is logged
                        # and the worker is started again.
                        _log_worker_error("worker_crashed", exc or RuntimeError("the worker ended"))
                        await asyncio.sleep(1.0)
                        tasks[self._start_worker(index, http, backends)] = index
            finally:
                stop.cancel()
                refused.cancel()
        finally:
            busy = [w.current for w in self.workers if w.current is not None]
            for task in [*tasks, reporter]:
                task.cancel()
            await asyncio.gather(*tasks, reporter, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._send_egress(http)  # the last counts
            await backends.close()
            await http.aclose()
            if busy:
                event(
                    logging.WARNING,
                    "builds_abandoned",
                    builds=",".join(busy),
                    message="their leases run out and the server retries them",
                )
        if self.refused.is_set():
            raise KeyRefusedError(self.refusal or "the server refused the provisioner key")
        event(logging.INFO, "provisionerd_stopped", name=self.name)

    async def _report_egress(self, http: httpx.AsyncClient) -> None:
        """Send the egress guard's counts now and then; the server answers
        with the deployment's allow-list, which the guard enforces from then on."""
        while True:
            try:
                await self._send_egress(http)
            except (httpx.HTTPError, ValueError) as exc:
                event(logging.WARNING, "egress_report_failed", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(EGRESS_REPORT_SECONDS)

    async def _send_egress(self, http: httpx.AsyncClient) -> None:
        records = egress.ledger().drain()
        body = types.EgressRecords(daemon=self.name[:64], records=[r.as_dict() for r in records])
        try:
            response = await http.post(
                "/api/v2/provisionerd/egress", json=body.model_dump(mode="json")
            )
            response.raise_for_status()
        except BaseException:
            egress.ledger().add(records)
            raise
        policy = types.EgressPolicyWire.model_validate(response.json()).policy
        if egress.guard_installed():
            egress.install(
                egress.EgressPolicy.from_wire(policy, own_hosts=[self.server_host]),
                PROVISIONERD_COMPONENT,
            )

    @property
    def server_host(self) -> str:
        return urlsplit(self.config.url).hostname or ""

    def _start_worker(
        self, index: int, http: httpx.AsyncClient, backends: _Backends
    ) -> asyncio.Task[None]:
        worker_name = f"{self.name}/{index + 1}" if self.config.workers > 1 else self.name
        source = HttpJobSource(
            http,
            worker_id=uuid.uuid4().hex,
            worker_name=worker_name,
            backends=self.config.backends,
            wait_seconds=self.config.wait_seconds,
            refused=self.refused,
        )
        worker = Worker(
            source,
            backends.getter(source),
            cache_dir=self.config.data_dir / "cache",
            name=worker_name,
            on_error=_log_worker_error,
        )
        if index < len(self.workers):
            self.workers[index] = worker
        else:
            self.workers.append(worker)
        return asyncio.create_task(worker.run_forever(), name=f"provisionerd:{worker_name}")


async def serve(config: DaemonConfig) -> None:
    """Run a daemon with SIGTERM and SIGINT stopping it."""
    daemon = Daemon(config)
    # Until the server sends the deployment's allow-list: the server and
    # the private networks.
    egress.install(
        egress.EgressPolicy.build(own_hosts=[daemon.server_host]), PROVISIONERD_COMPONENT
    )
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, _stop_on, daemon, sig)
    try:
        await daemon.run()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


def _stop_on(daemon: Daemon, sig: signal.Signals) -> None:
    if not daemon.stopping.is_set():
        event(logging.INFO, "provisionerd_stopping", signal=sig.name)
    daemon.stop()
