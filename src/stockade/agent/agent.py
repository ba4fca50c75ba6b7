"""The workspace agent process: connects out to the control plane, runs the
startup script once, collects metadata, reconnects by itself.

Runs inside the workspace on Python 3.9+ with the standard library plus
``wsproto``/``h11``; it imports nothing from the rest of Stockade but
:mod:`stockade.agent`. Configuration comes from the environment:

``STOCKADE_ACCESS_URL``     the control plane's URL (http, https, ws or wss)
``STOCKADE_AGENT_TOKEN``    the workspace's agent token; removed from the
                            environment at once, so no child process sees it
``STOCKADE_AGENT_CA_FILE``  optional CA bundle (PEM) to trust for https/wss

Exit codes: 0 after SIGTERM/SIGINT, 2 for a configuration error, 3 when the
control plane refuses the token (HTTP 401/403 on the upgrade, close code
``CLOSE_TOKEN_REFUSED`` or a ``close`` message): retrying cannot help then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import signal
import socket
import ssl
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any
from urllib.parse import urlsplit

from stockade import egress
from stockade.agent.apphealth import AppHealth
from stockade.agent.protocol import CLOSE_TOKEN_REFUSED, CONNECT_PATH, PROTOCOL_VERSION
from stockade.agent.ptys import PtyManager
from stockade.agent.scripts import kill_group, run_captured, start_streamed
from stockade.agent.streams import StreamManager, StreamRefused, serve_ssh_handler
from stockade.agent.wsclient import (
    ConnectionClosed,
    HandshakeRejected,
    WebSocketClient,
    WebSocketError,
    connect,
    websocket_url,
)
from stockade.egress import EgressPolicy
from stockade.tunnel.protocol import CLOSE_UNSUPPORTED, KIND_PTY, KIND_SSH

log = logging.getLogger("stockade.agent")

TOKEN_ENV = "STOCKADE_AGENT_TOKEN"
URL_ENV = "STOCKADE_ACCESS_URL"
CA_FILE_ENV = "STOCKADE_AGENT_CA_FILE"

EXIT_OK = 0
EXIT_CONFIG = 2
EXIT_REFUSED = 3

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 30.0
CONNECT_TIMEOUT = 10.0
# A connection that brings no manifest this long after hello is dropped.
MANIFEST_TIMEOUT = 30.0
# The agent pings this often (STOCKADE_AGENT_KEEPALIVE_SECONDS overrides it);
# silence for three times as long means the connection is dead even if TCP
# has not noticed.
KEEPALIVE_ENV = "STOCKADE_AGENT_KEEPALIVE_SECONDS"
KEEPALIVE_INTERVAL = 15.0
# Startup output is sent in batches: lines that arrive within this window go
# out together.
LOG_BATCH_SECONDS = 0.1
LOG_BATCH_MAX_LINES = 1000
LOG_BATCH_MAX_BYTES = 512 * 1024
# Lines kept while the control plane is unreachable; the oldest go first.
LOG_BUFFER_MAX_LINES = 10000
LOG_BUFFER_MAX_BYTES = 4 * 1024 * 1024
METADATA_VALUE_MAX_BYTES = 4096
METADATA_MIN_INTERVAL = 1.0
METADATA_DEFAULT_TIMEOUT = 10.0
SHUTDOWN_FLUSH_SECONDS = 2.0
# Stream statistics go out this often when they changed.
STATS_INTERVAL = 10.0


def utcnow() -> str:
    """Now, as an ISO 8601 UTC string."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def backoff_delay(attempt: int) -> float:
    """The wait before reconnect number ``attempt`` (0-based): exponential
    from 0.5 s to 30 s, jittered down by up to half so that a fleet of agents
    does not come back in lockstep after a server restart."""
    base = min(BACKOFF_MAX, BACKOFF_INITIAL * (2 ** min(attempt, 16)))
    return random.uniform(base / 2, base)


class TokenRefused(Exception):
    """The control plane refused or revoked the token: stop for good."""


def take_token() -> str:
    """Read the agent token and remove it from the environment, so that no
    process the agent starts inherits it.

    ``os.environ`` is only a copy: ``/proc/<pid>/environ`` shows the memory
    the process was started with. That copy of the value is overwritten too
    (best effort, through ctypes), so other processes of the workspace user
    cannot read the token there either.
    """
    token = os.environ.get(TOKEN_ENV, "")
    # Scrub first: removing the variable also drops libc's pointer to it.
    if token and not _scrub_process_environ(TOKEN_ENV):
        log.warning(
            "could not clear the token from /proc/self/environ "
            "(no ctypes); it stays readable there by this user"
        )
    os.environ.pop(TOKEN_ENV, None)
    return token


def _scrub_process_environ(name: str) -> bool:
    """Overwrite the value of ``name`` in the C-level environment block with
    zero bytes. True when nothing of it remains (or it was not there)."""
    try:
        import ctypes
    except ImportError:
        return False
    try:
        libc = ctypes.CDLL(None)
        environ = ctypes.POINTER(ctypes.c_void_p).in_dll(libc, "environ")
    except (OSError, ValueError):
        return False
    prefix = name.encode() + b"="
    index = 0
    while True:
        address = environ[index]
        if not address:
            return True
        entry = ctypes.string_at(address)
        if entry.startswith(prefix):
            ctypes.memset(address + len(prefix), 0, len(entry) - len(prefix))
        index += 1


@dataclass
class AgentConfig:
    """What the agent needs to run, from its environment."""

    access_url: str
    token: str
    ca_file: str = ""
    keepalive: float = KEEPALIVE_INTERVAL
    home: str = field(default_factory=lambda: os.environ.get("HOME") or "/")

    @classmethod
    def from_environment(cls) -> AgentConfig:
        """Read (and take the token out of) ``os.environ``.

        Raises ``ValueError`` with a message for the log when something is
        missing.
        """
        token = take_token()
        url = os.environ.get(URL_ENV, "").strip()
        if not url:
            raise ValueError(f"{URL_ENV} is not set: the agent does not know where to connect")
        websocket_url(url, CONNECT_PATH)  # validates
        if not token:
            raise ValueError(f"{TOKEN_ENV} is not set: the agent cannot authenticate")
        ca_file = os.environ.get(CA_FILE_ENV, "").strip()
        if ca_file and not os.path.isfile(ca_file):
            raise ValueError(f"{CA_FILE_ENV}={ca_file} is not a readable file")
        try:
            keepalive = float(os.environ.get(KEEPALIVE_ENV) or KEEPALIVE_INTERVAL)
        except ValueError:
            raise ValueError(f"{KEEPALIVE_ENV} must be a number of seconds") from None
        if keepalive <= 0:
            raise ValueError(f"{KEEPALIVE_ENV} must be positive")
        return cls(access_url=url, token=token, ca_file=ca_file, keepalive=keepalive)

    @property
    def control_host(self) -> str:
        """The control plane's host: the agent may always reach it."""
        return urlsplit(self.access_url).hostname or ""


@dataclass
class _Lifecycle:
    state: str
    time: str
    # Number of startup log lines produced before this transition: keeps the
    # order of lines and transitions on the wire.
    log_seq: int


@dataclass
class _LogLine:
    seq: int
    time: str
    line: str


class Agent:
    """One agent process. Create it inside a running event loop."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._url = websocket_url(config.access_url, CONNECT_PATH)
        self._ssl: ssl.SSLContext | None = None
        if self._url.startswith("wss:"):
            self._ssl = ssl.create_default_context(cafile=config.ca_file or None)
        # The environment scripts get: ours (the token is already gone).
        self._base_env = dict(os.environ)
        self._lifecycle = _Lifecycle("created", utcnow(), 0)
        self._lifecycle_pending: list[_Lifecycle] = []
        self._log_seq = 0
        self._logs: deque[_LogLine] = deque()
        self._logs_bytes = 0
        self._logs_dropped = 0
        self._metadata: dict[str, dict[str, Any]] = {}
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._stop = asyncio.Event()
        self._manifest: dict[str, Any] | None = None
        self._metadata_spec: list[dict[str, Any]] = []
        self._startup_task: asyncio.Task[None] | None = None
        self._startup_script: asyncio.subprocess.Process | None = None
        self._metadata_tasks: list[asyncio.Task[None]] = []
        self._ws: WebSocketClient | None = None
        self._established = False
        self._streams = StreamManager(self._url_base(), config.token, self._ssl, self._send_control)
        self._streams.register(KIND_SSH, serve_ssh_handler(self._ssh_server, self._streams.stats))
        self._ptys = PtyManager(self._script_env, self._cwd, self._streams.stats)
        self._streams.register(KIND_PTY, self._ptys.serve)
        self._ssh: Any = None
        self._app_health = AppHealth(self._send_control)

    def _url_base(self) -> str:
        return self.config.access_url

    async def _send_control(self, message: dict[str, Any]) -> None:
        """Send one message on the control connection, if there is one."""
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionClosed(1006, "not connected to the control plane")
        await ws.send_text(json.dumps(message))

    def _ssh_server(self) -> Any:
        """The SSH server, created on the first ssh stream (asyncssh is only
        imported then: the agent's other work never depends on it)."""
        if self._ssh is not None:
            return self._ssh
        host_key = (self._manifest or {}).get("ssh_host_key")
        if not isinstance(host_key, str) or not host_key:
            raise StreamRefused(CLOSE_UNSUPPORTED, "the control plane sent no SSH host key")
        from stockade.agent import ssh

        available, reason = ssh.ssh_available()
        if not available:
            raise StreamRefused(
                CLOSE_UNSUPPORTED, f"SSH is not available in this workspace: {reason}"
            )
        self._ssh = ssh.WorkspaceSSHServer(host_key, environment=self._script_env, cwd=self._cwd)
        return self._ssh

    # -- state --------------------------------------------------------------

    @property
    def lifecycle(self) -> str:
        """The current lifecycle state."""
        return self._lifecycle.state

    def _set_lifecycle(self, state: str) -> None:
        self._lifecycle = _Lifecycle(state, utcnow(), self._log_seq)
        self._lifecycle_pending.append(self._lifecycle)
        log.info("lifecycle %s", state)
        self._urgent.set()
        self._wake.set()

    def _add_log_line(self, line: str) -> None:
        self._log_seq += 1
        self._logs.append(_LogLine(self._log_seq, utcnow(), line))
        self._logs_bytes += len(line)
        while len(self._logs) > LOG_BUFFER_MAX_LINES or self._logs_bytes > LOG_BUFFER_MAX_BYTES:
            dropped = self._logs.popleft()
            self._logs_bytes -= len(dropped.line)
            if self._logs_dropped == 0:
                log.warning("startup log buffer full: dropping the oldest lines")
            self._logs_dropped += 1
        self._wake.set()

    def _script_env(self) -> dict[str, str]:
        env = dict(self._base_env)
        # The template's parameters, then what the server gives every session
        # (the AI bridge's base URLs and key, for stock OpenAI/Anthropic clients).
        for part in ("env", "session_env"):
            manifest_env = (self._manifest or {}).get(part)
            if isinstance(manifest_env, dict):
                env.update({str(k): str(v) for k, v in manifest_env.items()})
        env.pop(TOKEN_ENV, None)
        return env

    def _cwd(self) -> str:
        return self.config.home if os.path.isdir(self.config.home) else "/"

    # -- main loop ----------------------------------------------------------

    async def run(self) -> int:
        """Run until SIGTERM/SIGINT (returns 0) or a refused token (3)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        # Logged only now, so whoever waits for this line may stop us cleanly.
        log.info(
            "starting: python %s, pid %d, control plane %s",
            platform.python_version(),
            os.getpid(),
            self.config.access_url,
        )
        connection = asyncio.ensure_future(self._connection_loop())
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({connection, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                code = connection.result()
                await self._stop_work()
                return code
            await self._shutdown()
            return EXIT_OK
        finally:
            for task in (connection, stopped):
                task.cancel()
            await asyncio.gather(connection, stopped, return_exceptions=True)

    def _on_signal(self, sig: int) -> None:
        log.info("received %s: shutting down", signal.Signals(sig).name)
        self._stop.set()

    async def _shutdown(self) -> None:
        """Report shutting_down and off (best effort), stop everything."""
        self._set_lifecycle("shutting_down")
        await self._flush_wait(SHUTDOWN_FLUSH_SECONDS)
        await self._stop_work()
        self._set_lifecycle("off")
        await self._flush_wait(SHUTDOWN_FLUSH_SECONDS)
        ws = self._ws
        if ws is not None:
            await ws.close(1001, "agent shutting down")
        log.info("stopped")

    async def _flush_wait(self, timeout: float) -> None:
        """Wait until what is pending has been sent, while connected."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            connected = self._ws is not None and not self._ws.closed
            if not connected or not (self._lifecycle_pending or self._logs or self._metadata):
                return
            await asyncio.sleep(0.01)

    async def _stop_work(self) -> None:
        """Stop streams, metadata collection and a startup script still running."""
        await self._streams.close()
        await self._app_health.stop()
        await self._ptys.close()
        if self._ssh is not None:
            with contextlib.suppress(Exception):
                await self._ssh.close()
        script = self._startup_script
        if script is not None and script.returncode is None:
            kill_group(script, signal.SIGTERM)
        tasks = list(self._metadata_tasks)
        if self._startup_task is not None:
            tasks.append(self._startup_task)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._metadata_tasks = []

    async def _connection_loop(self) -> int:
        attempt = 0
        while True:
            self._established = False
            try:
                await self._session()
            except TokenRefused as exc:
                log.error("the control plane refused the agent token (%s): giving up", exc)
                return EXIT_REFUSED
            except (WebSocketError, OSError, asyncio.TimeoutError, ValueError) as exc:
                if self._stop.is_set():
                    return EXIT_OK  # our own close during shutdown
                log.warning("connection to %s failed: %s", self._url, _describe(exc))
            if self._established:
                attempt = 0
            delay = backoff_delay(attempt)
            attempt += 1
            log.info("reconnecting in %.1fs", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> None:
        """One connection, from connect to its end (always by an exception)."""
        headers = [
            ("Authorization", f"Bearer {self.config.token}"),
            ("User-Agent", f"stockade-agent/{PROTOCOL_VERSION}"),
        ]
        try:
            ws = await connect(self._url, headers, self._ssl, CONNECT_TIMEOUT)
        except HandshakeRejected as exc:
            if exc.status in (401, 403):
                raise TokenRefused(f"HTTP {exc.status}") from None
            raise
        log.info("connected to %s", self._url)
        self._ws = ws
        tasks: list[asyncio.Task[None]] = []
        try:
            await ws.send_text(json.dumps(self._hello()))
            # The current state first, then whatever is still unsent.
            self._lifecycle_pending = [self._lifecycle]
            self._urgent.set()
            self._wake.set()
            tasks = [
                asyncio.ensure_future(self._receive(ws)),
                asyncio.ensure_future(self._send(ws)),
                asyncio.ensure_future(self._keepalive(ws)),
                asyncio.ensure_future(self._report_stats(ws)),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                error = task.exception()
                if error is not None:
                    raise error
            raise WebSocketError("connection ended")
        finally:
            self._ws = None
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await ws.close()

    def _hello(self) -> dict[str, Any]:
        return {
            "type": "hello",
            "version": PROTOCOL_VERSION,
            "hostname": socket.gethostname(),
            "os": platform.system().lower(),
            "arch": platform.machine(),
            "python": platform.python_version(),
        }

    # -- receiving ----------------------------------------------------------

    async def _receive(self, ws: WebSocketClient) -> None:
        got_manifest = False
        while True:
            try:
                if got_manifest:
                    text = await ws.recv()
                else:
                    text = await asyncio.wait_for(ws.recv(), MANIFEST_TIMEOUT)
            except asyncio.TimeoutError:
                raise WebSocketError(
                    f"no manifest within {MANIFEST_TIMEOUT:.0f}s of hello"
                ) from None
            except ConnectionClosed as exc:
                if exc.code == CLOSE_TOKEN_REFUSED:
                    raise TokenRefused(f"close code {exc.code} {exc.reason}".strip()) from None
                raise
            try:
                message = json.loads(text)
            except ValueError:
                log.warning("ignoring a frame that is not JSON")
                continue
            if not isinstance(message, dict):
                continue
            kind = message.get("type")
            if kind == "manifest":
                got_manifest = True
                self._on_manifest(message)
            elif kind == "open_stream":
                self._streams.open(message)
            elif kind == "close":
                raise TokenRefused(f"close: {message.get('reason') or 'token revoked'}")

    def _on_manifest(self, manifest: dict[str, Any]) -> None:
        first = self._manifest is None
        self._manifest = manifest
        self._established = True
        log.info(
            "manifest received for workspace %s",
            manifest.get("workspace_name") or manifest.get("workspace_id") or "?",
        )
        if first:
            self._startup_task = asyncio.ensure_future(self._run_startup(manifest))
        self._app_health.configure(manifest.get("apps"))
        if "egress" in manifest:
            try:
                policy = EgressPolicy.from_wire(
                    manifest["egress"], own_hosts=[self.config.control_host]
                )
            except ValueError as exc:
                log.warning("keeping the egress allow-list: %s", exc)
            else:
                egress.install(policy, "agent")
        spec = manifest.get("metadata")
        spec = [item for item in spec if isinstance(item, dict)] if isinstance(spec, list) else []
        if spec != self._metadata_spec:
            self._metadata_spec = spec
            for task in self._metadata_tasks:
                task.cancel()
            self._metadata_tasks = [
                asyncio.ensure_future(self._collect(item)) for item in spec if item.get("key")
            ]

    # -- sending ------------------------------------------------------------

    async def _send(self, ws: WebSocketClient) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._urgent.is_set():
                # Let more lines join the batch, unless a transition comes.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), LOG_BATCH_SECONDS)
            self._urgent.clear()
            await self._flush(ws)

    async def _flush(self, ws: WebSocketClient) -> None:
        """Send everything pending, lines and transitions in their order."""
        while self._lifecycle_pending:
            transition = self._lifecycle_pending[0]
            await self._send_logs(ws, transition.log_seq)
            await ws.send_text(
                json.dumps(
                    {"type": "lifecycle", "state": transition.state, "time": transition.time}
                )
            )
            if self._lifecycle_pending and self._lifecycle_pending[0] is transition:
                self._lifecycle_pending.pop(0)
        await self._send_logs(ws, self._log_seq)
        if self._metadata:
            items = dict(self._metadata)
            await ws.send_text(json.dumps({"type": "metadata", "items": list(items.values())}))
            for key, item in items.items():
                if self._metadata.get(key) is item:
                    del self._metadata[key]

    async def _send_logs(self, ws: WebSocketClient, upto: int) -> None:
        """Send buffered lines with ``seq <= upto``, removing each batch once
        it has been written."""
        while self._logs and self._logs[0].seq <= upto:
            batch: list[dict[str, str]] = []
            if self._logs_dropped:
                batch.append(
                    {
                        "time": utcnow(),
                        "line": f"[stockade-agent: {self._logs_dropped} lines of output "
                        "were dropped while the control plane was unreachable]",
                    }
                )
            size = 0
            last = 0
            for entry in self._logs:
                if entry.seq > upto or len(batch) >= LOG_BATCH_MAX_LINES:
                    break
                if batch and size + len(entry.line) > LOG_BATCH_MAX_BYTES:
                    break
                batch.append({"time": entry.time, "line": entry.line})
                size += len(entry.line)
                last = entry.seq
            await ws.send_text(json.dumps({"type": "startup_log", "lines": batch}))
            self._logs_dropped = 0
            while self._logs and self._logs[0].seq <= last:
                self._logs_bytes -= len(self._logs.popleft().line)

    async def _keepalive(self, ws: WebSocketClient) -> None:
        interval = self.config.keepalive
        while True:
            await asyncio.sleep(interval)
            silent = time.monotonic() - ws.last_received
            if silent > 3 * interval:
                raise ConnectionClosed(1006, f"nothing from the server for {silent:.0f}s")
            await ws.ping()

    async def _report_stats(self, ws: WebSocketClient) -> None:
        last: dict[str, Any] = {}
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            current = self._streams.stats.as_message()
            if current != last:
                await ws.send_text(json.dumps(current))
                last = current
            await self._report_egress(ws)

    async def _report_egress(self, ws: WebSocketClient) -> None:
        """Send what the egress guard counted since the last report (the
        counts stay for the next connection when the send fails)."""
        records = egress.ledger().drain()
        if not records:
            return
        try:
            await ws.send_text(
                json.dumps({"type": "egress", "records": [r.as_dict() for r in records]})
            )
        except BaseException:
            egress.ledger().add(records)
            raise

    # -- scripts ------------------------------------------------------------

    async def _run_startup(self, manifest: dict[str, Any]) -> None:
        """Run the startup script once, streaming its output, and report."""
        script = manifest.get("startup_script")
        script = script if isinstance(script, str) else ""
        timeout = _positive_float(manifest.get("startup_timeout"), 0.0)
        self._set_lifecycle("starting")
        if not script.strip():
            self._set_lifecycle("ready")
            return
        try:
            started = await start_streamed(
                script, self._script_env(), self._cwd(), self._add_log_line
            )
        except OSError as exc:
            log.error("could not start the startup script: %s", exc)
            self._add_log_line(f"[stockade-agent: could not start the startup script: {exc}]")
            self._set_lifecycle("start_error")
            return
        self._startup_script = started.process
        log.info("startup script started (pid %d)", started.process.pid)
        try:
            code = await asyncio.wait_for(started.process.wait(), timeout or None)
        except asyncio.TimeoutError:
            kill_group(started.process)
            await started.process.wait()
            await asyncio.wait({started.output_done}, timeout=LOG_BATCH_SECONDS)
            log.warning("startup script killed after its timeout of %gs", timeout)
            self._set_lifecycle("start_timeout")
            return
        # Output written just before the exit is still in the pipe: read it
        # before the transition (background processes may keep the pipe open,
        # so do not wait for its end).
        await asyncio.wait({started.output_done}, timeout=LOG_BATCH_SECONDS)
        log.info("startup script exited with code %d", code)
        self._set_lifecycle("ready" if code == 0 else "start_error")

    async def _collect(self, item: dict[str, Any]) -> None:
        """Run one metadata command every ``interval`` seconds."""
        key = str(item.get("key"))
        script = item.get("script")
        script = script if isinstance(script, str) else ""
        interval = max(METADATA_MIN_INTERVAL, _positive_float(item.get("interval"), 60.0))
        timeout = _positive_float(item.get("timeout"), METADATA_DEFAULT_TIMEOUT)
        while True:
            started = time.monotonic()
            value, error = "", ""
            try:
                result = await run_captured(script, self._script_env(), self._cwd(), timeout)
            except OSError as exc:
                error = f"could not run the command: {exc}"
            else:
                value = _truncate(result.stdout.decode("utf-8", errors="replace").strip())
                if result.exit_code is None:
                    error = f"timed out after {timeout:g}s"
                elif result.exit_code != 0:
                    detail = result.stderr.decode("utf-8", errors="replace").strip()
                    error = f"exit code {result.exit_code}" + (f": {detail}" if detail else "")
                    error = _truncate(error)
            self._metadata[key] = {
                "key": key,
                "value": value,
                "error": error,
                "collected_at": utcnow(),
            }
            self._wake.set()
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.0, interval - elapsed))


def _positive_float(value: object, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return default
    return float(value)


def _truncate(text: str) -> str:
    data = text.encode("utf-8")
    if len(data) <= METADATA_VALUE_MAX_BYTES:
        return text
    return data[:METADATA_VALUE_MAX_BYTES].decode("utf-8", errors="ignore")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _UTCFormatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """ISO 8601 UTC with milliseconds."""
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + (
            f".{int(record.msecs):03d}Z"
        )


def configure_logging() -> None:
    """One line per event on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_UTCFormatter("%(asctime)s stockade-agent %(levelname)s %(message)s"))
    root = logging.getLogger("stockade.agent")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


async def _amain(config: AgentConfig) -> int:
    return await Agent(config).run()


def main() -> int:
    """Run the agent until it is told to stop; the process exit code."""
    configure_logging()
    try:
        config = AgentConfig.from_environment()
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
    # Until the manifest brings the deployment's allow-list: the control
    # plane and the private networks.
    egress.install(EgressPolicy.build(own_hosts=[config.control_host]), "agent")
    return asyncio.run(_amain(config))


__all__ = ["Agent", "AgentConfig", "main"]
