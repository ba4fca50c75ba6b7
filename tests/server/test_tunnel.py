"""Tunnel streams through a real server to a real agent process: TCP ports,
the agent's SSH server with the real OpenSSH client (through `stockade
config-ssh`), refusals that say why, and the connection records.

The test plays the provisioner and starts the agent itself (as a backend's
compute would), so no backend is involved; the backends' own tests cover
the agent inside sandboxes and containers."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from stockade.sdk import Client
from stockade.sdk.tunnel import StreamSpec, TunnelError, open_stream, relay, stream_url
from tests.agents import agent_workspace
from tests.conftest import OWNER_PASSWORD, ServerFactory, require

SQLITE_ONLY = "streams are relayed beyond the database; connection records are plain inserts"

TEMPLATE = """\
name: t
backend: local
"""
STOCKADE = str(Path(sys.executable).with_name("stockade"))


@dataclass
class Env:
    url: str
    client: Client
    home: Path
    config_dir: Path
    ssh_config: Path

    def cli_env(self) -> dict[str, str]:
        return {
            **os.environ,
            "STOCKADE_URL": self.url,
            "STOCKADE_TOKEN": self.client.token or "",
            "STOCKADE_CONFIG_DIR": str(self.config_dir),
        }

    def ssh(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", *args],
            input=input,
            capture_output=True,
            env=self.cli_env(),
            timeout=60,
            check=False,
        )


def echo_server() -> tuple[int, threading.Event]:
    """A loopback TCP server that echoes (upper-casing nothing: bytes intact)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()
        listener.close()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1], stop


@pytest.fixture
def env(start_server: ServerFactory, tmp_path: Path) -> Iterator[Env]:
    server = start_server(env={"STOCKADE_PROVISIONER_WORKERS": "0"})
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    try:
        with agent_workspace(server.url, client, TEMPLATE, tmp_path / "home") as home:
            yield Env(server.url, client, home, tmp_path / "cfg", tmp_path / "ssh_config")
    finally:
        client.close()


async def _roundtrip(env: Env, port: int, payload: bytes) -> bytes:
    return await echo_through(env.url, env.client.token or "", port, payload)


async def echo_through(url: str, token: str, port: int, payload: bytes) -> bytes:
    """Send ``payload`` on a tcp stream to ``port`` in owner/w; what came back."""
    ws = await open_stream(url, token, StreamSpec("owner", "w", "tcp", port))
    received = bytearray()
    chunks = [payload[i : i + 70000] for i in range(0, len(payload), 70000)]

    async def read(_: int) -> bytes:
        return chunks.pop(0) if chunks else b""

    async def write(data: bytes) -> None:
        received.extend(data)

    async def eof() -> None:
        return None

    await relay(ws, read, write, eof)
    return bytes(received)


def test_tcp_streams_carry_bytes_intact_in_parallel(env: Env) -> None:
    port, stop = echo_server()
    try:

        async def main() -> list[bytes]:
            payloads = [os.urandom(200_000 + i) for i in range(20)]
            results = await asyncio.gather(*(_roundtrip(env, port, p) for p in payloads))
            assert results == payloads
            return results

        asyncio.run(main())
    finally:
        stop.set()
    connections = env.client.workspace_connections("owner", "w")
    assert len(connections) == 20
    assert all(c.kind == "port" and c.target == str(port) for c in connections)
    # Records are closed shortly after the streams.
    deadline = time.monotonic() + 10
    while any(c.closed_at is None for c in connections) and time.monotonic() < deadline:
        time.sleep(0.1)
        connections = env.client.workspace_connections("owner", "w")
    assert {c.bytes_to_workspace for c in connections} == {200_000 + i for i in range(20)}
    assert all(c.bytes_from_workspace == c.bytes_to_workspace for c in connections)


def test_refusals_say_why(env: Env) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    free_port = closed.getsockname()[1]
    closed.close()

    async def attempt(token: str, spec: StreamSpec) -> TunnelError:
        with pytest.raises(TunnelError) as caught:
            await open_stream(env.url, token, spec)
        return caught.value

    token = env.client.token or ""
    refused = asyncio.run(attempt(token, StreamSpec("owner", "w", "tcp", free_port)))
    assert refused.code == 4502 and f"port {free_port}" in str(refused)
    missing = asyncio.run(attempt(token, StreamSpec("owner", "nope", "tcp", 22)))
    assert missing.code == 4404 and "not found" in str(missing)
    anonymous = asyncio.run(attempt("", StreamSpec("owner", "w", "tcp", 22)))
    assert anonymous.code == 4401
    bad = asyncio.run(attempt(token, StreamSpec("owner", "w", "tcp", 0)))
    assert bad.code == 4400 and "port" in str(bad)
    odd = asyncio.run(attempt(token, StreamSpec("owner", "w", "telnet")))
    assert odd.code == 4400
    # Another member neither reaches nor learns of the workspace.
    env.client.create_user("member", "member@example.com", OWNER_PASSWORD)
    other = Client(env.url)
    other.login("member", OWNER_PASSWORD)
    hidden = asyncio.run(attempt(other.token or "", StreamSpec("owner", "w", "tcp", 22)))
    other.close()
    assert hidden.code == 4404 and str(hidden) == str(missing).replace("nope", "w")
    # Every attempt is in the audit log, refused ones included.
    entries = env.client.list_audit(action="workspace.connect").entries
    statuses = sorted(e.status_code for e in entries)
    assert 502 in statuses and 404 in statuses


def test_stream_urls_are_relative_to_the_access_url() -> None:
    url = stream_url("https://example.test/base/", StreamSpec("o", "w", "tcp", 80))
    assert url == "wss://example.test/base/api/v2/workspaces/o/w/tunnel?kind=tcp&port=80"


def test_openssh_through_config_ssh(env: Env) -> None:
    require("ssh", shutil.which("ssh") is not None, "apt-get install openssh-client")
    done = subprocess.run(
        [STOCKADE, "config-ssh", "--ssh-config-file", str(env.ssh_config)],
        env=env.cli_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = env.ssh_config.read_text()
    assert "Host stockade.*" in text and "StrictHostKeyChecking yes" in text
    known = (env.config_dir / "known_hosts").read_text()
    info = env.client.workspace_ssh("owner", "w")
    assert known == f"stockade.w {info.host_public_key}\n"
    # Idempotent: a second run leaves the file as it was.
    again = subprocess.run(
        [STOCKADE, "config-ssh", "--ssh-config-file", str(env.ssh_config)],
        env=env.cli_env(),
        capture_output=True,
        check=False,
    )
    assert again.returncode == 0 and env.ssh_config.read_text() == text

    result = env.ssh("stockade.w", "echo hello; echo err >&2; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"hello\n" and result.stderr == b"err\n"
    piped = env.ssh("stockade.w", "cat", input=b"x" * 1_000_000)
    assert piped.returncode == 0 and len(piped.stdout) == 1_000_000, (
        len(piped.stdout),
        piped.stderr,
    )
    assert piped.stdout == b"x" * 1_000_000

    # The connection was recorded as ssh, with bytes.
    ssh_rows = [c for c in env.client.workspace_connections("owner", "w") if c.kind == "ssh"]
    assert ssh_rows

    removed = subprocess.run(
        [STOCKADE, "config-ssh", "--ssh-config-file", str(env.ssh_config), "--remove"],
        env=env.cli_env(),
        capture_output=True,
        check=False,
    )
    assert removed.returncode == 0 and "STOCKADE" not in env.ssh_config.read_text()


def test_the_host_key_is_stable(env: Env) -> None:
    first = env.client.workspace_ssh("owner", "w")
    second = env.client.workspace_ssh("owner", "w")
    assert first.host_public_key == second.host_public_key
    assert first.host_public_key.startswith("ssh-ed25519 ")


def test_stockade_ssh_runs_the_words_after_a_double_dash(env: Env) -> None:
    require("ssh", shutil.which("ssh") is not None, "apt-get install openssh-client")
    done = subprocess.run(
        [STOCKADE, "ssh", "w", "--", "echo", "-n", "hello;", "exit", "4"],
        env=env.cli_env(), capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 4, done.stderr
    assert done.stdout == "hello"
