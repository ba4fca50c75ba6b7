"""Running the template's scripts inside the workspace: the startup script
(output streamed line by line) and metadata commands (output captured).

Every script runs as ``/bin/sh -c SCRIPT`` in a session (process group) of its
own, so that a timeout or the agent's shutdown kills the script together with
whatever it started in the foreground. Standard library only, Python 3.9+.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, cast

from stockade.agent.terminals import reset_signals

# A line longer than this is cut into pieces of this size.
MAX_LINE_BYTES = 16 * 1024
READ_SIZE = 65536
# How much of a metadata command's output is kept.
MAX_CAPTURE_BYTES = 64 * 1024


def kill_group(process: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to the process group the script leads (it is a session
    leader), falling back to the process alone."""
    if process.returncode is not None:
        return
    try:
        os.killpg(process.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)


class LineSplitter:
    """Turns chunks of bytes into text lines (without their line ending);
    lines longer than :data:`MAX_LINE_BYTES` are split."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, data: bytes) -> list[str]:
        """The complete lines ``data`` finishes."""
        buffer = self._partial + data
        pieces = buffer.split(b"\n")
        self._partial = pieces.pop()
        lines: list[bytes] = []
        for piece in pieces:
            lines.extend(_cut(piece))
        while len(self._partial) > MAX_LINE_BYTES:
            lines.append(self._partial[:MAX_LINE_BYTES])
            self._partial = self._partial[MAX_LINE_BYTES:]
        return [_decode(line) for line in lines]

    def finish(self) -> list[str]:
        """The last line, when the output did not end with a newline."""
        partial, self._partial = self._partial, b""
        return [_decode(partial)] if partial else []


def _cut(line: bytes) -> list[bytes]:
    if len(line) <= MAX_LINE_BYTES:
        return [line]
    return [line[i : i + MAX_LINE_BYTES] for i in range(0, len(line), MAX_LINE_BYTES)]


def _decode(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", errors="replace")


@dataclass
class StreamedScript:
    """A running script whose output goes, line by line, to a callback."""

    process: asyncio.subprocess.Process
    # Ends when every holder of the output pipe has closed it: the script,
    # and anything it left running in the background.
    output_done: asyncio.Task[None]


async def start_streamed(
    script: str,
    env: dict[str, str],
    cwd: str,
    on_line: Callable[[str], None],
) -> StreamedScript:
    """Start ``script`` with stdout and stderr merged into one pipe that is read
    line by line into ``on_line``.

    The pipe is made here and not by asyncio: asyncio's ``Process.wait()``
    (3.11+) also waits for its pipes to close, which a startup script that
    starts a server in the background (``code-server &``) never does. With our
    own pipe, ``wait()`` ends when the script does.
    """
    read_fd, write_fd = os.pipe()
    try:
        process = await asyncio.create_subprocess_exec(
            "/bin/sh",
            "-c",
            script,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=reset_signals,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE)
    pipe = cast(IO[bytes], os.fdopen(read_fd, "rb", 0))
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)

    async def pump() -> None:
        splitter = LineSplitter()
        try:
            while True:
                data = await reader.read(READ_SIZE)
                if not data:
                    break
                for line in splitter.feed(data):
                    on_line(line)
            for line in splitter.finish():
                on_line(line)
        finally:
            transport.close()

    return StreamedScript(process, asyncio.ensure_future(pump()))


@dataclass(frozen=True)
class Captured:
    """What a metadata command produced."""

    # None when the command was killed after its timeout.
    exit_code: int | None
    stdout: bytes
    stderr: bytes


async def run_captured(
    script: str,
    env: dict[str, str],
    cwd: str,
    timeout: float,
) -> Captured:
    """Run ``script`` to its end (or kill it after ``timeout`` seconds) and
    return its exit code and output (each cut at :data:`MAX_CAPTURE_BYTES`)."""
    process = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        script,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=cwd,
        env=env,
        start_new_session=True,
        preexec_fn=reset_signals,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        kill_group(process)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), 2.0)
        return Captured(None, b"", b"")
    except asyncio.CancelledError:
        kill_group(process)
        raise
    return Captured(process.returncode, stdout[:MAX_CAPTURE_BYTES], stderr[:MAX_CAPTURE_BYTES])
