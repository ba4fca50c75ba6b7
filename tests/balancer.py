"""A small TCP load balancer for replica tests, on loopback: each new
connection goes to the first backend that accepts it, in the balancer's
order (``first``: a preferred backend, the others as fail-over) or in turn
(``round_robin``). A backend that refuses is skipped, as a real balancer's
health check would skip it; bytes are copied both ways as they are."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from typing import Literal


class Balancer:
    def __init__(
        self, backends: list[int], *, mode: Literal["first", "round_robin"] = "first"
    ) -> None:
        self.backends = list(backends)  # ports on 127.0.0.1
        self.mode = mode
        self.port = 0
        # Backend port of each connection, in order (what went where).
        self.routed: list[int] = []
        self._turn = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Balancer:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", 0), self._loop
        ).result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _order(self) -> list[int]:
        backends = list(self.backends)
        if self.mode == "round_robin" and backends:
            shift = next(self._turn) % len(backends)
            backends = backends[shift:] + backends[:shift]
        return backends

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for port in self._order():
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection("127.0.0.1", port), 2
                )
            except (OSError, TimeoutError):
                continue
            self.routed.append(port)
            await asyncio.gather(
                _copy(reader, upstream_writer),
                _copy(upstream_reader, writer),
                return_exceptions=True,
            )
            return
        writer.close()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        # Either side gone: the whole connection goes, as when a replica dies.
        with contextlib.suppress(Exception):
            writer.close()
