"""Health checks of the workspace's apps, reported to the control plane.

Each app with a ``health_check`` in its template is fetched (HTTP GET, with
the standard library's asyncio streams: the agent runs on Python 3.9+) every
``interval`` seconds. Like Coder: an app is ``initializing`` until its first
result, ``healthy`` after any answer below 400, ``unhealthy`` after
``threshold`` failures in a row (an error status, a refused connection or
no answer within the interval, at most 10 s).

The whole state goes out as one ``app_health`` message
``{type, apps: {slug: state}}`` whenever a state changes and after every
reconnect (the server keeps it only while the agent is connected).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable
from typing import Any, Callable

log = logging.getLogger("stockade.agent")

MAX_CHECK_SECONDS = 10.0
MIN_INTERVAL = 1.0
INITIALIZING = "initializing"
HEALTHY = "healthy"
UNHEALTHY = "unhealthy"

SendControl = Callable[[dict[str, Any]], Awaitable[None]]


async def check_once(url: str, timeout: float) -> bool:
    """Whether a GET of ``url`` (http only) answers with a status below 400
    within ``timeout`` seconds. The body is not read."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    host, port = parts.hostname, parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        netloc = parts.netloc.rsplit("@", 1)[-1]
        request = (
            f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nUser-Agent: stockade-agent-healthcheck"
            "\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
        writer.write(request.encode("latin-1"))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, asyncio.TimeoutError, UnicodeEncodeError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    fields = line.split(None, 2)
    if len(fields) < 2 or not fields[0].startswith(b"HTTP/") or not fields[1].isdigit():
        return False
    return int(fields[1]) < 400


class AppHealth:
    """Runs the checks of the apps in the current manifest."""

    def __init__(self, send_control: SendControl) -> None:
        self._send_control = send_control
        self._spec: list[dict[str, Any]] = []
        self._states: dict[str, str] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._dirty = asyncio.Event()
        self._sender: asyncio.Task[None] | None = None

    def configure(self, apps: object) -> None:
        """Check the apps of a (new) manifest; called after every connect,
        so the state is sent again then."""
        spec = [a for a in apps if _valid(a)] if isinstance(apps, list) else []
        if spec != self._spec:
            self._spec = spec
            for task in self._tasks:
                task.cancel()
            self._states = {str(a["slug"]): INITIALIZING for a in spec}
            self._tasks = [asyncio.ensure_future(self._check(a)) for a in spec]
        if self._sender is None or self._sender.done():
            self._sender = asyncio.ensure_future(self._send_loop())
        if self._spec:
            self._dirty.set()

    @property
    def states(self) -> dict[str, str]:
        return dict(self._states)

    async def stop(self) -> None:
        tasks = list(self._tasks)
        if self._sender is not None:
            tasks.append(self._sender)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks, self._sender = [], None

    async def _check(self, app: dict[str, Any]) -> None:
        slug = str(app["slug"])
        url = str(app["health_url"])
        interval = max(MIN_INTERVAL, float(app.get("interval") or 5))
        threshold = max(1, int(app.get("threshold") or 3))
        failures = 0
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            healthy = await check_once(url, min(interval, MAX_CHECK_SECONDS))
            if healthy:
                failures = 0
                state = HEALTHY
            else:
                failures += 1
                previous = self._states.get(slug, INITIALIZING)
                state = UNHEALTHY if failures >= threshold else previous
            if self._states.get(slug) != state:
                log.info("app %s is %s", slug, state)
                self._states[slug] = state
                self._dirty.set()
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    async def _send_loop(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                await self._send_control({"type": "app_health", "apps": dict(self._states)})
            except Exception as exc:  # not connected: configure() resends on reconnect
                log.debug("app health not sent: %s", exc)


def _valid(app: object) -> bool:
    return (
        isinstance(app, dict)
        and isinstance(app.get("slug"), str)
        and isinstance(app.get("health_url"), str)
    )
