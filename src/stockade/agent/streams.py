"""The agent's end of tunnel streams (protocol: :mod:`stockade.tunnel.protocol`).

The control plane asks for a stream with an ``open_stream`` message on the
agent's control connection; the agent opens the target inside the workspace
and dials back a WebSocket for the stream's bytes, one WebSocket per stream,
so streams never wait behind each other.

Kinds served here: ``tcp`` (a TCP connection to a port inside the
workspace) and ``ssh`` (the agent's SSH server, which never listens on the
network: its connections arrive only as streams). Other kinds register a
handler with :meth:`StreamManager.register`.

Half-close travels as a text message ``{"type": "eof"}``: a TCP peer that
shuts down its sending side (``nc -N``, an HTTP/1.0 client) keeps receiving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, Callable

from stockade.agent.wsclient import ConnectionClosed, WebSocketClient, connect, websocket_url
from stockade.tunnel.protocol import (
    AGENT_STREAM_PATH,
    CHUNK_BYTES,
    CLOSE_BAD_REQUEST,
    CLOSE_NORMAL,
    CLOSE_TARGET_REFUSED,
    CLOSE_UNSUPPORTED,
    EOF_MESSAGE,
    KIND_SSH,
    KIND_TCP,
    control_type,
    valid_port,
    valid_stream_id,
)

log = logging.getLogger("stockade.agent")

CONNECT_TIMEOUT = 10.0
# Where tcp streams connect when the request names no host: the workspace
# itself. Streams may name another host the workspace can reach (ssh -L does).
DEFAULT_HOST = "127.0.0.1"

SendControl = Callable[[dict[str, Any]], Awaitable[None]]
Handler = Callable[["StreamRequest"], Awaitable[None]]


class StreamRefused(Exception):
    """The stream's target cannot be opened; ``code`` is a tunnel close code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass
class StreamRequest:
    """One ``open_stream`` message from the control plane."""

    id: str
    kind: str
    message: dict[str, Any]
    dial: Callable[[], Awaitable[WebSocketClient]] = field(repr=False)


@dataclass
class StreamStats:
    """Counters the agent reports to the control plane."""

    open: dict[str, int] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    bytes_in: int = 0  # from clients into the workspace
    bytes_out: int = 0

    def as_message(self) -> dict[str, Any]:
        return {
            "type": "stats",
            "streams_open": dict(self.open),
            "streams_total": dict(self.total),
            "bytes_in": self.bytes_in,
            "bytes_out": self.bytes_out,
        }


class StreamManager:
    """Serves the agent's streams; one per agent process."""

    def __init__(
        self,
        access_url: str,
        token: str,
        ssl_context: ssl.SSLContext | None,
        send_control: SendControl,
    ) -> None:
        self._access_url = access_url
        self._token = token
        self._ssl = ssl_context
        self._send_control = send_control
        self._handlers: dict[str, Handler] = {KIND_TCP: self._serve_tcp}
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats = StreamStats()

    def register(self, kind: str, handler: Handler) -> None:
        """Serve streams of ``kind`` with ``handler``: it opens its target
        (raising :class:`StreamRefused` when it cannot), then calls
        ``request.dial()`` for the stream's WebSocket and serves it until the
        end. It is cancelled when the agent stops."""
        self._handlers[kind] = handler

    def open(self, message: dict[str, Any]) -> None:
        """Start serving one ``open_stream`` message (returns at once)."""
        stream_id = message.get("id")
        kind = message.get("kind")
        if not isinstance(stream_id, str) or not valid_stream_id(stream_id):
            log.warning("ignoring an open_stream without a valid id")
            return
        task = asyncio.ensure_future(self._serve(stream_id, str(kind), message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stop every stream (agent shutdown)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, stream_id: str, kind: str, message: dict[str, Any]) -> None:
        handler = self._handlers.get(kind)
        self.stats.total[kind] = self.stats.total.get(kind, 0) + 1
        self.stats.open[kind] = self.stats.open.get(kind, 0) + 1
        try:
            if handler is None:
                raise StreamRefused(CLOSE_UNSUPPORTED, f"this agent cannot serve {kind!r} streams")
            request = StreamRequest(stream_id, kind, message, dial=lambda: self._dial(stream_id))
            await handler(request)
        except StreamRefused as refused:
            log.info("stream %s (%s) refused: %s", stream_id[:8], kind, refused.reason)
            with contextlib.suppress(Exception):
                await self._send_control(
                    {
                        "type": "stream_error",
                        "id": stream_id,
                        "code": refused.code,
                        "reason": refused.reason,
                    }
                )
        except (ConnectionClosed, OSError, asyncio.TimeoutError) as exc:
            log.info("stream %s (%s) ended: %s", stream_id[:8], kind, exc)
        except Exception:  # one broken stream must not take the agent down
            log.exception("stream %s (%s) failed", stream_id[:8], kind)
        finally:
            self.stats.open[kind] -= 1

    async def _dial(self, stream_id: str) -> WebSocketClient:
        url = websocket_url(self._access_url, AGENT_STREAM_PATH.format(stream_id=stream_id))
        headers = [("Authorization", f"Bearer {self._token}")]
        return await connect(url, headers, self._ssl, CONNECT_TIMEOUT)

    # -- tcp -----------------------------------------------------------------

    async def _serve_tcp(self, request: StreamRequest) -> None:
        port = request.message.get("port")
        host = request.message.get("host") or DEFAULT_HOST
        if not valid_port(port) or not isinstance(host, str) or len(host) > 255:
            raise StreamRefused(CLOSE_BAD_REQUEST, "a tcp stream needs a port from 1 to 65535")
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), CONNECT_TIMEOUT
            )
        except (OSError, asyncio.TimeoutError) as exc:
            where = f"port {port}" if host == DEFAULT_HOST else f"{host}:{port}"
            detail = getattr(exc, "strerror", None) or str(exc) or "timed out"
            raise StreamRefused(
                CLOSE_TARGET_REFUSED,
                f"could not connect to {where} inside the workspace: {detail}",
            ) from None
        try:
            ws = await request.dial()
        except BaseException:
            writer.close()
            raise
        await pipe_socket(ws, reader, writer, self.stats)


async def pipe_socket(
    ws: WebSocketClient,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stats: StreamStats,
) -> None:
    """Relay a stream WebSocket and a socket both ways until both directions
    have ended (half-close included), then close both."""

    async def inbound() -> None:  # client -> workspace
        while True:
            message = await ws.recv_any()
            if isinstance(message, bytes):
                stats.bytes_in += len(message)
                writer.write(message)
                await writer.drain()
            elif _is_eof(message):
                if writer.can_write_eof():
                    writer.write_eof()
                return

    async def outbound() -> None:  # workspace -> client
        while True:
            data = await reader.read(CHUNK_BYTES)
            if not data:
                await ws.send_text(EOF_MESSAGE)
                return
            stats.bytes_out += len(data)
            await ws.send_bytes(data)

    tasks = [asyncio.ensure_future(inbound()), asyncio.ensure_future(outbound())]
    try:
        pending: set[asyncio.Future[None]] = set(tasks)
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if any(task.exception() is not None for task in done):
                break  # one side broke: the stream is over
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()
        await ws.close(CLOSE_NORMAL)


def _is_eof(message: str | bytes) -> bool:
    return isinstance(message, str) and control_type(message) == "eof"


class WebSocketTransport(asyncio.Transport):
    """An asyncio transport over a stream WebSocket, so that a protocol
    written for sockets (asyncssh's server connection) runs on a tunnel
    stream with no socket pair and no extra copy in between.

    Writes are buffered and sent by one task in messages of up to
    :data:`CHUNK_BYTES`; the protocol is paused above the high-water mark.
    Reading stops while the protocol has paused it, which stops reading the
    WebSocket and so, through TCP, the sender.
    """

    HIGH_WATER = 1024 * 1024
    LOW_WATER = 256 * 1024

    def __init__(self, ws: WebSocketClient, protocol: asyncio.Protocol, stats: StreamStats) -> None:
        super().__init__()
        self._ws = ws
        self._protocol = protocol
        self._stats = stats
        # What the protocol wrote and the write loop has not sent: its own
        # pieces, joined once per message (a single bytearray cost a copy in,
        # two copies out and a move of the rest for every message).
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._wrote = asyncio.Event()
        self._reading = asyncio.Event()
        self._reading.set()
        self._closing = False
        self._protocol_paused = False
        self._lost = False
        self._done = asyncio.get_event_loop().create_future()  # type: asyncio.Future[None]
        self._tasks = [
            asyncio.ensure_future(self._read_loop()),
            asyncio.ensure_future(self._write_loop()),
        ]

    async def run(self) -> None:
        """Attach the protocol and serve until the stream ends."""
        self._protocol.connection_made(self)
        try:
            await self._done
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._ws.close(CLOSE_NORMAL)
            self._connection_lost(None)

    # -- asyncio.Transport ------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name in ("peername", "sockname"):
            return ("127.0.0.1", 0)
        return default

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True
        self._wrote.set()  # the write loop closes once the buffer is sent

    def abort(self) -> None:
        self._closing = True
        self._chunks.clear()
        self._buffered = 0
        self._finish()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or self._lost:
            return
        self._chunks.append(bytes(data))  # no copy when it is bytes already
        self._buffered += len(data)
        self._wrote.set()
        if not self._protocol_paused and self._buffered > self.HIGH_WATER:
            self._protocol_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        self.close()

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self._reading.clear()

    def resume_reading(self) -> None:
        self._reading.set()

    def is_reading(self) -> bool:
        return self._reading.is_set()

    def get_write_buffer_size(self) -> int:
        return self._buffered

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is not None:
            self.HIGH_WATER = high
        self.LOW_WATER = low if low is not None else self.HIGH_WATER // 4

    # -- the loops ----------------------------------------------------------------

    async def _read_loop(self) -> None:
        try:
            while True:
                await self._reading.wait()
                message = await self._ws.recv_any()
                if isinstance(message, bytes):
                    self._stats.bytes_in += len(message)
                    self._protocol.data_received(message)
                elif _is_eof(message):
                    self._protocol.eof_received()
        except ConnectionClosed:
            pass
        self._finish()

    async def _write_loop(self) -> None:
        try:
            while True:
                await self._wrote.wait()
                self._wrote.clear()
                while self._chunks:
                    chunk = self._next_message()
                    self._stats.bytes_out += len(chunk)
                    await self._ws.send_bytes(chunk)
                    if self._protocol_paused and self._buffered <= self.LOW_WATER:
                        self._protocol_paused = False
                        self._protocol.resume_writing()
                if self._closing:
                    break
        except ConnectionClosed:
            pass
        self._finish()

    def _next_message(self) -> bytes:
        """Up to :data:`CHUNK_BYTES` of the buffered pieces, as one message."""
        parts: list[bytes] = []
        size = 0
        while self._chunks and size + len(self._chunks[0]) <= CHUNK_BYTES:
            piece = self._chunks.popleft()
            parts.append(piece)
            size += len(piece)
        if not parts:  # one piece larger than a message: send its head
            piece = self._chunks[0]
            parts.append(piece[:CHUNK_BYTES])
            self._chunks[0] = piece[CHUNK_BYTES:]
            size = CHUNK_BYTES
        self._buffered -= size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _finish(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _connection_lost(self, exc: Exception | None) -> None:
        if not self._lost:
            self._lost = True
            self._protocol.connection_lost(exc)


def serve_ssh_handler(server_factory: Callable[[], Any], stats: StreamStats) -> Handler:
    """The ``ssh`` stream handler: each stream is one SSH connection to the
    agent's SSH server (``server_factory()`` returns it, creating it on first
    use, or raises :class:`StreamRefused` when SSH cannot run here)."""

    async def serve(request: StreamRequest) -> None:
        server = server_factory()
        ws = await request.dial()
        transport = WebSocketTransport(ws, server.connection_protocol(), stats)
        await transport.run()

    return serve


__all__ = [
    "KIND_SSH",
    "StreamManager",
    "StreamRefused",
    "StreamRequest",
    "StreamStats",
    "WebSocketTransport",
    "pipe_socket",
    "serve_ssh_handler",
]
