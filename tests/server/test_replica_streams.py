"""Streams across replicas, on a real PostgreSQL with a TCP balancer in
front (tests/balancer.py): a client on replica A reaches an agent whose
control connection is on replica B, with the real OpenSSH client; when B is
killed the agent comes back through the balancer to A and a new ssh works
within seconds; with dial-backs spread over both replicas (round robin),
streams and refusals still reach the replica that asked; and a build a
killed replica held is taken over by the other once its lease expires."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

from stockade.devtools.postgres import TempPostgres
from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from stockade.sdk.templates import build_archive
from stockade.sdk.tunnel import TunnelError
from tests.agents import agent_workspace
from tests.balancer import Balancer
from tests.conftest import OWNER_PASSWORD, RELAXED_LIMITS, require
from tests.server.test_tunnel import echo_server, echo_through
from tests.terraform import terraform_binary

STOCKADE = str(Path(sys.executable).with_name("stockade"))
TEMPLATE = "name: t\nbackend: local\n"


@dataclass
class Deployment:
    a: ServerProcess
    b: ServerProcess
    balancer: Balancer
    owner_a: Client
    owner_b: Client

    def agent_behind_the_balancer(self, home: Path) -> AbstractContextManager[Path]:
        """The owner's workspace ``w`` (made through A) with a real agent
        whose access URL is the balancer: it lands where the balancer sends it."""
        return agent_workspace(
            self.a.url,
            self.owner_a,
            TEMPLATE,
            home,
            agent_env={"STOCKADE_ACCESS_URL": self.balancer.url},
        )

    def replica_id(self, server: ServerProcess) -> str:
        client = self.owner_a if server is self.a else self.owner_b
        (this,) = [r for r in client.health().replicas if r.this]
        return this.id


def _common(pg_cluster: TempPostgres) -> dict[str, str]:
    return {
        **RELAXED_LIMITS,
        "STOCKADE_POSTGRES_URL": pg_cluster.create_database(),
        # Replicas share the audit key: it also signs the hops between them.
        "STOCKADE_AUDIT_KEY": secrets.token_hex(32),
        "STOCKADE_REPLICA_HEARTBEAT_SECONDS": "0.5",
    }


@pytest.fixture
def deployment(
    request: pytest.FixtureRequest, pg_cluster: TempPostgres, tmp_path: Path
) -> Iterator[Deployment]:
    """Replicas A and B (no build workers: the test plays the provisioner)
    behind a balancer that prefers B (``first``), or takes them in turn
    (``round_robin``) when the test is parametrized so."""
    mode: Literal["first", "round_robin"] = getattr(request, "param", "first")
    common = {**_common(pg_cluster), "STOCKADE_PROVISIONER_WORKERS": "0"}
    a = ServerProcess(data_dir=tmp_path / "a", env=common).start()
    b = ServerProcess(data_dir=tmp_path / "b", env=common).start()
    ports = [int(s.url.rpartition(":")[2]) for s in (b, a)]
    balancer = Balancer(ports, mode=mode).start()
    owner_a = Client(a.url)
    owner_a.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    owner_a.login("owner", OWNER_PASSWORD)
    owner_b = Client(b.url)
    owner_b.login("owner", OWNER_PASSWORD)
    try:
        yield Deployment(a, b, balancer, owner_a, owner_b)
    finally:
        owner_a.close()
        owner_b.close()
        balancer.stop()
        for server in (b, a):
            server.stop()


def ssh(url: str, token: str, config_dir: Path, *command: str) -> subprocess.CompletedProcess[str]:
    """``stockade ssh w -- COMMAND`` (the real OpenSSH client) against ``url``."""
    env = {
        **os.environ,
        "STOCKADE_URL": url,
        "STOCKADE_TOKEN": token,
        "STOCKADE_CONFIG_DIR": str(config_dir),
    }
    return subprocess.run(
        [STOCKADE, "ssh", "w", "--", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_ssh_on_replica_a_reaches_an_agent_on_b_and_comes_back_after_b_is_killed(
    deployment: Deployment, tmp_path: Path
) -> None:
    require("ssh", shutil.which("ssh") is not None, "apt-get install openssh-client")
    d = deployment
    token = d.owner_a.token or ""
    with d.agent_behind_the_balancer(tmp_path / "home"):
        b_id, a_id = d.replica_id(d.b), d.replica_id(d.a)
        agent = d.owner_a.get_workspace("owner", "w").agent
        assert agent is not None and agent.replica == b_id, agent
        held = {r.id: r.agents for r in d.owner_a.health().replicas}
        assert held == {a_id: 0, b_id: 1}, held

        done = ssh(d.a.url, token, tmp_path / "cfg", "echo", "hello from", "$((6*7))")
        assert done.returncode == 0, done.stderr
        assert done.stdout == "hello from 42\n"
        # The client was on A and the agent's dial-back reached B (the
        # balancer prefers B): B carried it over to A, signed.
        assert d.owner_b.health().relay["hops"]["forwarded"] >= 1
        assert d.owner_a.health().relay["hops"]["accepted"] >= 1
        assert d.owner_a.health().relay["hops"]["refused"] == 0

        d.b.stop(signal.SIGKILL)
        killed = time.monotonic()
        while True:
            again = ssh(d.a.url, token, tmp_path / "cfg", "echo", "still here")
            if again.returncode == 0:
                break
            assert time.monotonic() - killed < 10, again.stderr
            time.sleep(0.2)
        assert again.stdout == "still here\n"
        assert time.monotonic() - killed < 10
        agent = d.owner_a.get_workspace("owner", "w").agent
        assert agent is not None and agent.status == "connected" and agent.replica == a_id, agent
        # Once B's heartbeat is three intervals old it is dropped (a wait the
        # agent did not need: it was back on A at once).
        deadline = time.monotonic() + 10
        while len(d.owner_a.health().replicas) != 1:
            assert time.monotonic() < deadline, d.owner_a.health().replicas
            time.sleep(0.2)
        assert [(r.id, r.agents) for r in d.owner_a.health().replicas] == [(a_id, 1)]
    # The agent stopped (end of the block): A records it gone.
    gone = d.owner_a.get_workspace("owner", "w").agent
    deadline = time.monotonic() + 10
    while gone is not None and gone.status != "disconnected":
        assert time.monotonic() < deadline, gone
        time.sleep(0.1)
        gone = d.owner_a.get_workspace("owner", "w").agent
    assert gone is not None and gone.replica is None


@pytest.mark.parametrize("deployment", ["round_robin"], indirect=True)
def test_streams_and_refusals_reach_the_asking_replica_wherever_the_agent_dials_back(
    deployment: Deployment, tmp_path: Path
) -> None:
    d = deployment
    port, stop_echo = echo_server()
    try:
        with d.agent_behind_the_balancer(tmp_path / "home"):
            payload = secrets.token_bytes(300_000)

            async def streams() -> list[bytes]:
                # Clients on both replicas at once; each stream's dial-back
                # takes the balancer's next turn.
                return await asyncio.gather(
                    *(
                        echo_through(server.url, client.token or "", port, payload)
                        for server, client in [(d.a, d.owner_a), (d.b, d.owner_b)] * 4
                    )
                )

            assert all(got == payload for got in asyncio.run(streams()))
            hops = [c.health().relay["hops"] for c in (d.owner_a, d.owner_b)]
            assert sum(h["forwarded"] for h in hops) >= 2, hops
            assert sum(h["accepted"] for h in hops) == sum(h["forwarded"] for h in hops), hops

            # Nothing listens on this port inside the workspace: the agent's
            # refusal reaches the asking replica (not a dial timeout there).
            unused = echo_server()
            unused[1].set()
            time.sleep(0.5)
            for server, client in [(d.a, d.owner_a), (d.b, d.owner_b)]:
                with pytest.raises(TunnelError) as refused:
                    asyncio.run(echo_through(server.url, client.token or "", unused[0], b"x"))
                assert "did not open the stream" not in str(refused.value), refused.value
                assert "could not connect" in str(refused.value), refused.value
    finally:
        stop_echo.set()


def test_a_killed_replicas_build_is_taken_over_once_its_lease_expires(
    pg_cluster: TempPostgres, tmp_path: Path
) -> None:
    terraform_binary()
    common = {
        **_common(pg_cluster),
        "STOCKADE_PROVISIONER_BACKENDS": "local,terraform",
        "STOCKADE_JOB_LEASE_SECONDS": "3",
    }
    b = ServerProcess(data_dir=tmp_path / "b", env=common).start()
    a: ServerProcess | None = None
    try:
        with Client(b.url) as on_b:
            on_b.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
            on_b.login("owner", OWNER_PASSWORD)
            directory = tmp_path / "slow"
            directory.mkdir()
            (directory / "stockade.yaml").write_text("name: slow\nbackend: terraform\n")
            (directory / "main.tf").write_text(
                'resource "terraform_data" "slow" {\n'
                '  provisioner "local-exec" {\n'
                '    command = "echo slow-build-started; sleep 8"\n'
                "  }\n"
                "}\n"
            )
            on_b.push_template("slow", build_archive(directory))
            on_b.create_workspace("w", "slow")
            for event in on_b.follow_build_logs("owner", "w", build=1):
                if "slow-build-started" in str(event.get("line", "")):
                    break
                assert event["type"] != "end", event
        # B's worker is in the middle of the build when B dies; A (which
        # runs workers too) starts only now, so that B surely took it.
        a = ServerProcess(data_dir=tmp_path / "a", env=common).start()
        b.stop(signal.SIGKILL)
        with Client(a.url) as on_a:
            on_a.login("owner", OWNER_PASSWORD)
            events = list(on_a.follow_build_logs("owner", "w", build=1))
            assert events[-1]["type"] == "end", events[-5:]
            assert events[-1]["status"] == "succeeded", events[-5:]
            lines = [str(e.get("line", "")) for e in events]
            assert any("attempt 2" in line for line in lines), lines
            on_a.create_build("owner", "w", "delete")
    finally:
        if a is not None:
            a.stop()
        b.stop()
