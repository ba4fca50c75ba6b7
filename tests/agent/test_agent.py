"""The real workspace agent (``python -m stockade.agent`` and the built bundle
under the system python3) against a stand-in control plane."""

from __future__ import annotations

import ast
import asyncio
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import stockade.agent
from stockade.agent.protocol import PROTOCOL_VERSION
from tests.agent.conftest import TOKEN, FakeControlPlane, PrivateCA, manifest

BIG_SCRIPT = "head -c 10000 /dev/zero | tr '\\0' x"
MakePlane = Callable[..., FakeControlPlane]
RunAgent = Callable[..., Any]


def read_environ(pid: int) -> bytes:
    """What /proc shows of a process's initial environment."""
    return Path(f"/proc/{pid}/environ").read_bytes()


@pytest.mark.parametrize("how", ["module", "bundle"])
async def test_startup_metadata_and_shutdown(
    control_plane: MakePlane, run_agent: RunAgent, how: str
) -> None:
    script = (
        'echo "line one"\n'
        "echo 'line two (stderr)' >&2\n"
        'env > "$HOME/startup-env"\n'
        'pwd > "$HOME/startup-cwd"\n'
        "printf 'no newline at the end'\n"
    )
    plane = control_plane(
        manifest=manifest(
            startup_script=script,
            env={"FROM_MANIFEST": "yes"},
            metadata=[
                {
                    "key": "hello",
                    "display_name": "Hello",
                    "script": "echo  hi $FROM_MANIFEST ",
                    "interval": 1,
                    "timeout": 5,
                },
                {
                    "key": "fails",
                    "display_name": "Fails",
                    "script": "echo bad >&2; exit 2",
                    "interval": 1,
                    "timeout": 5,
                },
                {
                    "key": "slow",
                    "display_name": "Slow",
                    "script": "sleep 5",
                    "interval": 1,
                    "timeout": 0.3,
                },
                {
                    "key": "big",
                    "display_name": "Big",
                    "script": BIG_SCRIPT,
                    "interval": 60,
                    "timeout": 5,
                },
            ],
        )
    )
    await plane.start()
    agent = await run_agent(plane, how)

    await plane.wait_for(lambda: "ready" in plane.states(), what="ready")
    hello = plane.received[0].message
    assert hello["type"] == "hello"
    assert hello["version"] == PROTOCOL_VERSION
    assert hello["hostname"] == platform.node()
    assert hello["os"] == "linux"
    assert hello["arch"] == platform.machine()
    assert hello["python"].count(".") == 2
    assert plane.states() == ["created", "starting", "ready"]
    assert plane.log_lines() == ["line one", "line two (stderr)", "no newline at the end"]
    # Every line arrived before "ready": it was reported in order.
    kinds = [r.message["type"] for r in plane.received]
    assert kinds.index("startup_log") < len(kinds) - 1 - kinds[::-1].index("lifecycle")
    for batch in plane.of_type("startup_log"):
        assert all(set(line) == {"time", "line"} for line in batch["lines"])

    # The startup script ran in $HOME, with the manifest's env and without the token.
    env_text = (agent.home / "startup-env").read_text()
    assert TOKEN not in env_text
    assert "STOCKADE_AGENT_TOKEN" not in env_text
    assert "FROM_MANIFEST=yes" in env_text
    assert (agent.home / "startup-cwd").read_text().strip() == str(agent.home)
    # ... nor can anyone read it in the agent's initial environment.
    environ = read_environ(agent.pid)
    assert TOKEN.encode() not in environ
    assert b"STOCKADE_ACCESS_URL=" in environ

    # Metadata: collected every interval, values stripped and capped, errors.
    def items(key: str) -> list[dict[str, Any]]:
        return [i for m in plane.of_type("metadata") for i in m["items"] if i["key"] == key]

    await plane.wait_for(
        lambda: len(items("hello")) >= 2 and len(items("slow")) >= 1, timeout=10, what="metadata"
    )
    first, second = items("hello")[:2]
    assert first["value"] == "hi yes"
    assert first["error"] == ""
    assert first["collected_at"] < second["collected_at"]
    fails = items("fails")[0]
    assert fails["error"].startswith("exit code 2")
    assert "bad" in fails["error"]
    assert "timed out" in items("slow")[0]["error"]
    assert items("big")[0]["value"] == "x" * 4096

    assert await agent.stop() == 0
    assert plane.states()[-2:] == ["shutting_down", "off"]
    assert "stockade-agent INFO" in agent.log()


async def test_start_error(control_plane: MakePlane, run_agent: RunAgent) -> None:
    plane = control_plane(manifest=manifest(startup_script="echo oops; exit 3"))
    await plane.start()
    agent = await run_agent(plane)
    await plane.wait_for(lambda: "start_error" in plane.states(), what="start_error")
    assert plane.states() == ["created", "starting", "start_error"]
    assert plane.log_lines() == ["oops"]
    assert await agent.stop() == 0


async def test_start_timeout_kills_the_script(
    control_plane: MakePlane, run_agent: RunAgent, tmp_path: Path
) -> None:
    pid_file = tmp_path / "script.pid"
    plane = control_plane(
        manifest=manifest(
            startup_script=f"echo begin; echo $$ > {pid_file}; sleep 30; echo never",
            startup_timeout=1,
        )
    )
    await plane.start()
    agent = await run_agent(plane)
    await plane.wait_for(lambda: "start_timeout" in plane.states(), timeout=5, what="timeout")
    assert plane.states() == ["created", "starting", "start_timeout"]
    assert plane.log_lines() == ["begin"]
    script_pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(script_pid, 0)
    assert await agent.stop() == 0


async def test_background_processes_do_not_hold_up_ready(
    control_plane: MakePlane, run_agent: RunAgent
) -> None:
    """A startup script that starts a server in the background is ready when
    the script ends; the server's output still reaches the log."""
    plane = control_plane(
        manifest=manifest(startup_script="(sleep 0.5; echo from-background) & echo started")
    )
    await plane.start()
    agent = await run_agent(plane)
    await plane.wait_for(lambda: "ready" in plane.states(), timeout=5, what="ready")
    assert plane.log_lines() == ["started"]
    await plane.wait_for(lambda: "from-background" in plane.log_lines(), what="background line")
    assert await agent.stop() == 0


async def test_reconnects_without_rerunning_the_startup_script(
    control_plane: MakePlane, run_agent: RunAgent
) -> None:
    script = 'echo run >> "$HOME/runs"; echo started; (sleep 1; echo while-disconnected) &'
    plane = control_plane(manifest=manifest(startup_script=script))
    await plane.start()
    agent = await run_agent(plane)
    await plane.wait_for(lambda: "ready" in plane.states(), what="ready")

    await plane.stop()  # the server goes away, connections and all
    await asyncio.sleep(1.5)  # the background line is printed meanwhile
    assert agent.process.returncode is None
    await plane.start()
    await plane.wait_for(lambda: plane.connections >= 2, timeout=15, what="reconnect")
    await plane.wait_for(lambda: "while-disconnected" in plane.log_lines(2), what="buffered line")
    second = [r.message for r in plane.received if r.connection == 2]
    assert second[0]["type"] == "hello"
    assert plane.states(2) == ["ready"]
    assert plane.log_lines() == ["started", "while-disconnected"]
    assert (agent.home / "runs").read_text() == "run\n"
    assert "reconnecting in" in agent.log()
    assert await agent.stop() == 0


async def test_keepalive_keeps_an_idle_connection(
    control_plane: MakePlane, run_agent: RunAgent
) -> None:
    """Pongs count as traffic: an idle but healthy connection stays up."""
    plane = control_plane(manifest=manifest())
    await plane.start()
    agent = await run_agent(plane, STOCKADE_AGENT_KEEPALIVE_SECONDS="0.2")
    await plane.wait_for(lambda: "ready" in plane.states(), what="ready")
    await asyncio.sleep(2.0)
    assert plane.connections == 1
    assert "failed" not in agent.log()
    assert await agent.stop() == 0


class FreezingProxy:
    """A TCP proxy that can stop passing bytes while keeping both sockets
    open: a server that hangs, or a connection that died without a FIN."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.freeze = False
        self.server: asyncio.Server | None = None
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen on a free port."""
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._relay(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if self.freeze:
                    await asyncio.Event().wait()  # this connection is dead now
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_silent_connection_is_dropped_and_remade(
    control_plane: MakePlane, run_agent: RunAgent
) -> None:
    plane = control_plane(manifest=manifest())
    await plane.start()
    proxy = FreezingProxy(plane.port)
    await proxy.start()
    try:
        agent = await run_agent(
            plane,
            access_url=f"http://127.0.0.1:{proxy.port}",
            STOCKADE_AGENT_KEEPALIVE_SECONDS="0.2",
        )
        await plane.wait_for(lambda: "ready" in plane.states(), what="ready")
        proxy.freeze = True  # bytes stop flowing; no FIN, no RST
        await plane.wait_for(lambda: "nothing from the server" in agent.log(), what="detect")
        proxy.freeze = False  # new connections pass again
        await plane.wait_for(lambda: plane.connections >= 2, timeout=10, what="reconnect")
        await plane.wait_for(lambda: plane.states(2) == ["ready"], what="state resent")
        assert await agent.stop() == 0
    finally:
        await proxy.close()


async def test_agent_waits_for_a_server_that_is_not_up_yet(
    control_plane: MakePlane, run_agent: RunAgent
) -> None:
    plane = control_plane(manifest=manifest(startup_script="echo hi"))
    agent = await run_agent(plane)
    await asyncio.sleep(1.0)
    await plane.start()
    await plane.wait_for(lambda: "ready" in plane.states(), timeout=10, what="ready")
    assert plane.states() == ["created", "starting", "ready"]
    assert await agent.stop() == 0


@pytest.mark.parametrize("how", ["module", "bundle"])
async def test_refused_token_on_upgrade_exits(
    control_plane: MakePlane, run_agent: RunAgent, how: str
) -> None:
    plane = control_plane(manifest=manifest(), token="another-token")
    await plane.start()
    agent = await run_agent(plane, how)
    assert await agent.wait(10) == 3
    assert plane.upgrade_statuses == [401]
    assert "refused the agent token (HTTP 401)" in agent.log()


async def test_token_revoked_by_close_code_exits(
    control_plane: MakePlane, run_agent: RunAgent
) -> None:
    plane = control_plane(manifest=manifest(), refuse="close")
    await plane.start()
    agent = await run_agent(plane)
    assert await agent.wait(10) == 3
    assert plane.connections == 1
    assert "close code 4401" in agent.log()


async def test_missing_configuration_is_a_clear_error(
    control_plane: MakePlane, run_agent: RunAgent
) -> None:
    plane = control_plane(manifest=manifest())
    agent = await run_agent(plane, token="")
    assert await agent.wait(10) == 2
    assert "STOCKADE_AGENT_TOKEN is not set" in agent.log()


@pytest.mark.parametrize("how", ["module", "bundle"])
async def test_wss_with_a_private_ca(
    control_plane: MakePlane, run_agent: RunAgent, private_ca: PrivateCA, how: str
) -> None:
    plane = control_plane(
        manifest=manifest(startup_script="echo tls"), ssl_context=private_ca.server_context()
    )
    await plane.start()
    agent = await run_agent(plane, how, STOCKADE_AGENT_CA_FILE=str(private_ca.ca_file))
    await plane.wait_for(lambda: "ready" in plane.states(), what="ready over wss")
    assert plane.log_lines() == ["tls"]
    assert "connected to wss://127.0.0.1:" in agent.log()
    assert await agent.stop() == 0


async def test_wss_without_the_ca_is_not_trusted(
    control_plane: MakePlane, run_agent: RunAgent, private_ca: PrivateCA
) -> None:
    plane = control_plane(manifest=manifest(), ssl_context=private_ca.server_context())
    await plane.start()
    agent = await run_agent(plane)
    for _ in range(100):
        if "CERTIFICATE_VERIFY_FAILED" in agent.log():
            break
        await asyncio.sleep(0.05)
    assert "CERTIFICATE_VERIFY_FAILED" in agent.log()
    assert plane.received == []
    assert agent.process.returncode is None  # it keeps trying
    assert await agent.stop() == 0


def test_agent_sources_parse_as_python_3_9() -> None:
    """The agent runs on Python 3.9+: no 3.10+ syntax in its files (ruff checks
    this too, through per-file-target-version)."""
    package = Path(stockade.agent.__file__ or "").parent
    for path in sorted(package.glob("*.py")):
        ast.parse(path.read_text(), filename=str(path), feature_version=(3, 9))
