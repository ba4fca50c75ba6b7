"""Wake-ups: a build got log lines, a job was queued. Waiters also wake on a
timeout and re-read the database, which stays the source of truth. On
PostgreSQL, replicas pass their wake-ups to each other through LISTEN/NOTIFY
(:class:`PgRelay`), so a change made by one is seen by the others at once;
the timeout remains the fallback when a notification is lost.

The same channel carries small JSON messages between replicas
(:meth:`Notifier.broadcast`): a control message for an agent connected to
another replica, an agent that went away, app health."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("stockade.events")
CHANNEL = "stockade_events"
# NOTIFY payloads are limited to 8000 bytes; keys are short ("build:<uuid>").
MAX_KEY = 512
# A message's JSON, with room left for the origin in front of it.
MAX_MESSAGE = 7900
MessageHandler = Callable[[dict[str, Any]], None]


class PgRelay:
    """Carries a :class:`Notifier`'s wake-ups between replicas on one
    PostgreSQL database: ``NOTIFY stockade_events, '<origin> <key>'`` for each
    local wake-up, and a LISTEN connection that delivers the others'. A
    payload whose key starts with ``{`` is a broadcast message (JSON). Own
    messages are recognised by the origin and skipped. A lost connection is
    made again after a pause; meanwhile waiters fall back to their timeouts."""

    def __init__(self, dsn: str, notifier: Notifier) -> None:
        self.dsn = dsn
        self.notifier = notifier
        self.origin = secrets.token_hex(8)
        self.connected = False
        self._queue: asyncio.Queue[str] = asyncio.Queue(maxsize=10_000)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.notifier.relay = self._publish
        self.notifier.message_relay = self._publish_message
        self._task = asyncio.create_task(self._run(), name="stockade:pg-relay")

    async def stop(self) -> None:
        self.notifier.relay = None
        self.notifier.message_relay = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _publish(self, key: str) -> None:
        if len(key) <= MAX_KEY:
            with contextlib.suppress(asyncio.QueueFull):  # the timeouts cover a drop
                self._queue.put_nowait(key)

    def _publish_message(self, message: str) -> bool:
        if len(message) > MAX_MESSAGE:
            return False
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            return False
        return True

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, key = payload.partition(" ")
        if origin == self.origin or not key:
            return
        if key.startswith("{"):
            try:
                message = json.loads(key)
            except ValueError:
                return
            if isinstance(message, dict):
                self.notifier.deliver_message(message)
        else:
            self.notifier.deliver(key)

    async def _run(self) -> None:
        import asyncpg

        while True:
            conn = None
            try:
                conn = await asyncpg.connect(self.dsn)
                await conn.add_listener(CHANNEL, self._received)
                self.connected = True
                while True:
                    key = await self._queue.get()
                    # In order (messages to one agent keep theirs), repeats dropped.
                    keys = {key: None}
                    while not self._queue.empty() and len(keys) < 100:
                        keys[self._queue.get_nowait()] = None
                    await conn.executemany(
                        "SELECT pg_notify($1, $2)", [(CHANNEL, f"{self.origin} {k}") for k in keys]
                    )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.connected = False
                log.warning("pg_relay_lost: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(1.0)
            finally:
                self.connected = False
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()


class Notifier:
    """Keyed wake-ups: ``notify(key)`` wakes every ``wait(key)`` pending now,
    in this process and, once a relay is set (:class:`PgRelay` on
    PostgreSQL), in every other replica."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self.relay: Callable[[str], None] | None = None
        self.message_relay: Callable[[str], bool] | None = None
        self._handlers: dict[str, MessageHandler] = {}
        # Wake-ups and messages that came from other replicas (health page).
        self.received = 0
        self.messages_received = 0

    def notify(self, key: str) -> None:
        self._wake(key)
        if self.relay is not None:
            self.relay(key)

    def deliver(self, key: str) -> None:
        """A wake-up another replica sent."""
        self.received += 1
        self._wake(key)

    def on_message(self, kind: str, handler: MessageHandler) -> None:
        """Call ``handler`` with each message of ``kind`` another replica
        broadcasts (on the event loop; it must not block)."""
        self._handlers[kind] = handler

    def broadcast(self, kind: str, **fields: Any) -> bool:
        """Send a small JSON message to every other replica; False when
        there is no other (no relay: one process) or it could not be queued
        (too large, queue full). Delivery is best effort, like wake-ups."""
        if self.message_relay is None:
            return False
        return self.message_relay(json.dumps({"kind": kind, **fields}, separators=(",", ":")))

    def deliver_message(self, message: dict[str, Any]) -> None:
        """A message another replica broadcast."""
        self.messages_received += 1
        handler = self._handlers.get(str(message.get("kind")))
        if handler is not None:
            try:
                handler(message)
            except Exception:
                log.exception("message handler failed: %s", message.get("kind"))

    def _wake(self, key: str) -> None:
        for event in self._waiters.get(key, ()):
            event.set()

    async def wait(self, key: str, timeout: float) -> bool:
        """True when notified, False on timeout."""
        event = asyncio.Event()
        waiters = self._waiters[key]
        waiters.add(event)
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()
            return event.is_set()
        finally:
            waiters.discard(event)
            if not waiters:
                self._waiters.pop(key, None)


JOBS = "jobs"  # key notified when a build is queued


def build_key(build_id: str) -> str:
    return f"build:{build_id}"
