"""The client end of tunnel streams (protocol: :mod:`stockade.tunnel.protocol`):
open a stream to a workspace, pipe it to stdio (``stockade ssh --stdio``, an
OpenSSH ProxyCommand) or to local TCP connections (``port-forward``)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import stat
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from stockade.sdk.tls import CaFileError, client_ssl_context
from stockade.tunnel.protocol import (
    CHUNK_BYTES,
    CLIENT_PATH,
    CLOSE_AGENT_UNAVAILABLE,
    CLOSE_FORBIDDEN,
    CLOSE_NOT_FOUND,
    CLOSE_TARGET_REFUSED,
    CLOSE_UNAUTHENTICATED,
    EOF_MESSAGE,
    KIND_PTY,
    KIND_TCP,
    MAX_MESSAGE_BYTES,
    control_type,
)

OPEN_TIMEOUT = 30.0


class TunnelError(Exception):
    """A stream could not be opened (or broke); ``code`` is the tunnel close
    code (4404, 4409, 4502...) or 0 when the server could not be reached."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


_HINTS = {
    CLOSE_UNAUTHENTICATED: "run `stockade login` again",
}


@dataclass
class StreamSpec:
    """Which workspace, and what to open in it."""

    owner: str
    name: str
    kind: str
    port: int | None = None
    # kind=pty: the terminal's id (the client chooses it, to come back to
    # it) and an optional window size.
    pty_id: str | None = None
    rows: int | None = None
    cols: int | None = None


def stream_url(base_url: str, spec: StreamSpec) -> str:
    parts = urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/") + CLIENT_PATH.format(owner=spec.owner, name=spec.name)
    query: dict[str, str] = {"kind": spec.kind}
    if spec.port is not None:
        query["port"] = str(spec.port)
    if spec.pty_id is not None:
        query["id"] = spec.pty_id
    if spec.rows is not None and spec.cols is not None:
        query["rows"], query["cols"] = str(spec.rows), str(spec.cols)
    return urlunsplit((scheme, parts.netloc, path, urlencode(query), ""))


async def open_stream(base_url: str, token: str, spec: StreamSpec) -> ClientConnection:
    """Open a stream and wait for the server to say it is open; raises
    :class:`TunnelError` with the server's reason otherwise. An https server
    is verified against the system's CAs and ``$STOCKADE_CA_FILE``."""
    url = stream_url(base_url, spec)
    context = None
    if url.startswith("wss://"):
        try:
            context = client_ssl_context()
        except CaFileError as exc:
            raise TunnelError(str(exc)) from None
    try:
        ws = await connect(
            url,
            ssl=context,
            additional_headers={"Authorization": f"Bearer {token}"},
            compression=None,  # byte streams: compression costs CPU and gains nothing
            max_size=MAX_MESSAGE_BYTES,
            open_timeout=OPEN_TIMEOUT,
            user_agent_header="stockade-cli",
            ping_interval=30,
            ping_timeout=60,
        )
    except InvalidStatus as exc:
        raise TunnelError(
            f"the server refused the stream with HTTP {exc.response.status_code}"
        ) from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise TunnelError(f"cannot reach {base_url}: {exc}") from None
    try:
        first = await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT)
    except ConnectionClosed as exc:
        raise _refusal(exc, spec) from None
    except TimeoutError:
        await ws.close()
        raise TunnelError("the server did not open the stream in time") from None
    if not isinstance(first, str) or control_type(first) != "opened":
        await ws.close()
        raise TunnelError("the server answered the stream with something unexpected")
    return ws


def _refusal(exc: ConnectionClosed, spec: StreamSpec) -> TunnelError:
    frame = exc.rcvd
    code = frame.code if frame is not None else 1006
    reason = frame.reason if frame is not None else ""
    where = f"{spec.owner}/{spec.name}"
    if code == CLOSE_NOT_FOUND:
        message = f"workspace {where} not found"
    elif code == CLOSE_FORBIDDEN:
        message = reason or f"you may not connect to workspace {where}"
    elif code in (CLOSE_AGENT_UNAVAILABLE, CLOSE_TARGET_REFUSED) or 4000 <= code < 5000:
        message = reason or f"the stream to {where} was refused (code {code})"
    else:
        message = f"the connection to the server closed before the stream opened (code {code})"
    hint = _HINTS.get(code)
    return TunnelError(f"{message}; {hint}" if hint else message, code)


# --- terminals ------------------------------------------------------------------------


async def open_pty(
    base_url: str,
    token: str,
    owner: str,
    name: str,
    pty_id: str,
    *,
    rows: int | None = None,
    cols: int | None = None,
) -> ClientConnection:
    """Attach to the workspace's terminal ``pty_id`` (a new login shell when
    the id is new; the same shell, with its recent output replayed first,
    when it is not). Binary messages are the terminal's input and output;
    send :func:`resize_message` to change its size. The stream closes with
    1000 when the shell exits and with 4410 when another client attaches
    to the same terminal."""
    return await open_stream(
        base_url, token, StreamSpec(owner, name, KIND_PTY, pty_id=pty_id, rows=rows, cols=cols)
    )


def resize_message(rows: int, cols: int) -> str:
    """The control message that sets a terminal's window size."""
    return json.dumps({"type": "resize", "rows": rows, "cols": cols})


# --- stdio ----------------------------------------------------------------------------


async def pipe_stdio(ws: ClientConnection) -> None:
    """Relay stdin/stdout and the stream until the stream closes (an OpenSSH
    ProxyCommand: ssh talks to us over pipes)."""
    loop = asyncio.get_running_loop()
    for fd in (0, 1):
        _grow_pipe(fd)
    reader = asyncio.StreamReader(limit=CHUNK_BYTES)
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(0, "rb", buffering=0, closefd=False)
    )
    transport, protocol = await loop.connect_write_pipe(
        _WritePipeProtocol,
        os.fdopen(1, "wb", buffering=0, closefd=False),
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)

    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def eof() -> None:
        with contextlib.suppress(OSError):
            writer.close()

    try:
        await relay(ws, reader.read, write, eof)
    finally:
        # drain() leaves up to the high-water mark in the transport's buffer:
        # the last output would be lost if the loop ended before it is written.
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


class _WritePipeProtocol(asyncio.streams.FlowControlMixin):
    """The stdout pipe's protocol: flow control for ``drain()``, and a close
    waiter, so that ``wait_closed()`` returns once the transport has written
    all it buffered (FlowControlMixin alone raises NotImplementedError there,
    and the loop then ended with the last output unwritten)."""

    def __init__(self) -> None:
        super().__init__()
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self._closed.done():
            self._closed.set_result(None)

    def _get_close_waiter(self, stream: asyncio.StreamWriter) -> asyncio.Future[None]:
        return self._closed


PIPE_BYTES = 1024 * 1024


def _grow_pipe(fd: int) -> None:
    """Let a pipe hold a whole stream message (64 KiB by default): a 256 KiB
    message then goes in one write and one wake-up of the reader, not four or
    more. Best effort: not a pipe, or above the user's limit, stays as it is."""
    with contextlib.suppress(OSError):
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_BYTES)


# --- relaying ---------------------------------------------------------------------------


async def relay(
    ws: ClientConnection,
    read: Callable[[int], Awaitable[bytes]],
    write: Callable[[bytes], Awaitable[None]],
    write_eof: Callable[[], Awaitable[None]],
) -> None:
    """Relay a stream and a local byte source/sink both ways until both
    directions ended (half-close travels as an eof message) or either broke."""

    async def outbound() -> None:  # local -> workspace
        while True:
            data = await read(CHUNK_BYTES)
            if not data:
                await ws.send(EOF_MESSAGE)
                return
            await ws.send(data)

    async def inbound() -> None:  # workspace -> local
        while True:
            try:
                message = await ws.recv()
            except ConnectionClosed:
                await write_eof()
                raise
            if isinstance(message, bytes):
                await write(message)
            elif control_type(message) == "eof":
                await write_eof()
                return

    tasks = [asyncio.ensure_future(outbound()), asyncio.ensure_future(inbound())]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(task.exception() is not None for task in done):
                break
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await ws.close()


# --- port forwarding --------------------------------------------------------------------


@dataclass
class Forward:
    """``--tcp LOCAL:REMOTE``: listen on LOCAL (loopback), connect to REMOTE
    inside the workspace."""

    local_port: int
    remote_port: int
    local_host: str = "127.0.0.1"


async def serve_forwards(
    base_url: str,
    token: str,
    owner: str,
    name: str,
    forwards: list[Forward],
    *,
    ready: Callable[[list[tuple[Forward, int]]], None] | None = None,
) -> None:
    """Listen for every forward and relay each accepted connection over its
    own stream, until cancelled. ``ready`` gets the bound ports."""

    def handler(forward: Forward) -> Callable[..., Awaitable[None]]:
        spec = StreamSpec(owner, name, KIND_TCP, forward.remote_port)

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                ws = await open_stream(base_url, token, spec)
            except TunnelError as exc:
                print(f"stockade: port {forward.remote_port}: {exc}", file=sys.stderr, flush=True)
                writer.close()
                return

            async def write(data: bytes) -> None:
                writer.write(data)
                await writer.drain()

            async def write_eof() -> None:
                if writer.can_write_eof() and not writer.is_closing():
                    with contextlib.suppress(OSError):
                        writer.write_eof()

            try:
                await relay(ws, reader.read, write, write_eof)
            finally:
                writer.close()

        return serve

    servers = []
    bound: list[tuple[Forward, int]] = []
    try:
        for forward in forwards:
            server = await asyncio.start_server(
                handler(forward), forward.local_host, forward.local_port, limit=CHUNK_BYTES
            )
            servers.append(server)
            bound.append((forward, server.sockets[0].getsockname()[1]))
        if ready is not None:
            ready(bound)
        await asyncio.Event().wait()
    finally:
        for server in servers:
            server.close()
