"""Wake-ups: a build got log lines, a job was queued. Waiters also wake on a
timeout and re-read the database, which stays the source of truth. On
PostgreSQL, replicas pass their wake-ups to each other through LISTEN/NOTIFY
(:class:`PgRelay`), so a change made by one is seen by the others at once;
the timeout remains the fallback when a notification is lost."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import defaultdict
from collections.abc import Callable
from typing import Any

log = logging.getLogger("stockade.events")
CHANNEL = "stockade_events"
# NOTIFY payloads are limited to 8000 bytes; keys are short ("build:<uuid>").
MAX_KEY = 512


class PgRelay:
    """Carries a :class:`Notifier`'s wake-ups between replicas on one
    PostgreSQL database: ``NOTIFY stockade_events, '<origin> <key>'`` for each
    local wake-up, and a LISTEN connection that delivers the others'. Own
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
        self._task = asyncio.create_task(self._run(), name="stockade:pg-relay")

    async def stop(self) -> None:
        self.notifier.relay = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def _publish(self, key: str) -> None:
        if len(key) <= MAX_KEY:
            with contextlib.suppress(asyncio.QueueFull):  # the timeouts cover a drop
                self._queue.put_nowait(key)

    def _received(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        origin, _, key = payload.partition(" ")
        if origin != self.origin and key:
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
                    keys = {key}
                    while not self._queue.empty() and len(keys) < 100:
                        keys.add(self._queue.get_nowait())
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
        # Wake-ups that came from other replicas (shown on the health page).
        self.received = 0

    def notify(self, key: str) -> None:
        self._wake(key)
        if self.relay is not None:
            self.relay(key)

    def deliver(self, key: str) -> None:
        """A wake-up another replica sent."""
        self.received += 1
        self._wake(key)

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
