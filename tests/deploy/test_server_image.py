"""The control plane's container image (scripts/build-server-image.sh,
deploy/container/Dockerfile): built offline from this checkout, then run the
way deploy/kubernetes/base runs it (uid 10001, read-only root, every
capability dropped, the data directory and /tmp as the only writable places)
on SQLite and on PostgreSQL, and driven over HTTP on a loopback port."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

import stockade
from stockade.devtools.postgres import TempPostgres
from stockade.sdk import Client
from tests.conftest import OWNER_PASSWORD, require
from tests.provisioner.conftest import BASE_IMAGE, docker_available, image_present

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "build-server-image.sh"
DEPLOYMENT = ROOT / "deploy" / "kubernetes" / "base" / "deployment.yaml"
REPOSITORY = "stockade-server"
IMAGE = f"{REPOSITORY}:{stockade.__version__}"
UID = 10001
# The workspace base image is about 200 MB of it; Stockade's venv the rest.
MAX_SIZE = 550_000_000
CFFI_BACKEND = re.compile(r"_cffi_backend\.cpython-3(\d+)-x86_64-linux-gnu\.so$")


def docker(*args: str, timeout: float = 120) -> str:
    """Run the docker CLI; its stderr is the failure message."""
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


@pytest.fixture(scope="module")
def image() -> str:
    """The image, built by the script (a cached one when the sources did not
    change: the script compares its content label)."""
    require("Docker", docker_available(), "apt-get install docker.io and start dockerd")
    can_build_base = os.geteuid() == 0 and shutil.which("debootstrap") is not None
    require(
        f"the base image {BASE_IMAGE}",
        image_present(BASE_IMAGE) or can_build_base,
        "run scripts/build-base-image.sh as root (debootstrap)",
    )
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, f"build-server-image.sh failed:\n{result.stderr}"
    return IMAGE


def inspect(image: str) -> dict[str, Any]:
    (info,) = json.loads(docker("image", "inspect", image))
    return dict(info)


def test_the_image_is_labelled_and_runs_stockade_server_unprivileged(image: str) -> None:
    info = inspect(image)
    config = info["Config"]
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == stockade.__version__
    assert labels["stockade.version"] == stockade.__version__
    assert re.fullmatch(r"[0-9a-f]{64}", labels["stockade.content"])
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["stockade"]
    assert config["Cmd"] == ["server"]
    assert "7080/tcp" in config["ExposedPorts"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["STOCKADE_DATA_DIR"] == "/var/lib/stockade"
    assert env["PATH"].startswith("/opt/stockade/bin:")
    assert info["Size"] < MAX_SIZE, f"the image grew to {info['Size'] / 1e6:.0f} MB"
    # :latest is the same image.
    assert inspect(f"{REPOSITORY}:latest")["Id"] == info["Id"]


def test_a_second_build_reuses_the_image(image: str) -> None:
    before = inspect(image)["Id"]
    started = time.monotonic()
    result = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr
    # Another session may have edited a source in between: then it rebuilt.
    if "already present" in result.stderr:
        assert inspect(image)["Id"] == before
        assert time.monotonic() - started < 30


def test_the_deployment_runs_this_image_as_its_user(image: str) -> None:
    (deployment,) = [d for d in yaml.safe_load_all(DEPLOYMENT.read_text()) if d]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # The released version, not :latest (which Kubernetes would try to pull).
    assert container["image"] == IMAGE
    assert pod["securityContext"]["runAsUser"] == UID
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/var/lib/stockade", "/tmp"} <= mounts


class Running:
    """A server container and its URL on a loopback port Docker picked."""

    def __init__(self, container: str, url: str) -> None:
        self.container = container
        self.url = url

    def logs(self) -> str:
        result = subprocess.run(
            ["docker", "logs", "--tail", "40", self.container],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        return result.stdout + result.stderr


def run_server(image: str, *extra: str, env: dict[str, str] | None = None) -> Running:
    """``docker run`` as the Kubernetes deployment does; wait for /healthz."""
    name = f"stockade-server-test-{uuid.uuid4().hex[:12]}"
    environment = {"STOCKADE_ADDRESS": "0.0.0.0:7080", **(env or {})}
    docker(
        "run", "-d", "--name", name, "--label", "stockade.test=server-image",
        "-p", "127.0.0.1::7080",
        "--read-only", "--tmpfs", "/tmp",
        "--tmpfs", f"/var/lib/stockade:uid={UID},gid={UID},mode=0700",
        "--user", f"{UID}:{UID}", "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
        *[arg for key, value in environment.items() for arg in ("-e", f"{key}={value}")],
        *extra, image, "server",
    )  # fmt: skip
    running = Running(name, "")
    # "127.0.0.1:PORT" (one line per address family bound; only IPv4 here).
    port = docker("port", name, "7080/tcp").split()[0].rpartition(":")[2]
    running.url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if httpx.get(f"{running.url}/healthz", timeout=2).status_code == 200:
                return running
        except httpx.HTTPError:
            pass
        state = docker("inspect", "-f", "{{.State.Running}}", name).strip()
        if state != "true" or time.monotonic() > deadline:
            logs = running.logs()
            docker("rm", "-f", name)
            pytest.fail(f"the server container never answered /healthz (running={state}):\n{logs}")
        time.sleep(0.3)


@pytest.fixture
def containers() -> Iterator[list[Running]]:
    """Containers removed after the test."""
    started: list[Running] = []
    yield started
    for running in started:
        subprocess.run(
            ["docker", "rm", "-f", running.container], capture_output=True, timeout=60, check=False
        )


def check_server(running: Running, dialect: str) -> None:
    """First user, then the health and build info the server reports."""
    with Client(running.url) as client:
        assert client.buildinfo().version == stockade.__version__
        owner = client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
        assert owner.username == "owner"
        client.login("owner", OWNER_PASSWORD)
        health = client.health()
        assert health.version == stockade.__version__
        assert health.status == "ok", health
        assert client.buildinfo().dialect == dialect
    # The process is the unprivileged user, as the deployment's runAsUser.
    assert docker("exec", running.container, "id", "-u").strip() == str(UID)


def test_the_server_answers_on_sqlite(image: str, containers: list[Running]) -> None:
    running = run_server(image)
    containers.append(running)
    check_server(running, "sqlite")

    # The agent bundle carries cffi's native backend for this image's Python
    # and for each CPython of the agent wheels (./dev's .venv/agent-wheels).
    answer = httpx.get(f"{running.url}/api/v2/agent/bundle.pyz", timeout=60)
    assert answer.status_code == 200
    with zipfile.ZipFile(io.BytesIO(answer.content)) as bundle:
        built = {int(m.group(1)) for n in bundle.namelist() if (m := CFFI_BACKEND.search(n))}
    wheels = ROOT / ".venv" / "agent-wheels"
    expected = {11} | {
        int(m.group(1))
        for wheel in wheels.glob("cffi-*.whl")
        if (m := re.search(r"-cp3(\d+)-", wheel.name))
    }
    assert built == expected


def test_the_server_answers_on_postgres(
    image: str, containers: list[Running], pg_cluster: TempPostgres
) -> None:
    # The cluster listens on host loopback, which a container cannot reach:
    # its unix socket is mounted in instead.
    url = pg_cluster.create_database()
    database = url.rpartition("/")[2]
    socket = pg_cluster.base / f".s.PGSQL.{pg_cluster.port}"
    assert socket.exists(), f"no PostgreSQL socket at {socket}"
    running = run_server(
        image,
        "-v", f"{socket}:/run/postgresql/.s.PGSQL.{pg_cluster.port}",
        env={
            "STOCKADE_POSTGRES_URL": (
                f"postgresql://stockade@/{database}"
                f"?host=/run/postgresql&port={pg_cluster.port}"
            )
        },
    )  # fmt: skip
    containers.append(running)
    check_server(running, "postgresql")
