"""Reconnecting PTYs (the web terminal's back end) through a real server to
a real agent process: the same shell after a dropped WebSocket with its
recent output replayed, resizes, the shell's exit, take-over by a second
client, the idle timeout, the cap, and refusals of bad input.

As in test_tunnel, the test plays the provisioner and starts the agent
itself, here with a short idle timeout and a small cap on terminals."""

from __future__ import annotations

import asyncio
import os
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from stockade.sdk import Client
from stockade.sdk.tunnel import StreamSpec, TunnelError, open_pty, open_stream, resize_message
from tests.agents import agent_workspace
from tests.conftest import OWNER_PASSWORD, ServerFactory

SQLITE_ONLY = "terminals live in the agent; the server only relays their streams"

TEMPLATE = """\
name: t
backend: local
"""
IDLE_SECONDS = 3
MAX_PTYS = 4
READ_TIMEOUT = 20.0


@dataclass
class Env:
    url: str
    token: str
    home: Path

    async def attach(
        self, pty_id: str, rows: int | None = None, cols: int | None = None
    ) -> ClientConnection:
        return await open_pty(self.url, self.token, "owner", "w", pty_id, rows=rows, cols=cols)


@pytest.fixture
def env(start_server: ServerFactory, tmp_path: Path) -> Iterator[Env]:
    server = start_server(env={"STOCKADE_PROVISIONER_WORKERS": "0"})
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    agent_env = {
        "STOCKADE_AGENT_PTY_IDLE_SECONDS": str(IDLE_SECONDS),
        "STOCKADE_AGENT_MAX_PTYS": str(MAX_PTYS),
    }
    try:
        with agent_workspace(
            server.url, client, TEMPLATE, tmp_path / "home", agent_env=agent_env
        ) as home:
            yield Env(server.url, client.token or "", home)
    finally:
        client.close()


async def read_until(ws: ClientConnection, pattern: str, seen: bytearray | None = None) -> str:
    """Read output until ``pattern`` (a regex) matches it; the first group
    (or the whole match). ``seen`` collects everything read."""
    buffer = seen if seen is not None else bytearray()
    deadline = time.monotonic() + READ_TIMEOUT
    while True:
        match = re.search(pattern.encode(), bytes(buffer))
        if match:
            return (match.group(1) if match.groups() else match.group(0)).decode()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {pattern!r} in the output: {bytes(buffer[-2000:])!r}")
        try:
            message = await asyncio.wait_for(ws.recv(), remaining)
        except TimeoutError:
            continue
        assert isinstance(message, bytes), message
        buffer.extend(message)


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    """Read (and drop output) until the stream closes: its code and reason."""
    deadline = time.monotonic() + READ_TIMEOUT
    while time.monotonic() < deadline:
        try:
            await asyncio.wait_for(ws.recv(), READ_TIMEOUT)
        except ConnectionClosed as closed:
            frame = closed.rcvd
            break
    else:
        raise AssertionError("the stream did not close")
    assert frame is not None, "the stream broke without a close frame"
    return frame.code, frame.reason


# The commands below print markers computed by the shell ("$((6*7))"), so
# that the terminal's echo of what was typed never matches them.


def test_a_dropped_terminal_resumes_the_same_shell_with_its_output(env: Env) -> None:
    async def main() -> None:
        pty_id = str(uuid.uuid4())
        ws = await env.attach(pty_id)
        await ws.send(b'SECRET=kept; echo "pid=$(($$+0)) term=$TERM cwd=$(pwd) m=$((6*7))"\n')
        first = await read_until(ws, r"(pid=\d+ term=\S+ cwd=\S+) m=42")
        assert f"term=xterm-256color cwd={env.home}" in first
        pid = first.split()[0]
        # Output made while nobody is attached is kept too.
        await ws.send(b'sleep 1; echo "late=$((2*3))"\n')
        await ws.close()

        await asyncio.sleep(1.5)
        ws = await env.attach(pty_id)
        replayed = bytearray()
        await read_until(ws, r"late=6", replayed)
        assert pid.encode() in replayed  # the screen before the drop
        await ws.send(b'echo "again=$(($$+0)) secret=$SECRET-$((1+1))"\n')
        again = await read_until(ws, r"again=(\d+ secret=\S+)")
        assert again == f"{pid.removeprefix('pid=')} secret=kept-2"

        # The replay is the recent output only.
        await ws.send(b"head -c 300000 /dev/zero | tr '\\0' a; echo; echo \"end=$((5*5))\"\n")
        await read_until(ws, r"end=25")
        await ws.close()
        ws = await env.attach(pty_id)
        replayed = bytearray()
        await read_until(ws, r"end=25", replayed)
        # Only the first message is the replay: 64 KiB at most, ending with
        # the latest output.
        assert 60_000 < len(replayed) <= 64 * 1024
        await ws.close()

    asyncio.run(main())


def test_resize_exit_take_over_and_bad_requests(env: Env) -> None:
    async def main() -> None:
        pty_id = "sized"
        ws = await env.attach(pty_id, rows=30, cols=100)
        await ws.send(b'echo "size=$(stty size)."\n')
        assert await read_until(ws, r"size=(\d+ \d+)\.") == "30 100"
        await ws.send(resize_message(40, 120))
        await ws.send(b'echo "resized=$(stty size)."\n')
        assert await read_until(ws, r"resized=(\d+ \d+)\.") == "40 120"
        await ws.send(b'echo "pid=$(($$+0))."\n')
        pid = await read_until(ws, r"pid=(\d+)\.")

        # A resize with nonsense in it closes this stream (4400), not the shell.
        await ws.send('{"type": "resize", "rows": 0, "cols": "wide"}')
        code, reason = await closed_with(ws)
        assert code == 4400 and "rows and cols" in reason
        ws = await env.attach(pty_id)
        await ws.send(b'echo "still=$(($$+0))."\n')
        assert await read_until(ws, r"still=(\d+)\.") == pid

        # The shell's exit ends the stream normally and forgets the terminal.
        await ws.send(b"exit 3\n")
        code, reason = await closed_with(ws)
        assert code == 1000
        ws = await env.attach(pty_id)
        await ws.send(b'echo "new=$(($$+0))."\n')
        assert await read_until(ws, r"new=(\d+)\.") != pid
        await ws.close()

        # One client at a time: a second takes the terminal over.
        first = await env.attach("shared")
        await first.send(b'echo "one=$((1*1))"\n')
        await read_until(first, r"one=1")
        second = await env.attach("shared")
        code, reason = await closed_with(first)
        assert code == 4410 and "another client" in reason
        await second.send(b'echo "two=$((1+1))"\n')
        await read_until(second, r"two=2")
        await second.close()

        for spec, words in [
            (StreamSpec("owner", "w", "pty"), "id"),
            (StreamSpec("owner", "w", "pty", pty_id="x" * 65), "id"),
            (StreamSpec("owner", "w", "pty", pty_id="a b/c"), "id"),
            (StreamSpec("owner", "w", "pty", pty_id="ok", rows=0, cols=80), "rows"),
            (StreamSpec("owner", "w", "pty", pty_id="ok", rows=24, cols=5000), "rows"),
            (StreamSpec("owner", "w", "terminal", pty_id="ok"), "kind"),
        ]:
            with pytest.raises(TunnelError) as caught:
                await open_stream(env.url, env.token, spec)
            assert caught.value.code == 4400, (spec, caught.value)
            assert words in str(caught.value), (spec, caught.value)

    asyncio.run(main())


def test_idle_terminals_end_and_their_number_is_capped(env: Env) -> None:
    async def main() -> None:
        ws = await env.attach("idle")
        await ws.send(b'echo "pid=$(($$+0))."\n')
        pid = int(await read_until(ws, r"pid=(\d+)\."))
        await ws.close()
        deadline = time.monotonic() + IDLE_SECONDS + 10
        while _alive(pid) and time.monotonic() < deadline:  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.2)
        assert not _alive(pid), "a detached terminal outlived its idle timeout"

        held = [await env.attach(f"cap-{i}") for i in range(MAX_PTYS)]
        with pytest.raises(TunnelError) as refused:
            await env.attach("one-too-many")
        assert refused.value.code == 4429 and "terminals" in str(refused.value)
        # An existing one still re-attaches (it takes its own stream over).
        again = await env.attach("cap-0")
        await again.send(b'echo "ok=$((2+2))"\n')
        await read_until(again, r"ok=4")
        for ws in [*held, again]:
            await ws.close()

    asyncio.run(main())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie the agent has not reaped yet counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"
