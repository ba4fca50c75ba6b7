"""Reconnecting PTYs: the web terminal's back end (stream kind ``pty``).

A client opens a ``pty`` stream naming a terminal by an id it chooses (a
UUID, say; 1 to 64 letters, digits, ``-``, ``_`` or ``.``). A new id starts
the user's login shell in a new PTY (``TERM=xterm-256color``, in the home,
with the environment the agent gives its scripts); an id the agent already
knows re-attaches to that shell. While no client is attached the shell keeps
running and its output keeps going into a ring buffer (the last
:data:`RING_BYTES`); on every attach that recent output is replayed first,
then live output follows, with no byte lost or repeated in between.

On the stream (see :mod:`stockade.tunnel.protocol`):

- binary messages from the client are the terminal's input, binary messages
  to the client its output;
- text messages from the client are JSON control messages:
  ``{"type": "resize", "rows": R, "cols": C}`` (1-1000 each) sets the window
  size (the shell gets SIGWINCH); the size may also come with the open
  (``rows``/``cols`` in the stream's query). Other types are ignored, so
  clients may send more in future; a malformed resize closes the stream with
  4400 (the shell keeps running).

One client at a time: a second attach to the same id takes the terminal
over and the first client's stream is closed with
:data:`CLOSE_PTY_TAKEN_OVER` and a reason, so a browser tab that lost the
terminal to another knows not to reconnect by itself. (Several viewers of one
terminal would need a size policy and interleaved input; the web terminal
does not need it.)

When the shell exits, the attached stream closes with 1000 and the id is
forgotten (the next open of it starts a new shell). A detached terminal is
killed after :data:`IDLE_ENV` seconds (default one hour). At most
:data:`MAX_ENV` terminals (default 32) live at once; one more is refused with
4429.

Standard library only, Python 3.9+.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
from collections.abc import Awaitable
from typing import Any, Callable

from stockade.agent.streams import StreamRefused, StreamRequest, StreamStats
from stockade.agent.terminals import (
    login_environment,
    login_shell,
    set_window_size,
    signal_group,
    spawn_on_pty,
)
from stockade.agent.wsclient import ConnectionClosed, WebSocketClient
from stockade.tunnel.protocol import (
    CLOSE_BAD_REQUEST,
    CLOSE_NORMAL,
    CLOSE_PTY_TAKEN_OVER,
    CLOSE_TARGET_REFUSED,
    CLOSE_TOO_MANY,
    control_type,
)

log = logging.getLogger("stockade.agent")

RING_BYTES = 64 * 1024
READ_BYTES = 64 * 1024
MAX_ID_LENGTH = 64
ID_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
MAX_DIMENSION = 1000
DEFAULT_ROWS = 24
DEFAULT_COLS = 80
TERM = "xterm-256color"

IDLE_ENV = "STOCKADE_AGENT_PTY_IDLE_SECONDS"
MAX_ENV = "STOCKADE_AGENT_MAX_PTYS"
DEFAULT_IDLE_SECONDS = 3600.0
DEFAULT_MAX_PTYS = 32
# After the shell exits, output still in the PTY is read for at most this
# long (a background job may hold the terminal open forever).
DRAIN_SECONDS = 1.0
# SIGHUP first; SIGKILL for what is left after this long.
HANGUP_GRACE_SECONDS = 2.0


def valid_pty_id(value: object) -> bool:
    """Whether ``value`` may name a terminal."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and all(c in ID_CHARACTERS for c in value)
    )


def parse_size(rows: object, cols: object) -> tuple[int, int] | None:
    """(rows, cols) when both are integers from 1 to 1000, else None."""
    if isinstance(rows, bool) or isinstance(cols, bool):
        return None
    if not isinstance(rows, int) or not isinstance(cols, int):
        return None
    if not (1 <= rows <= MAX_DIMENSION and 1 <= cols <= MAX_DIMENSION):
        return None
    return rows, cols


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        log.warning("%s=%r is not a number: using %g", name, raw, default)
        return default
    if value <= 0:
        log.warning("%s must be positive: using %g", name, default)
        return default
    return value


class _BadControl(Exception):
    """A control message from the client that cannot be honoured."""


class ReconnectingPty:
    """One terminal: a shell on a PTY, its recent output, and at most one
    attached client."""

    def __init__(
        self,
        pty_id: str,
        master: int,
        process: asyncio.subprocess.Process,
        stats: StreamStats,
    ) -> None:
        self.id = pty_id
        self._master = master
        self._process = process
        self._stats = stats
        self._ring = bytearray()
        self._client: WebSocketClient | None = None
        # Held while output is appended to the ring and sent to the client,
        # and while an attach replays the ring: so the replay and the live
        # output meet with no byte lost or repeated.
        self._output_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = self._loop.create_future()
        self._reader = asyncio.ensure_future(self._read_loop())
        self._watcher = asyncio.ensure_future(self._watch())

    @property
    def pid(self) -> int:
        """The shell's process id (it leads the terminal's process group)."""
        return self._process.pid

    @property
    def attached(self) -> bool:
        """Whether a client is attached."""
        return self._client is not None

    # -- output ----------------------------------------------------------------

    async def _readable(self) -> None:
        ready = self._loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        self._loop.add_reader(self._master, wake)
        try:
            await ready
        finally:
            self._loop.remove_reader(self._master)

    async def _read_loop(self) -> None:
        """Read the PTY until its last writer is gone (EIO on Linux)."""
        while True:
            await self._readable()
            try:
                data = os.read(self._master, READ_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                if exc.errno != errno.EIO:
                    log.info("pty %s: read failed: %s", self.id, exc)
                return
            if not data:
                return
            async with self._output_lock:
                self._ring += data
                if len(self._ring) > RING_BYTES:
                    del self._ring[: len(self._ring) - RING_BYTES]
                client = self._client
                if client is not None:
                    try:
                        # Awaited: a slow client slows the shell, not our memory.
                        await client.send_bytes(data)
                        self._stats.bytes_out += len(data)
                    except ConnectionClosed:
                        if self._client is client:
                            self._client = None

    async def _watch(self) -> None:
        """When the shell exits: read what it left, then end."""
        try:
            code = await self._process.wait()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._reader), DRAIN_SECONDS)
        finally:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
            with contextlib.suppress(OSError):
                os.close(self._master)
        if not self.exited.done():
            self.exited.set_result(code)

    # -- attaching -------------------------------------------------------------

    async def attach(self, ws: WebSocketClient) -> None:
        """Serve one client until it leaves, another takes over, or the shell
        exits (then the stream closes with 1000)."""
        previous = self._client
        self._client = None
        if previous is not None:
            await previous.close(CLOSE_PTY_TAKEN_OVER, "another client attached to this terminal")
        async with self._output_lock:
            replay = bytes(self._ring)
            if replay:
                await ws.send_bytes(replay)
                self._stats.bytes_out += len(replay)
            self._client = ws
        inputs = asyncio.ensure_future(self._input_loop(ws))
        try:
            waiting: set[asyncio.Future[Any]] = {inputs, self.exited}
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if self.exited.done() and not ws.closed:
                await ws.close(CLOSE_NORMAL, f"the shell exited with status {self.exited.result()}")
            elif inputs.done() and not inputs.cancelled():
                error = inputs.exception()
                if isinstance(error, _BadControl):
                    await ws.close(CLOSE_BAD_REQUEST, str(error))
                elif error is not None and not isinstance(error, ConnectionClosed):
                    raise error
        finally:
            inputs.cancel()
            with contextlib.suppress(BaseException):
                await inputs
            if self._client is ws:
                self._client = None
            if not ws.closed:
                await ws.close(CLOSE_NORMAL)

    async def _input_loop(self, ws: WebSocketClient) -> None:
        while True:
            message = await ws.recv_any()
            if self._client is not ws:
                return  # taken over
            if isinstance(message, bytes):
                self._stats.bytes_in += len(message)
                await self._write(message)
            else:
                self._control(message)

    def _control(self, text: str) -> None:
        if control_type(text) != "resize":
            return
        message = json.loads(text)
        size = parse_size(message.get("rows"), message.get("cols"))
        if size is None:
            raise _BadControl("a resize needs rows and cols, integers from 1 to 1000")
        self.resize(*size)

    def resize(self, rows: int, cols: int) -> None:
        """Set the window size; the foreground job gets SIGWINCH."""
        with contextlib.suppress(OSError):
            set_window_size(self._master, rows, cols)

    async def _write(self, data: bytes) -> None:
        """Write input to the PTY without blocking the agent when the
        terminal's input queue is full."""
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._master, view)
            except BlockingIOError:
                written = 0
            except OSError:
                return  # the shell is gone; the watcher ends the stream
            view = view[written:]
            if view:
                ready = self._loop.create_future()
                self._loop.add_writer(self._master, ready.set_result, None)
                try:
                    await ready
                finally:
                    self._loop.remove_writer(self._master)

    # -- ending ----------------------------------------------------------------

    async def kill(self) -> None:
        """Hang up the terminal's process group (SIGKILL after a grace period)."""
        if self._process.returncode is None:
            for sig in (signal.SIGHUP, signal.SIGCONT):
                signal_group(self._process.pid, sig)
            try:
                await asyncio.wait_for(self._process.wait(), HANGUP_GRACE_SECONDS)
            except asyncio.TimeoutError:
                signal_group(self._process.pid, signal.SIGKILL)
                await self._process.wait()
        with contextlib.suppress(BaseException):
            await self._watcher


class PtyManager:
    """The agent's terminals, by id. :meth:`serve` is the ``pty`` stream handler."""

    def __init__(
        self,
        environment: Callable[[], dict[str, str]],
        cwd: Callable[[], str],
        stats: StreamStats,
        *,
        idle_seconds: float | None = None,
        max_ptys: int | None = None,
    ) -> None:
        self._environment = environment
        self._cwd = cwd
        self._stats = stats
        self.idle_seconds = idle_seconds or _env_number(IDLE_ENV, DEFAULT_IDLE_SECONDS)
        self.max_ptys = max_ptys or int(_env_number(MAX_ENV, DEFAULT_MAX_PTYS))
        self._ptys: dict[str, ReconnectingPty] = {}
        self._starting: dict[str, asyncio.Future[ReconnectingPty]] = {}
        self._idle_timers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    def __len__(self) -> int:
        return len(self._ptys)

    async def serve(self, request: StreamRequest) -> None:
        """The ``pty`` stream handler: find or start the terminal, then attach."""
        pty_id = request.message.get("pty_id")
        if not isinstance(pty_id, str) or not valid_pty_id(pty_id):
            raise StreamRefused(
                CLOSE_BAD_REQUEST,
                f"a pty stream needs an id of 1 to {MAX_ID_LENGTH} "
                "letters, digits, '-', '_' or '.'",
            )
        size: tuple[int, int] | None = None
        if "rows" in request.message or "cols" in request.message:
            size = parse_size(request.message.get("rows"), request.message.get("cols"))
            if size is None:
                raise StreamRefused(CLOSE_BAD_REQUEST, "rows and cols are integers from 1 to 1000")
        pty = await self._get_or_start(pty_id, size)
        if size is not None:
            pty.resize(*size)
        self._cancel_idle(pty_id)
        try:
            ws = await request.dial()
            log.info("pty %s: attached (shell pid %d)", pty_id, pty.pid)
            await pty.attach(ws)
        finally:
            if self._ptys.get(pty_id) is pty and not pty.attached:
                self._arm_idle(pty)

    async def _get_or_start(self, pty_id: str, size: tuple[int, int] | None) -> ReconnectingPty:
        existing = self._ptys.get(pty_id)
        if existing is not None:
            return existing
        starting = self._starting.get(pty_id)
        if starting is not None:  # two opens of a new id at once: one shell
            return await asyncio.shield(starting)
        if len(self._ptys) + len(self._starting) >= self.max_ptys:
            raise StreamRefused(
                CLOSE_TOO_MANY,
                f"this workspace already has {self.max_ptys} terminals; close one first",
            )
        future: asyncio.Future[ReconnectingPty] = asyncio.get_running_loop().create_future()
        self._starting[pty_id] = future
        try:
            pty = await self._start(pty_id, size or (DEFAULT_ROWS, DEFAULT_COLS))
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters get it through shield
            raise
        finally:
            del self._starting[pty_id]
        future.set_result(pty)
        self._ptys[pty_id] = pty
        task = asyncio.ensure_future(self._forget_on_exit(pty))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pty

    async def _start(self, pty_id: str, size: tuple[int, int]) -> ReconnectingPty:
        shell = login_shell()
        env = login_environment(self._environment(), shell)
        env["TERM"] = TERM
        cwd = self._cwd()  # the agent's callback falls back to / itself
        argv = ["-" + os.path.basename(shell)]  # a login shell, as a terminal gets
        try:
            master, process = await spawn_on_pty(argv, shell, env, cwd, *size)
        except OSError as exc:
            raise StreamRefused(
                CLOSE_TARGET_REFUSED, f"could not start a shell ({shell}): {exc.strerror or exc}"
            ) from None
        os.set_blocking(master, False)
        log.info("pty %s: started %s (pid %d)", pty_id, shell, process.pid)
        return ReconnectingPty(pty_id, master, process, self._stats)

    async def _forget_on_exit(self, pty: ReconnectingPty) -> None:
        code = await pty.exited
        log.info("pty %s: shell exited with status %d", pty.id, code)
        if self._ptys.get(pty.id) is pty:
            del self._ptys[pty.id]
        self._cancel_idle(pty.id)

    def _arm_idle(self, pty: ReconnectingPty) -> None:
        self._cancel_idle(pty.id)

        def expire() -> None:
            self._idle_timers.pop(pty.id, None)
            if self._ptys.get(pty.id) is pty and not pty.attached:
                log.info("pty %s: detached for %gs: closing it", pty.id, self.idle_seconds)
                self._spawn(pty.kill())

        self._idle_timers[pty.id] = asyncio.get_running_loop().call_later(self.idle_seconds, expire)

    def _cancel_idle(self, pty_id: str) -> None:
        timer = self._idle_timers.pop(pty_id, None)
        if timer is not None:
            timer.cancel()

    def _spawn(self, awaitable: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Kill every terminal (agent shutdown)."""
        for timer in self._idle_timers.values():
            timer.cancel()
        self._idle_timers.clear()
        ptys = list(self._ptys.values())
        await asyncio.gather(*(pty.kill() for pty in ptys), return_exceptions=True)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = [
    "CLOSE_PTY_TAKEN_OVER",
    "PtyManager",
    "ReconnectingPty",
    "parse_size",
    "valid_pty_id",
]
