"""Sliding-window counters for login attempts.

Kept in process memory: each replica enforces its own window. That bounds
guessing per replica, which is what the limit is for; it is not an accounting
record (the audit log is).
"""

from __future__ import annotations

import math
import time
from collections import deque


def account_key(user_id: str) -> str:
    """The budget of password guesses against one account, shared by login and
    by the old-password check of a password change."""
    return f"user:{user_id}"


class SlidingWindow:
    """At most ``limit`` events per ``window`` seconds for each key."""

    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._events: dict[str, deque[float]] = {}

    def _prune(self, key: str, now: float) -> deque[float]:
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= self.max_keys:
                self._evict(now)
            events = self._events[key] = deque()
        while events and events[0] <= now - self.window:
            events.popleft()
        return events

    def _evict(self, now: float) -> None:
        stale = [k for k, ev in self._events.items() if not ev or ev[-1] <= now - self.window]
        for key in stale:
            del self._events[key]
        if len(self._events) >= self.max_keys:  # all busy: forget the oldest half
            for key in list(self._events)[: self.max_keys // 2]:
                del self._events[key]

    def retry_after(self, key: str, now: float | None = None) -> int:
        """Seconds until one more event is allowed (0: allowed now)."""
        now = time.monotonic() if now is None else now
        events = self._prune(key, now)
        if len(events) < self.limit:
            return 0
        return max(1, math.ceil(events[0] + self.window - now))

    def hit(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self._prune(key, now).append(now)

    def reset(self, key: str) -> None:
        self._events.pop(key, None)
