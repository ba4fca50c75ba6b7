"""The app proxy's mechanics: HTTP/1.1 (``h11``) and WebSocket (``wsproto``)
spoken to an app inside a workspace over one tunnel stream, relayed to the
browser's ASGI connection.

Bodies stream both ways with no buffering beyond one chunk: each ASGI send
and each stream send is awaited before the next read, so a slow browser
slows the app down through the tunnel's TCP windows (the tunnel's contract,
:mod:`stockade.tunnel.protocol`).

Opening a stream costs a control message, the agent's dial-back and its
connection to the app (milliseconds), so HTTP streams are kept alive and
reused, as any reverse proxy keeps its upstream connections
(:class:`StreamPool`); a WebSocket has its stream to itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import h11
from starlette.types import Message, Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError as WSLocalProtocolError

from stockade.server.agents.service import PendingStream
from stockade.tunnel.protocol import CHUNK_BYTES, CLOSE_NORMAL, control_type

# Headers that describe one hop, never forwarded either way (RFC 9110 7.6.1).
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# The largest WebSocket message relayed whole (browsers' own limits are similar).
MAX_WS_MESSAGE_BYTES = 64 * 1024 * 1024
MAX_RESPONSE_HEAD_BYTES = 64 * 1024


class AppUnreachable(Exception):
    """The app closed the stream or spoke something that is not HTTP before
    a response began: the browser gets a 502 with this message."""


class ClientGone(Exception):
    """The browser went away mid-exchange."""


@dataclass
class Counters:
    """Bytes of one app session, each way (the connection record's figures)."""

    to_workspace: int = 0
    from_workspace: int = 0


class AgentStream:
    """A byte stream to a port inside the workspace: the agent's dial-back
    WebSocket (binary messages are bytes, ``{"type": "eof"}`` a half-close)."""

    def __init__(self, websocket: WebSocket, pending: PendingStream, counters: Counters) -> None:
        self._ws = websocket
        self._pending = pending
        self.counters = counters
        self._eof = False

    async def send(self, data: bytes) -> None:
        """Send bytes to the app (in tunnel-sized messages)."""
        for start in range(0, len(data), CHUNK_BYTES):
            chunk = data[start : start + CHUNK_BYTES]
            self.counters.to_workspace += len(chunk)
            await self._ws.send({"type": "websocket.send", "bytes": chunk})

    async def receive(self) -> bytes:
        """The next bytes from the app; b"" once it sent no more (EOF or close)."""
        while not self._eof:
            message = await self._ws.receive()
            if message["type"] == "websocket.disconnect":
                self._eof = True
                break
            data = message.get("bytes")
            if data:
                self.counters.from_workspace += len(data)
                return bytes(data)
            text = message.get("text")
            if text is not None and control_type(text) == "eof":
                self._eof = True
        return b""

    async def close(self) -> None:
        """Close the stream; the agent's dial-back endpoint returns."""
        try:
            if self._ws.application_state != WebSocketState.DISCONNECTED:
                with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
                    await self._ws.close(code=CLOSE_NORMAL)
        finally:
            self._pending.finished.set()


def forwardable(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` without the hop-by-hop ones (and those ``Connection`` names)."""
    named = {
        token.strip().lower()
        for name, value in headers
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    return [(n, v) for n, v in headers if n.lower() not in HOP_BY_HOP and n.lower() not in named]


def _without_cookies(
    headers: list[tuple[bytes, bytes]], blocked: frozenset[str]
) -> list[tuple[bytes, bytes]]:
    """Response headers minus Set-Cookie of the ``blocked`` names: an app
    must not plant a Stockade cookie (a session fixation on path apps)."""
    if not blocked:
        return headers
    return [
        (n, v)
        for n, v in headers
        if n.lower() != b"set-cookie"
        or v.decode("latin-1").partition("=")[0].strip() not in blocked
    ]


async def _drain_request(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            return


async def proxy_http(
    scope: Scope,
    receive: Receive,
    send: Send,
    stream: AgentStream,
    target: bytes,
    headers: list[tuple[bytes, bytes]],
    *,
    conn: h11.Connection | None = None,
    blocked_cookies: frozenset[str] = frozenset(),
    on_response: Callable[[int], None] | None = None,
) -> bool:
    """One HTTP exchange: the browser's request (method from ``scope``, path
    ``target``, ``headers`` already cleaned) to the app over ``stream`` (whose
    HTTP state is ``conn``), and the app's response back, both bodies streamed.
    Returns whether the stream may carry another exchange (keep-alive).

    Raises :class:`AppUnreachable` when no response began (the caller
    answers 502); after the response began an error just ends the exchange
    (the browser sees a truncated body, as from any proxy)."""
    method = str(scope["method"]).encode()
    incoming = [(n.lower(), v) for n, v in headers]
    has_length = any(n == b"content-length" for n, _ in incoming)
    chunked = any(n == b"transfer-encoding" for n, _ in incoming)
    outgoing = forwardable(incoming)
    if chunked:
        # The body arrives de-chunked and is chunked again; a Content-Length
        # next to Transfer-Encoding is not to be trusted (RFC 9112 6.3).
        outgoing = [(n, v) for n, v in outgoing if n != b"content-length"]
        outgoing.append((b"transfer-encoding", b"chunked"))
    has_body = has_length or chunked
    conn = conn or new_http_connection()
    try:
        head = conn.send(h11.Request(method=method, target=target, headers=outgoing))
    except h11.LocalProtocolError as exc:
        raise AppUnreachable(f"the request cannot be forwarded: {exc}") from None
    await stream.send(head or b"")

    async def send_body() -> None:
        if not has_body:
            await stream.send(conn.send(h11.EndOfMessage()) or b"")
            await _drain_request(receive)
            return
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone()
            body = message.get("body", b"")
            if body:
                await stream.send(conn.send(h11.Data(data=body)) or b"")
            if not message.get("more_body"):
                break
        await stream.send(conn.send(h11.EndOfMessage()) or b"")

    body_task = asyncio.ensure_future(send_body())
    started = False
    try:
        while True:
            if body_task.done() and body_task.exception() is not None:
                error = body_task.exception()
                if isinstance(error, ClientGone):
                    return False
                # The app stopped reading (it may still answer): keep reading.
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if started:
                    raise ClientGone() from None
                raise AppUnreachable(f"the app did not answer with HTTP/1.x: {exc}") from None
            if event is h11.NEED_DATA:
                data = await _receive_or_body_failure(stream, body_task)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue: the body is already on its way
            if isinstance(event, h11.Response):
                started = True
                if on_response is not None:
                    on_response(event.status_code)
                await send(
                    {
                        "type": "http.response.start",
                        "status": event.status_code,
                        "headers": _without_cookies(
                            forwardable(list(event.headers)), blocked_cookies
                        ),
                    }
                )
            elif isinstance(event, h11.Data):
                await send(
                    {"type": "http.response.body", "body": bytes(event.data), "more_body": True}
                )
            elif isinstance(event, h11.EndOfMessage):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if not body_task.done():
                    return False  # the app answered before reading all of the body
                return (
                    body_task.exception() is None
                    and conn.our_state is h11.DONE
                    and conn.their_state is h11.DONE
                )
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                if not started:
                    raise AppUnreachable("the app closed the connection without an answer")
                raise ClientGone()
    finally:
        if not body_task.done():
            body_task.cancel()
        with contextlib.suppress(BaseException):
            await body_task


def new_http_connection() -> h11.Connection:
    """The client side of HTTP/1.1 on a new stream to an app."""
    return h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD_BYTES)


@dataclass(eq=False)
class Lease:
    """A stream to an app with its HTTP state, lent for one exchange."""

    key: tuple[str, str, int]  # agent id, host, port
    stream: AgentStream
    conn: h11.Connection
    reused: bool = False
    watcher: asyncio.Task[None] | None = None
    dead: bool = False  # its watcher saw it end (and closes it)


class StreamPool:
    """Idle HTTP streams to apps, by agent and target, for reuse.

    While idle, a stream is watched: anything arriving (the app closing its
    keep-alive connection, the agent going away) or ``idle_seconds`` of
    silence closes it, so a stream handed out is one that was open a moment
    ago. The app may still close it just then; callers retry a request that
    had no body once on a new stream."""

    def __init__(self, *, max_idle_per_target: int = 16, idle_seconds: float = 15.0) -> None:
        self.max_idle = max_idle_per_target
        self.idle_seconds = idle_seconds
        self._idle: dict[tuple[str, str, int], list[Lease]] = {}

    async def acquire(
        self,
        key: tuple[str, str, int],
        dial: Callable[[], Awaitable[AgentStream]],
        *,
        fresh: bool = False,
    ) -> Lease:
        """An idle stream for ``key``, else (or when ``fresh``) a new one from ``dial``."""
        idle = None if fresh else self._idle.get(key)
        while idle:
            lease = idle.pop()
            watcher, lease.watcher = lease.watcher, None
            if watcher is None or watcher.done() or lease.dead:
                continue  # the watcher closes it
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            if watcher.cancelled() and not lease.dead:
                lease.reused = True
                return lease
        return Lease(key, await dial(), new_http_connection())

    def release(self, lease: Lease) -> bool:
        """Keep a stream whose exchange ended cleanly; False when the pool
        is full (the caller closes it)."""
        idle = self._idle.setdefault(lease.key, [])
        if len(idle) >= self.max_idle:
            return False
        lease.conn.start_next_cycle()
        lease.watcher = asyncio.ensure_future(self._watch(lease))
        idle.append(lease)
        return True

    async def _watch(self, lease: Lease) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(lease.stream.receive(), self.idle_seconds)
        # Not cancelled: the stream ended, spoke out of turn, or idled out.
        lease.dead = True
        idle = self._idle.get(lease.key)
        if idle is not None and lease in idle:
            idle.remove(lease)
            if not idle:
                del self._idle[lease.key]
        await lease.stream.close()

    async def close(self) -> None:
        """Close every idle stream."""
        leases = [lease for idle in self._idle.values() for lease in idle]
        self._idle.clear()
        for lease in leases:
            if lease.watcher is not None:
                lease.watcher.cancel()
            await lease.stream.close()


async def _receive_or_body_failure(stream: AgentStream, body_task: asyncio.Future[None]) -> bytes:
    """The app's next bytes; a browser that disconnected mid-upload ends the
    wait (nothing more will come that the browser could receive)."""
    receiving = asyncio.ensure_future(stream.receive())
    waited: set[asyncio.Future[Any]] = {receiving, body_task}
    done, _ = await asyncio.wait(waited, return_when=asyncio.FIRST_COMPLETED)
    if receiving in done:
        return receiving.result()
    error = body_task.exception()
    if isinstance(error, ClientGone):
        receiving.cancel()
        with contextlib.suppress(BaseException):
            await receiving
        raise ClientGone()
    return await receiving


# --- WebSockets -----------------------------------------------------------------------


@dataclass
class Upgrade:
    """What the app answered to a WebSocket upgrade."""

    accepted: bool
    subprotocol: str | None = None
    status: int = 0
    leftover: list[Event] | None = None


async def open_websocket(
    stream: AgentStream,
    ws: WSConnection,
    *,
    host: str,
    target: str,
    subprotocols: list[str],
    headers: list[tuple[bytes, bytes]],
) -> Upgrade:
    """Send the upgrade request to the app and read its answer."""
    await stream.send(
        ws.send(Request(host=host, target=target, subprotocols=subprotocols, extra_headers=headers))
    )
    while True:
        data = await stream.receive()
        if not data:
            raise AppUnreachable("the app closed the connection during the WebSocket upgrade")
        ws.receive_data(data)
        events = list(ws.events())
        for index, event in enumerate(events):
            if isinstance(event, AcceptConnection):
                return Upgrade(True, event.subprotocol, 101, events[index + 1 :])
            if isinstance(event, RejectConnection):
                return Upgrade(False, status=event.status_code)
            if isinstance(event, RejectData):
                continue


async def relay_websocket(
    receive: Receive, send: Send, stream: AgentStream, ws: WSConnection, upgrade: Upgrade
) -> None:
    """Relay messages between the browser's (accepted) WebSocket and the app's."""
    closed_by_app = asyncio.Event()

    async def browser_to_app() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.receive":
                if message.get("bytes") is not None:
                    await stream.send(ws.send(BytesMessage(data=message["bytes"])))
                elif message.get("text") is not None:
                    await stream.send(ws.send(TextMessage(data=message["text"])))
            elif message["type"] == "websocket.disconnect":
                if not closed_by_app.is_set():
                    code = int(message.get("code") or CLOSE_NORMAL)
                    with contextlib.suppress(WSLocalProtocolError):
                        await stream.send(ws.send(CloseConnection(code=_sendable(code))))
                return

    async def app_to_browser() -> None:
        text: list[str] = []
        binary = bytearray()
        pending = list(upgrade.leftover or [])
        while True:
            for event in pending:
                if isinstance(event, TextMessage):
                    text.append(event.data)
                    if event.message_finished:
                        await send({"type": "websocket.send", "text": "".join(text)})
                        text = []
                elif isinstance(event, BytesMessage):
                    binary.extend(event.data)
                    if len(binary) > MAX_WS_MESSAGE_BYTES:
                        await _close_both(send, stream, ws, 1009)
                        return
                    if event.message_finished:
                        await send({"type": "websocket.send", "bytes": bytes(binary)})
                        binary = bytearray()
                elif isinstance(event, Ping):
                    await stream.send(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    closed_by_app.set()
                    with contextlib.suppress(WSLocalProtocolError):
                        await stream.send(ws.send(event.response()))
                    await _send_close(send, event.code)
                    return
            data = await stream.receive()
            if not data:
                closed_by_app.set()
                await _send_close(send, 1011)
                return
            ws.receive_data(data)
            pending = list(ws.events())

    tasks = {asyncio.ensure_future(browser_to_app()), asyncio.ensure_future(app_to_browser())}
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            error = task.exception()
            if error is not None and not isinstance(
                error, WebSocketDisconnect | OSError | RuntimeError | ClientGone
            ):
                raise error
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _sendable(code: int) -> int:
    """A close code that may be sent on the wire (1005/1006/1015 may not)."""
    return CLOSE_NORMAL if code in (1005, 1006, 1015) or not 1000 <= code <= 4999 else code


async def _send_close(send: Send, code: int) -> None:
    message: Message = {"type": "websocket.close", "code": _sendable(code)}
    with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect):
        await send(message)


async def _close_both(send: Send, stream: AgentStream, ws: WSConnection, code: int) -> None:
    with contextlib.suppress(WSLocalProtocolError):
        await stream.send(ws.send(CloseConnection(code=code)))
    await _send_close(send, code)


def new_client_websocket() -> WSConnection:
    """A wsproto client connection (no extensions: bytes go as they are)."""
    return WSConnection(ConnectionType.CLIENT)
