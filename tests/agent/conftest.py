"""A stand-in control plane for the agent tests: a real WebSocket server (the
``websockets`` package) on 127.0.0.1 that speaks the server side of
:mod:`stockade.agent.protocol`, plus helpers to run the real agent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from stockade.agent.bundle import BUNDLE_PATH, SHA256_HEADER, build_bundle
from stockade.agent.protocol import CONNECT_PATH
from stockade.devtools.ports import free_port
from tests.conftest import require

TOKEN = "agent-token-0123456789abcdef-SECRET"
SYSTEM_PYTHON = "/usr/bin/python3"


@dataclass
class Received:
    """One frame the agent sent, with the number of its connection (from 1)."""

    connection: int
    message: dict[str, Any]


@dataclass
class FakeControlPlane:
    """Plays the control plane: checks the token, answers hello with the
    manifest, records every frame, and serves the agent bundle."""

    manifest: dict[str, Any]
    token: str = TOKEN
    port: int = field(default_factory=free_port)
    # "close": accept the upgrade, then close with CLOSE_TOKEN_REFUSED.
    refuse: str = ""
    bundle: bytes = b""
    bundle_sha256: str = ""
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    upgrade_statuses: list[int] = field(default_factory=list)
    bundle_downloads: int = 0
    # Serve https/wss with this context.
    ssl_context: ssl.SSLContext | None = None
    _server: Server | None = None

    @property
    def url(self) -> str:
        """The access URL the agent is given."""
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Listen (again) on ``port``."""
        self._server = await serve(
            self._handle,
            "127.0.0.1",
            self.port,
            process_request=self._process_request,
            compression=None,
            ssl=self.ssl_context,
        )

    async def stop(self) -> None:
        """Stop listening and drop every connection (a server crash, as far
        as the agent can tell)."""
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path == BUNDLE_PATH:
            self.bundle_downloads += 1
            headers = Headers(
                [("Content-Type", "application/zip"), ("Content-Length", str(len(self.bundle)))]
            )
            if self.bundle_sha256:
                headers[SHA256_HEADER] = self.bundle_sha256
            return Response(200, "OK", headers, self.bundle)
        if request.path != CONNECT_PATH:
            return connection.respond(404, "not found\n")
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            self.upgrade_statuses.append(401)
            return connection.respond(401, "agent token refused\n")
        return None

    async def _handle(self, connection: ServerConnection) -> None:
        self.connections += 1
        number = self.connections
        if self.refuse == "close":
            await connection.close(4401, "token revoked")
            return
        try:
            async for frame in connection:
                message = json.loads(frame)
                self.received.append(Received(number, message))
                if message.get("type") == "hello":
                    await connection.send(json.dumps({"type": "manifest", **self.manifest}))
        except ConnectionClosed:
            pass

    # -- what arrived ---------------------------------------------------------

    def of_type(self, kind: str, connection: int | None = None) -> list[dict[str, Any]]:
        """Frames of one type, in arrival order (of one connection if given)."""
        return [
            r.message
            for r in self.received
            if r.message.get("type") == kind and (connection is None or r.connection == connection)
        ]

    def states(self, connection: int | None = None) -> list[str]:
        """Lifecycle states reported, in order."""
        return [m["state"] for m in self.of_type("lifecycle", connection)]

    def log_lines(self, connection: int | None = None) -> list[str]:
        """Startup log lines, in order."""
        return [
            line["line"] for m in self.of_type("startup_log", connection) for line in m["lines"]
        ]

    async def wait_for(
        self, condition: Callable[[], object], timeout: float = 10.0, what: str = ""
    ) -> None:
        """Poll until ``condition()`` is true."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                frames = [(r.connection, r.message) for r in self.received]
                raise AssertionError(f"timed out waiting for {what or condition}: got {frames}")
            await asyncio.sleep(0.02)


def manifest(
    startup_script: str = "",
    startup_timeout: float = 0,
    metadata: list[dict[str, Any]] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A manifest as the control plane sends it (without ``type``)."""
    return {
        "workspace_id": "0b5e6f0e-0000-4000-8000-000000000001",
        "workspace_name": "dev",
        "owner": "alice",
        "startup_script": startup_script,
        "startup_timeout": startup_timeout,
        "metadata": metadata or [],
        "env": env or {},
    }


@pytest.fixture
async def control_plane() -> AsyncIterator[Callable[..., FakeControlPlane]]:
    """Make (and afterwards stop) fake control planes."""
    made: list[FakeControlPlane] = []

    def make(**kwargs: Any) -> FakeControlPlane:
        plane = FakeControlPlane(**kwargs)
        made.append(plane)
        return plane

    yield make
    for plane in made:
        await plane.stop()


@dataclass
class AgentProcess:
    """The real agent, running as a child process."""

    process: asyncio.subprocess.Process
    log_path: Path
    home: Path

    @property
    def pid(self) -> int:
        """The agent's process id."""
        return self.process.pid

    def log(self) -> str:
        """What the agent wrote to stderr so far."""
        return self.log_path.read_text(errors="replace")

    async def wait(self, timeout: float = 10.0) -> int:
        """Its exit code, once it has exited."""
        return await asyncio.wait_for(self.process.wait(), timeout)

    async def stop(self) -> int:
        """SIGTERM, then the exit code."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await self.wait()

    def kill(self) -> None:
        """Make sure it is gone."""
        if self.process.returncode is None:
            self.process.kill()


def agent_env(home: Path, access_url: str, token: str = TOKEN, **extra: str) -> dict[str, str]:
    """The environment a backend gives the agent."""
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "STOCKADE_ACCESS_URL": access_url,
        "STOCKADE_AGENT_TOKEN": token,
        **extra,
    }


@dataclass(frozen=True)
class PrivateCA:
    """A private CA (as a site with an internal PKI has) and a server
    certificate for 127.0.0.1 that it signed."""

    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        """TLS context for the stand-in control plane."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context


@pytest.fixture(scope="session")
def private_ca(tmp_path_factory: pytest.TempPathFactory) -> PrivateCA:
    """Make the CA and the certificate with the openssl CLI."""
    require("openssl", shutil.which("openssl") is not None, "apt-get install openssl")
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Stockade test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text(
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
    )
    openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    )
    return PrivateCA(d / "ca.pem", d / "server.pem", d / "server.key")


@pytest.fixture(scope="session")
def bundle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent bundle, built once."""
    path = tmp_path_factory.mktemp("bundle") / "agent.pyz"
    build_bundle(path)
    return path


def bundle_sha256(path: Path) -> str:
    """sha256 of a file, hex."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def system_python() -> str:
    """The workspace-like interpreter: the system python3 when there is one."""
    return SYSTEM_PYTHON if os.path.exists(SYSTEM_PYTHON) else (shutil.which("python3") or "")


@pytest.fixture
async def run_agent(tmp_path: Path, bundle_file: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start real agents: ``await run_agent(plane, how="module"|"bundle")``."""
    started: list[AgentProcess] = []

    async def start(
        plane: FakeControlPlane,
        how: str = "module",
        token: str = TOKEN,
        access_url: str = "",
        **extra: str,
    ) -> AgentProcess:
        home = tmp_path / f"home{len(started)}"
        env = agent_env(home, access_url or plane.url, token, **extra)
        if how == "module":
            argv = [sys.executable, "-m", "stockade.agent"]
        else:
            python = system_python()
            require("python3", bool(python), "apt-get install python3")
            argv = [python, "-I", str(bundle_file)]
        log_path = tmp_path / f"agent{len(started)}.log"
        with log_path.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=env,
                cwd=str(tmp_path),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
            )
        agent = AgentProcess(process, log_path, home)
        started.append(agent)
        return agent

    yield start
    for agent in started:
        agent.kill()
        if agent.process.returncode is None:
            await agent.process.wait()
        assert TOKEN not in agent.log(), "the agent logged its token"
