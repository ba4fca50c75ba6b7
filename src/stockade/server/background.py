"""Periodic jobs inside the server process, with their health for
``/api/v2/debug/health``."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from stockade.server.observability import get_logger

log = get_logger("stockade.background")


@dataclass
class _Job:
    name: str
    interval: float
    run: Callable[[], Awaitable[Any]]
    task: asyncio.Task[None] | None = None
    last_run: float | None = None
    last_error: str | None = None


class Background:
    def __init__(self) -> None:
        self._jobs: dict[str, _Job] = {}

    def every(self, name: str, interval: float, run: Callable[[], Awaitable[Any]]) -> None:
        self._jobs[name] = _Job(name, interval, run)

    async def _loop(self, job: _Job) -> None:
        while True:
            try:
                await job.run()
                job.last_error = None
            except Exception as exc:  # keep the loop alive; report through health
                job.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("background_job_failed", job=job.name)
            job.last_run = time.time()
            await asyncio.sleep(job.interval)

    def start(self) -> None:
        for job in self._jobs.values():
            job.task = asyncio.create_task(self._loop(job), name=f"stockade:{job.name}")

    async def stop(self) -> None:
        tasks = [job.task for job in self._jobs.values() if job.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, dict[str, Any]]:
        return {
            job.name: {
                "alive": job.task is not None and not job.task.done(),
                "interval_seconds": job.interval,
                "last_run": job.last_run,
                "last_error": job.last_error,
            }
            for job in self._jobs.values()
        }
