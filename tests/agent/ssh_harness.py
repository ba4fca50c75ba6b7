"""Test harness (and benchmark helper): serve :class:`WorkspaceSSHServer` on
a loopback port, in a process of its own, as the agent would serve tunnel
streams. Not part of the agent.

    python ssh_harness.py HOST_KEY_FILE [--transport socket|opaque] [--bind ADDR]

Prints ``port=N`` on stdout once it listens; stops on SIGTERM/SIGINT (the
server's close(), then exit 0). ``--transport opaque`` hands the SSH
protocol a transport that only forwards calls and tells nothing about the
socket (no ``socket``/``peername``/``sockname``), as the agent's
WebSocket-backed transport does.

Runs with nothing but ``stockade.agent.ssh`` importable (in a workspace
container: from the extracted agent bundle).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from typing import Any

from stockade.agent.ssh import WorkspaceSSHServer, ssh_available


class OpaqueTransport(asyncio.Transport):
    """Forwards to a real transport but hides everything about the socket."""

    def __init__(self, inner: asyncio.Transport) -> None:
        super().__init__()
        self._inner = inner

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._inner.write(data)

    def writelines(self, list_of_data: Any) -> None:
        self._inner.writelines(list_of_data)

    def write_eof(self) -> None:
        self._inner.write_eof()

    def can_write_eof(self) -> bool:
        return self._inner.can_write_eof()

    def close(self) -> None:
        self._inner.close()

    def abort(self) -> None:
        self._inner.abort()

    def is_closing(self) -> bool:
        return self._inner.is_closing()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    def is_reading(self) -> bool:
        return self._inner.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._inner.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._inner.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Relay(asyncio.Protocol):
    """The socket's protocol: passes every event to the SSH protocol."""

    def __init__(self, server: WorkspaceSSHServer) -> None:
        self._ssh = server.connection_protocol()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._ssh.connection_made(OpaqueTransport(transport))

    def data_received(self, data: bytes) -> None:
        self._ssh.data_received(data)

    def eof_received(self) -> bool | None:
        return self._ssh.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._ssh.connection_lost(exc)

    def pause_writing(self) -> None:
        self._ssh.pause_writing()

    def resume_writing(self) -> None:
        self._ssh.resume_writing()


async def serve(host_key: str, transport: str, bind: str) -> int:
    ok, reason = ssh_available()
    if not ok:
        print(f"error={reason}", flush=True)
        return 1
    home = os.environ.get("HOME", "/")
    base_env = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "USER")}
    base_env["STOCKADE_WORKSPACE"] = "harness"
    server = WorkspaceSSHServer(host_key, environment=lambda: dict(base_env), cwd=lambda: home)
    loop = asyncio.get_running_loop()
    factory: Any = server.connection_protocol if transport == "socket" else lambda: Relay(server)
    listener = await loop.create_server(factory, bind, 0)
    port = listener.sockets[0].getsockname()[1]
    print(f"port={port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    listener.close()
    await server.close()
    await listener.wait_closed()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("host_key_file")
    parser.add_argument("--transport", choices=("socket", "opaque"), default="socket")
    parser.add_argument("--bind", default="127.0.0.1")
    args = parser.parse_args()
    with open(args.host_key_file) as f:
        host_key = f.read()
    return asyncio.run(serve(host_key, args.transport, args.bind))


if __name__ == "__main__":
    sys.exit(main())
