"""Two `stockade server` processes on one PostgreSQL database are one
deployment: both are listed with their versions, a killed one is dropped
after three missed heartbeats, and a wake-up on one reaches the other
through LISTEN/NOTIFY (a build queued on a replica without workers is taken
at once by the other's, and its log followed through the first)."""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import stockade
from stockade.devtools.postgres import TempPostgres
from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from stockade.sdk.templates import build_archive
from tests.conftest import OWNER_PASSWORD, RELAXED_LIMITS, stop_workspaces

HEARTBEAT = "0.5"


@pytest.fixture
def pair(pg_cluster: TempPostgres, tmp_path: Path) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """Replica A runs the build workers; replica B has none. They share the
    database and the audit key, as replicas must."""
    url = pg_cluster.create_database()
    common = {
        **RELAXED_LIMITS,
        "STOCKADE_AUDIT_KEY": secrets.token_hex(32),
        "STOCKADE_REPLICA_HEARTBEAT_SECONDS": HEARTBEAT,
    }
    a = ServerProcess(data_dir=tmp_path / "a", postgres_url=url, env=common).start()
    b = ServerProcess(
        data_dir=tmp_path / "b",
        postgres_url=url,
        env={**common, "STOCKADE_PROVISIONER_WORKERS": "0"},
    ).start()
    try:
        yield a, b
    finally:
        for server in (b, a):
            server.stop()
        stop_workspaces(a)


def owner_on(server: ServerProcess, *, first: bool = False) -> Client:
    client = Client(server.url)
    if first:
        client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    return client


def test_replicas_are_listed_and_a_killed_one_is_dropped(
    pair: tuple[ServerProcess, ServerProcess],
) -> None:
    a, b = pair
    with owner_on(a, first=True) as on_a:
        replicas = on_a.health().replicas
        assert len(replicas) == 2
        assert {r.version for r in replicas} == {stockade.__version__}
        assert [r.this for r in replicas].count(True) == 1
        b.stop(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while len(on_a.health().replicas) != 1:
            assert time.monotonic() < deadline, on_a.health().replicas
            time.sleep(0.2)
        (left,) = on_a.health().replicas
        assert left.this
        # The deployment page lists it too.
        page = httpx.get(
            f"{a.url}/admin/deployment",
            headers={"cookie": f"stockade_session={on_a.token}"},
            timeout=10,
        )
        assert page.status_code == 200, page.text[:500]
        assert f"<td>{left.pid}</td>" in page.text
        assert "this one" in page.text


def test_a_wake_up_on_one_replica_reaches_the_other(
    pair: tuple[ServerProcess, ServerProcess], tmp_path: Path
) -> None:
    a, b = pair
    with owner_on(a, first=True) as on_a, owner_on(b) as on_b:
        assert on_b.health().relay["connected"] is True
        before = on_a.health().relay["received"]
        directory = tmp_path / "t"
        directory.mkdir()
        (directory / "stockade.yaml").write_text(
            "name: t\nbackend: local\nagent:\n  startup_script: 'true'\n"
        )
        on_b.push_template("t", build_archive(directory))
        # Queued through B, which has no workers: A's worker is woken by B's
        # NOTIFY (its own poll is 5 s), and B streams the log A writes.
        on_b.create_workspace("w", "t")
        events = list(on_b.follow_build_logs("owner", "w", build=1))
        assert events[-1]["type"] == "end" and events[-1]["status"] == "succeeded", events
        assert on_a.health().relay["received"] > before
        assert on_b.health().relay["received"] > 0
        on_b.create_build("owner", "w", "delete")
