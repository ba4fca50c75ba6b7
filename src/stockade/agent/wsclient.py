"""A small WebSocket client on asyncio streams and ``wsproto`` (sans-IO).

The agent runs on Python 3.9+ inside workspace images, where the
``websockets`` package of the control plane (Python 3.11+) cannot go; this
client needs only the standard library plus ``wsproto`` and ``h11``, both pure
Python. It does what the agent needs and nothing more: text messages for the
control connection, binary data for tunnel streams (delivered as it arrives,
without waiting for a message's end), pings answered, keepalive pings sent,
close handshakes.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
import urllib.parse

from wsproto import ConnectionType, WSConnection, frame_protocol
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

READ_SIZE = 256 * 1024


def _use_c_masking() -> bool:
    """Mask outgoing frames with websockets' C ``apply_mask`` when the bundle
    carries it for this Python (30x wsproto's pure-Python masker, which cost
    a quarter of the agent's CPU on bulk streams). wsproto looks its masker
    class up by name when it serializes a frame, so replacing the class is
    enough; the replacement keeps its rotating-key semantics."""
    try:
        from stockade_speedups.speedups import apply_mask  # type: ignore[import-not-found]
    except (ImportError, OSError):
        try:  # an agent run from the source tree, next to websockets
            from websockets.speedups import apply_mask
        except (ImportError, OSError, SyntaxError):
            return False

    class CMasker(frame_protocol.XorMaskerSimple):
        def process(self, data: bytes) -> bytes:
            if not data:
                return data
            key = self._masking_key
            rotation = len(data) % 4
            self._masking_key = key[rotation:] + key[:rotation]
            return bytes(apply_mask(data, key))

    frame_protocol.XorMaskerSimple = CMasker  # type: ignore[misc]
    return True


C_MASKING = _use_c_masking()
# Largest message the agent accepts (a manifest with a long startup script).
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class WebSocketError(Exception):
    """The connection failed or broke; the caller may retry."""


class HandshakeRejected(WebSocketError):
    """The server answered the upgrade request with an HTTP status."""

    def __init__(self, status: int, body: bytes) -> None:
        super().__init__(f"the server refused the WebSocket upgrade with HTTP {status}")
        self.status = status
        self.body = body


class ConnectionClosed(WebSocketError):
    """The server closed the connection (``code`` 1006 when it just went away)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"connection closed with code {code}" + (f": {reason}" if reason else ""))
        self.code = code
        self.reason = reason


def websocket_url(base_url: str, path: str) -> str:
    """``base_url`` (http, https, ws or wss) with ``path`` appended, as ws/wss."""
    parts = urllib.parse.urlsplit(base_url)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.hostname:
        raise ValueError(f"not an http(s) or ws(s) URL: {base_url!r}")
    full_path = parts.path.rstrip("/") + path
    return urllib.parse.urlunsplit((scheme, parts.netloc, full_path, "", ""))


class WebSocketClient:
    """One open client connection. Use :func:`connect` to make one."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        ws: WSConnection,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._ws = ws
        self._text_parts: list[str] = []
        self._text_size = 0
        self._send_lock = asyncio.Lock()
        self._closed: ConnectionClosed | None = None
        # time.monotonic() of the last bytes from the server (pongs included).
        self.last_received = time.monotonic()

    @property
    def closed(self) -> bool:
        """Whether the connection has ended (either side)."""
        return self._closed is not None

    async def _write(self, data: bytes) -> None:
        if not data:
            return
        async with self._send_lock:
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (OSError, RuntimeError) as exc:
                self._abort()
                raise ConnectionClosed(1006, f"write failed: {exc}") from exc

    async def send_text(self, text: str) -> None:
        """Send one text message."""
        if self._closed is not None:
            raise self._closed
        await self._write(self._ws.send(TextMessage(data=text)))

    async def send_bytes(self, data: bytes) -> None:
        """Send one binary message (waits while the socket's buffer is full)."""
        if self._closed is not None:
            raise self._closed
        await self._write(self._ws.send(BytesMessage(data=data)))

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping; the answer arrives as any other traffic does."""
        if self._closed is not None:
            raise self._closed
        await self._write(self._ws.send(Ping(payload=payload)))

    async def recv(self) -> str:
        """The next text message; binary messages are ignored, pings answered.

        Raises :class:`ConnectionClosed` when the connection ends.
        """
        while True:
            message = await self.recv_any()
            if isinstance(message, str):
                return message

    async def recv_any(self) -> str | bytes:
        """The next text message, or the next piece of binary data as it
        arrives (a binary message may come in several pieces: a stream has no
        message boundaries). Nothing more is read from the socket until the
        caller asks again, which is the stream's backpressure.

        Raises :class:`ConnectionClosed` when the connection ends.
        """
        while True:
            if self._closed is not None:
                raise self._closed
            for event in self._ws.events():
                message = await self._handle(event)
                if message is not None:
                    return message
            if self._closed is not None:
                raise self._closed
            try:
                data = await self._reader.read(READ_SIZE)
            except OSError as exc:
                self._abort()
                raise ConnectionClosed(1006, f"read failed: {exc}") from exc
            if not data:
                self._abort()
                raise ConnectionClosed(1006, "the server went away")
            self.last_received = time.monotonic()
            self._ws.receive_data(data)

    async def _handle(self, event: object) -> str | bytes | None:
        if isinstance(event, TextMessage):
            self._text_parts.append(event.data)
            self._text_size += len(event.data)
            if self._text_size > MAX_MESSAGE_BYTES:
                await self.close(1009, "message too big")
                raise ConnectionClosed(1009, "message too big")
            if not event.message_finished:
                return None
            text = "".join(self._text_parts)
            self._text_parts = []
            self._text_size = 0
            return text
        if isinstance(event, BytesMessage):
            return bytes(event.data) if event.data else None
        if isinstance(event, Ping):
            await self._write(self._ws.send(event.response()))
            return None
        if isinstance(event, CloseConnection):
            closed = ConnectionClosed(event.code, event.reason or "")
            if self._ws.state is ConnectionState.REMOTE_CLOSING:
                with contextlib.suppress(ConnectionClosed):
                    await self._write(self._ws.send(event.response()))
            self._closed = closed
            self._abort()
            return None
        return None

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Start the close handshake (best effort) and drop the connection."""
        if self._closed is not None:
            return
        if self._ws.state is ConnectionState.OPEN:
            with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._write(self._ws.send(CloseConnection(code=code, reason=reason))), 2.0
                )
        self._closed = ConnectionClosed(code, reason)
        self._abort()

    def _abort(self) -> None:
        if self._closed is None:
            self._closed = ConnectionClosed(1006, "connection lost")
        with contextlib.suppress(OSError, RuntimeError):
            self._writer.close()


async def connect(
    url: str,
    headers: list[tuple[str, str]],
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 10.0,
) -> WebSocketClient:
    """Open a WebSocket to ``url`` (ws:// or wss://) sending ``headers``.

    Raises :class:`HandshakeRejected` when the server answers with an HTTP
    status instead of switching protocols, :class:`WebSocketError` (or
    ``OSError`` / ``asyncio.TimeoutError``) when it cannot be reached.
    """
    parts = urllib.parse.urlsplit(url)
    secure = parts.scheme == "wss"
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    context: ssl.SSLContext | None = None
    if secure:
        context = ssl_context or ssl.create_default_context()
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname=host if context else None),
        timeout,
    )
    try:
        return await asyncio.wait_for(_handshake(reader, writer, parts, headers), timeout)
    except BaseException:
        writer.close()
        raise


async def _handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    parts: urllib.parse.SplitResult,
    headers: list[tuple[str, str]],
) -> WebSocketClient:
    ws = WSConnection(ConnectionType.CLIENT)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
    writer.write(ws.send(Request(host=parts.netloc, target=target, extra_headers=extra)))
    await writer.drain()
    status = 0
    body = b""
    while True:
        data = await reader.read(READ_SIZE)
        if not data:
            if status:
                raise HandshakeRejected(status, body)
            raise WebSocketError("the server closed the connection during the handshake")
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, AcceptConnection):
                # Frames the server sent right behind its 101 are already
                # buffered inside ``ws``; they come out of the next events().
                return WebSocketClient(reader, writer, ws)
            if isinstance(event, RejectConnection):
                status = event.status_code
                if not event.has_body:
                    raise HandshakeRejected(status, b"")
            elif isinstance(event, RejectData):
                body += event.data[: 4096 - len(body)]
                if event.body_finished:
                    raise HandshakeRejected(status, body)
