"""The hop between replicas: how a stream's two ends meet when the client
and the agent's dial-back reached different replicas.

A stream belongs to the replica its client reached (the *asking* replica):
the stream id starts with that replica's id, and the asking replica holds
the pending stream and relays it. The agent's dial-back goes through the
load balancer and may land on any replica; one that receives a dial-back
for another replica's stream opens a WebSocket to the asking replica's
``replica_url`` at :data:`HOP_PATH`, signed with :class:`HopSigner`, and
copies messages both ways between the agent and that hop (close codes
included). The asking replica treats the hop as the agent's dial-back.

Only replicas sign hops: the key is derived from the audit key, which every
replica of a deployment shares. The signature binds the stream id, the
agent id and the time; a stream id is used once (a second dial-back for it
is refused), so a replayed hop opens nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ssl
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from stockade.server.observability import get_logger
from stockade.tunnel.protocol import (
    CLOSE_AGENT_UNAVAILABLE,
    CLOSE_NORMAL,
    MAX_MESSAGE_BYTES,
)

log = get_logger("stockade.connections.hop")

HOP_PATH = "/api/v2/replicas/streams/{stream_id}"
SIGNATURE_HEADER = "x-stockade-hop-signature"
AGENT_HEADER = "x-stockade-hop-agent"
# How far apart two replicas' clocks and a hop's signing and checking may be.
MAX_SKEW_SECONDS = 60
CONNECT_TIMEOUT_SECONDS = 5.0
_PASSED_ON = range(4000, 5000)


class HopSigner:
    """Signs and checks hop requests with a key derived from the audit key."""

    def __init__(self, audit_key: bytes) -> None:
        self._key = hmac.new(audit_key, b"stockade replica hop v1", hashlib.sha256).digest()

    def _mac(self, stream_id: str, agent_id: str, stamp: int) -> str:
        message = f"{stream_id}\n{agent_id}\n{stamp}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def sign(self, stream_id: str, agent_id: str) -> str:
        stamp = int(time.time())
        return f"{stamp}.{self._mac(stream_id, agent_id, stamp)}"

    def verify(self, stream_id: str, agent_id: str, signature: str) -> bool:
        stamp_text, _, mac = signature.partition(".")
        if not stamp_text.isdecimal() or len(stamp_text) > 12:
            return False
        stamp = int(stamp_text)
        if abs(time.time() - stamp) > MAX_SKEW_SECONDS:
            return False
        return hmac.compare_digest(mac, self._mac(stream_id, agent_id, stamp))


@dataclass
class HopCounts:
    """Hops since start, for the health API: dial-backs this replica
    forwarded to another, hops it accepted from others, and failures."""

    forwarded: int = 0
    accepted: int = 0
    refused: int = 0
    failed: int = 0
    open: int = 0


class Hops:
    """Both ends of the hop: :meth:`forward` on the replica that received
    the dial-back, :meth:`check` on the asking replica."""

    def __init__(self, audit_key: bytes, *, tls_ca_file: Path | None = None) -> None:
        self.signer = HopSigner(audit_key)
        self.tls_ca_file = tls_ca_file
        self._counts = HopCounts()

    def counts(self) -> dict[str, int]:
        return asdict(self._counts)

    def check(self, websocket: WebSocket, stream_id: str) -> str | None:
        """The agent id a hop request carries, if another replica signed it."""
        agent_id = websocket.headers.get(AGENT_HEADER, "")
        signature = websocket.headers.get(SIGNATURE_HEADER, "")
        if (
            not agent_id
            or len(agent_id) > 64
            or not self.signer.verify(stream_id, agent_id, signature)
        ):
            self._counts.refused += 1
            return None
        self._counts.accepted += 1
        return agent_id

    def _ssl(self, url: str) -> ssl.SSLContext | None:
        if not url.startswith("https://"):
            return None
        # Replicas reach each other at their own addresses (a pod IP), which
        # the deployment's certificate does not name: the chain is checked
        # (against the system's CAs and the server's own certificate), not the
        # name. The signature is what authenticates the request.
        context = ssl.create_default_context()
        if self.tls_ca_file is not None:
            context.load_verify_locations(self.tls_ca_file)
        context.check_hostname = False
        return context

    async def forward(
        self, agent: WebSocket, replica_url: str, stream_id: str, agent_id: str
    ) -> None:
        """Carry an agent's dial-back to the replica that asked for the
        stream, until either side closes."""
        url = replica_url.replace("http", "ws", 1) + HOP_PATH.format(stream_id=stream_id)
        try:
            hop = await connect(
                url,
                additional_headers={
                    AGENT_HEADER: agent_id,
                    SIGNATURE_HEADER: self.signer.sign(stream_id, agent_id),
                },
                compression=None,
                proxy=None,
                ssl=self._ssl(replica_url),
                open_timeout=CONNECT_TIMEOUT_SECONDS,
                max_size=MAX_MESSAGE_BYTES,
                user_agent_header="stockade-replica-hop",
            )
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            self._counts.failed += 1
            log.warning("hop_failed", replica_url=replica_url, error=f"{type(exc).__name__}: {exc}")
            await agent.close(code=CLOSE_AGENT_UNAVAILABLE)
            return
        self._counts.forwarded += 1
        self._counts.open += 1
        try:
            await agent.accept()
            await _pair(agent, hop)
        finally:
            self._counts.open -= 1
            await hop.close()


async def _pair(agent: WebSocket, hop: ClientConnection) -> None:
    """Copy messages both ways until one side closes; a 4xxx close code and
    its reason reach the other side."""
    close: dict[str, Any] = {"code": CLOSE_NORMAL, "reason": ""}

    async def agent_to_hop() -> None:
        while True:
            message = await agent.receive()
            if message["type"] == "websocket.disconnect":
                code = message.get("code", CLOSE_NORMAL)
                if code in _PASSED_ON:
                    close.update(code=code, reason=str(message.get("reason") or ""))
                return
            data = message.get("bytes")
            await hop.send(data if data is not None else str(message.get("text") or ""))

    async def hop_to_agent() -> None:
        try:
            async for data in hop:
                if isinstance(data, bytes):
                    await agent.send_bytes(data)
                else:
                    await agent.send_text(data)
        except ConnectionClosed:
            pass
        if hop.close_code in _PASSED_ON:
            close.update(code=hop.close_code, reason=hop.close_reason or "")

    tasks = [asyncio.ensure_future(agent_to_hop()), asyncio.ensure_future(hop_to_agent())]
    done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        error = task.exception()
        if error is not None and not isinstance(
            error, WebSocketDisconnect | ConnectionClosed | RuntimeError | OSError
        ):
            log.warning("hop_relay_failed", error=repr(error))
    with contextlib.suppress(Exception):
        await hop.close(code=close["code"], reason=close["reason"])
    if agent.application_state != WebSocketState.DISCONNECTED:
        with contextlib.suppress(RuntimeError, WebSocketDisconnect, OSError):
            await agent.close(code=close["code"], reason=close["reason"])
