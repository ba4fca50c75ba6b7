"""In-process wake-ups: a build got log lines, a job was queued. Waiters also
wake on a timeout and re-read the database, which stays the source of truth
(so a change made by another process is seen within that timeout)."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict


class Notifier:
    """Keyed wake-ups: ``notify(key)`` wakes every ``wait(key)`` pending now."""

    def __init__(self) -> None:
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)

    def notify(self, key: str) -> None:
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
