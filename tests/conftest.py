"""Fixtures that start real services: a PostgreSQL cluster per session and real
``stockade server`` processes on free ports, on SQLite and on PostgreSQL."""

from __future__ import annotations

import itertools
import os
import shutil
import sqlite3
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from stockade.devtools.postgres import TempPostgres, find_bindir
from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from stockade.server.db import Database

IN_CI = os.environ.get("CI") == "true"
OWNER_PASSWORD = "Correct-Horse-42!"
PASSWORD = "Battery-Staple-77"
# Tests log in hundreds of times from 127.0.0.1; the rate-limit tests use their
# own server with the defaults.
RELAXED_LIMITS = {
    "STOCKADE_LOGIN_RATE_PER_IP": "100000",
    "STOCKADE_LOGIN_FAILURES_PER_USER": "1000",
}


def require(component: str, available: bool, how: str) -> None:
    """Fail in CI, skip elsewhere, when a component the test needs is missing."""
    if available:
        return
    if IN_CI:
        pytest.fail(f"{component} is required in CI but missing: {how}")
    pytest.skip(f"{component} not available: {how}")


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[TempPostgres]:
    require("PostgreSQL", find_bindir() is not None, "apt-get install postgresql-15")
    cluster = TempPostgres().start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


ServerFactory = Callable[..., ServerProcess]


def deployment_of(server: ServerProcess) -> str | None:
    """The deployment id a server made in its database (None before it made one)."""
    query = "SELECT deployment_id FROM deployment_info"
    try:
        if server.postgres_url:
            bindir = find_bindir()
            assert bindir is not None
            out = subprocess.run(
                [str(bindir / "psql"), server.postgres_url, "-tAc", query],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout  # fmt: skip
            return out.strip() or None
        with sqlite3.connect(server.data_dir / "stockade.db") as db:
            row = db.execute(query).fetchone()
            return str(row[0]) if row else None
    except (subprocess.SubprocessError, sqlite3.Error):
        return None


def stop_workspaces(server: ServerProcess) -> None:
    """Local workspaces outlive their server by design; a test's must not
    outlive the test run. Nor may its deployment's Docker network: Docker has
    address pools for about 30 networks, and each test server is a deployment."""
    from tests.provisioner.conftest import stop_local_workspaces

    stop_local_workspaces(server.data_dir / "workspaces")
    if shutil.which("docker") and Path("/var/run/docker.sock").exists():
        deployment = deployment_of(server)
        if deployment:
            # Its docker workspaces, whose agents would otherwise call a dead
            # server until the machine restarts, and keep their network busy.
            mine = f"label=stockade.deployment={deployment}"
            # Its network last: only this deployment's, for another xdist
            # worker's may be between its creation and its first container.
            for kind in ("container", "volume", "network"):
                listed = subprocess.run(
                    ["docker", kind, "ls", "-q", *(["-a"] if kind == "container" else []),
                     "--filter", mine],
                    capture_output=True, text=True, timeout=60, check=False,
                )  # fmt: skip
                if listed.stdout.split():
                    subprocess.run(
                        ["docker", kind, "rm", *(["-f"] if kind != "network" else []),
                         *listed.stdout.split()],
                        capture_output=True, timeout=120, check=False,
                    )  # fmt: skip


def pytest_sessionfinish(session: pytest.Session) -> None:
    """After the whole run (the controller, once every xdist worker is done):
    the unused networks of test deployments whose id could not be read."""
    if hasattr(session.config, "workerinput") or not shutil.which("docker"):
        return
    if Path("/var/run/docker.sock").exists():
        subprocess.run(
            ["docker", "network", "prune", "-f", "--filter", "label=stockade.deployment"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip


@pytest.fixture
def start_server(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[ServerFactory]:
    """Start a fresh server (its own empty database) on the current backend."""
    started: list[ServerProcess] = []
    counter = itertools.count()

    def factory(env: dict[str, str] | None = None, args: list[str] | None = None) -> ServerProcess:
        url = ""
        if backend == "postgres":
            url = request.getfixturevalue("pg_cluster").create_database()
        server = ServerProcess(
            data_dir=tmp_path / f"server{next(counter)}",
            postgres_url=url,
            env={**RELAXED_LIMITS, **(env or {})},
            args=args,
        )
        started.append(server.start())
        return server

    yield factory
    for server in started:
        server.stop()
        stop_workspaces(server)


@pytest.fixture(scope="session")
def server(
    backend: str, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server per backend, shared by the tests that need no fresh one."""
    url = ""
    if backend == "postgres":
        url = request.getfixturevalue("pg_cluster").create_database()
    proc = ServerProcess(
        data_dir=tmp_path_factory.mktemp(f"shared-{backend}"), postgres_url=url, env=RELAXED_LIMITS
    ).start()
    yield proc
    proc.stop()
    stop_workspaces(proc)


@pytest.fixture(scope="session")
def owner(server: ServerProcess) -> Iterator[Client]:
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD, "The Owner")
    client.login("owner", OWNER_PASSWORD)
    yield client
    client.close()


_names = itertools.count()


def unique(prefix: str = "u") -> str:
    return f"{prefix}{os.getpid() % 1000}x{next(_names)}"


UserFactory = Callable[..., tuple[Client, str]]


@pytest.fixture
def make_user(owner: Client, server: ServerProcess) -> Iterator[UserFactory]:
    """Create a user with the given roles; returns (logged-in client, username)."""
    clients: list[Client] = []

    def factory(*roles: str) -> tuple[Client, str]:
        name = unique("user")
        owner.create_user(name, f"{name}@example.com", PASSWORD, roles=list(roles))  # type: ignore[arg-type]
        client = Client(server.url)
        client.login(name, PASSWORD)
        clients.append(client)
        return client, name

    yield factory
    for client in clients:
        client.close()


def run_sql(server: ServerProcess, request: pytest.FixtureRequest, sql: str) -> None:
    """Change a server's database behind its back, as an intruder with database
    access would."""
    if server.postgres_url:
        cluster: TempPostgres = request.getfixturevalue("pg_cluster")
        database = server.postgres_url.rsplit("/", 1)[1]
        subprocess.run(
            [str(cluster.bindir / "psql"), "-h", "127.0.0.1", "-p", str(cluster.port),
             "-U", "stockade", "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql],
            check=True, capture_output=True,
        )  # fmt: skip
    else:
        with sqlite3.connect(server.data_dir / "stockade.db") as db:
            db.execute(sql)


@pytest.fixture
async def empty_database(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Database]:
    """A new, unmigrated database on the current backend, used in-process."""
    if backend == "postgres":
        url = request.getfixturevalue("pg_cluster").create_database()
        db = Database("postgresql+asyncpg://" + url.split("://", 1)[1])
    else:
        db = Database(f"sqlite+aiosqlite:///{tmp_path / 'stockade.db'}")
    yield db
    await db.dispose()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the PostgreSQL variants of modules that set ``SQLITE_ONLY``
    (a string saying why): tests of what happens beyond the database (agents,
    streams, proxies, TLS), whose few writes the API tests cover on both
    databases. Deselected, not skipped: they are not tests. Keeps the suite
    inside CI's time budget."""
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        module = getattr(item, "module", None)
        postgres = callspec is not None and callspec.params.get("backend") == "postgres"
        if postgres and getattr(module, "SQLITE_ONLY", None):
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
