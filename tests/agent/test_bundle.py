"""The agent bundle (deterministic zipapp) and the bootstrap script that
fetches, caches, verifies and runs it inside a workspace."""

from __future__ import annotations

import asyncio
import hashlib
import io
import subprocess
import sys
import threading
import zipfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from stockade.agent.bundle import (
    BOOTSTRAP_SCRIPT,
    BUNDLE_PATH,
    BUNDLE_SHA256_ENV,
    SHA256_HEADER,
    agent_bundle,
    build_bundle,
)
from tests.agent.conftest import (
    TOKEN,
    FakeControlPlane,
    PrivateCA,
    agent_env,
    manifest,
    system_python,
)
from tests.conftest import require

MakePlane = Callable[..., FakeControlPlane]


def test_bundle_is_deterministic_and_complete(tmp_path: Path) -> None:
    data = build_bundle(tmp_path / "agent.pyz")
    assert (tmp_path / "agent.pyz").read_bytes() == data
    assert build_bundle() == data
    # Another process (other hash seed, other import order) builds the same bytes.
    other = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from stockade.agent.bundle import build_bundle;"
            " sys.stdout.buffer.write(build_bundle())",
        ],
        capture_output=True,
        check=True,
    ).stdout
    assert hashlib.sha256(other).hexdigest() == hashlib.sha256(data).hexdigest()
    assert agent_bundle() == (data, hashlib.sha256(data).hexdigest())

    assert data.startswith(b"#!/usr/bin/env python3\n")
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        infos = archive.infolist()
    assert names == sorted(names)
    assert {
        "__main__.py",
        "stockade/__init__.py",
        "stockade/agent/__init__.py",
        "stockade/agent/agent.py",
        "stockade/agent/protocol.py",
        "stockade/agent/wsclient.py",
        "wsproto/__init__.py",
        "h11/__init__.py",
    } <= set(names)
    assert any(name.startswith("licenses/wsproto/") for name in names)
    assert any(name.startswith("licenses/h11/") for name in names)
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)
    assert {info.date_time for info in infos} == {(1980, 1, 1, 0, 0, 0)}


@pytest.fixture(scope="session")
def bundle_bytes(bundle_file: Path) -> bytes:
    """The built bundle's bytes."""
    return bundle_file.read_bytes()


@dataclass
class Bootstrap:
    """The bootstrap script running as a workspace's init process."""

    process: asyncio.subprocess.Process
    log_path: Path

    def log(self) -> str:
        """Its stderr (the bootstrap's and then the agent's)."""
        return self.log_path.read_text(errors="replace")


StartBootstrap = Callable[..., Awaitable[Bootstrap]]


@pytest.fixture
async def bootstrap(tmp_path: Path) -> AsyncIterator[StartBootstrap]:
    """Run ``BOOTSTRAP_SCRIPT`` under /bin/sh with a workspace's environment."""
    started: list[Bootstrap] = []
    home = tmp_path / "home"
    python = system_python()
    require("python3", bool(python), "apt-get install python3")
    path = str(Path(python).parent) + ":/bin"

    async def start(access_url: str, python: str = "", **extra: str) -> Bootstrap:
        search = path
        if python:  # the image's python3 is this one
            bin_dir = tmp_path / f"bin{len(started)}"
            bin_dir.mkdir()
            (bin_dir / "python3").symlink_to(python)
            search = f"{bin_dir}:/bin"
        env = agent_env(home, access_url, PATH=search, **extra)
        log_path = tmp_path / f"bootstrap{len(started)}.log"
        with log_path.open("wb") as log_file:
            process = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                BOOTSTRAP_SCRIPT,
                env=env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                cwd=str(tmp_path),
            )
        run = Bootstrap(process, log_path)
        started.append(run)
        return run

    yield start
    for run in started:
        if run.process.returncode is None:
            run.process.kill()
            await run.process.wait()
        assert TOKEN not in run.log()


async def test_bootstrap_downloads_once_then_runs_from_the_cache(
    control_plane: MakePlane, bootstrap: StartBootstrap, bundle_bytes: bytes, tmp_path: Path
) -> None:
    data = bundle_bytes
    sha = hashlib.sha256(data).hexdigest()
    plane = control_plane(
        manifest=manifest(startup_script="echo hello from the bundle"),
        bundle=data,
        bundle_sha256=sha,
    )
    # The control plane is not up yet: the bootstrap retries.
    first = await bootstrap(plane.url, **{BUNDLE_SHA256_ENV: sha})
    await asyncio.sleep(1.0)
    await plane.start()
    await plane.wait_for(lambda: "ready" in plane.states(), timeout=15, what="ready")
    assert plane.bundle_downloads == 1
    assert plane.log_lines() == ["hello from the bundle"]
    assert "control plane unreachable" in first.log()
    cached = tmp_path / "home" / ".cache" / "stockade" / f"agent-{sha}.pyz"
    assert cached.read_bytes() == data
    # The bootstrap exec'd the agent: its pid is the agent's, SIGTERM stops it.
    first.process.terminate()
    assert await asyncio.wait_for(first.process.wait(), 10) == 0

    second = await bootstrap(plane.url, **{BUNDLE_SHA256_ENV: sha})
    await plane.wait_for(
        lambda: plane.connections == 2 and len(plane.states(2)) >= 2,
        timeout=15,
        what="second start",
    )
    assert plane.bundle_downloads == 1  # from the cache, no download
    assert "downloaded" not in second.log()
    second.process.terminate()
    assert await asyncio.wait_for(second.process.wait(), 10) == 0


async def test_bootstrap_over_https_with_a_private_ca(
    control_plane: MakePlane, bootstrap: StartBootstrap, bundle_bytes: bytes, private_ca: PrivateCA
) -> None:
    sha = hashlib.sha256(bundle_bytes).hexdigest()
    plane = control_plane(
        manifest=manifest(startup_script="echo tls"),
        bundle=bundle_bytes,
        bundle_sha256=sha,
        ssl_context=private_ca.server_context(),
    )
    await plane.start()
    run = await bootstrap(
        plane.url, STOCKADE_AGENT_CA_FILE=str(private_ca.ca_file), **{BUNDLE_SHA256_ENV: sha}
    )
    await plane.wait_for(lambda: "ready" in plane.states(), timeout=15, what="ready")
    assert plane.bundle_downloads == 1
    run.process.terminate()
    assert await asyncio.wait_for(run.process.wait(), 10) == 0


@pytest.mark.parametrize("pinned", [False, True])
async def test_bootstrap_refuses_a_bundle_with_the_wrong_sha256(
    control_plane: MakePlane,
    bootstrap: StartBootstrap,
    bundle_bytes: bytes,
    tmp_path: Path,
    pinned: bool,
) -> None:
    data = bundle_bytes
    good = hashlib.sha256(data).hexdigest()
    wrong = hashlib.sha256(b"something else").hexdigest()
    plane = control_plane(manifest=manifest(), bundle=data, bundle_sha256=good if pinned else wrong)
    await plane.start()
    extra = {BUNDLE_SHA256_ENV: wrong} if pinned else {}
    run = await bootstrap(plane.url, **extra)
    assert await asyncio.wait_for(run.process.wait(), 15) == 1
    assert "refusing to run it" in run.log()
    assert plane.connections == 0
    cache = tmp_path / "home" / ".cache" / "stockade"
    assert not cache.exists() or not list(cache.iterdir())


@dataclass
class BundleServer:
    """A plain HTTP server with GET and HEAD for the bundle (the sha256 in a
    header), counting requests; everything else is a 404."""

    data: bytes
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0


@pytest.fixture
def bundle_server(bundle_bytes: bytes) -> Iterator[BundleServer]:
    """Serve the bundle from a thread."""
    state = BundleServer(bundle_bytes)

    class Handler(BaseHTTPRequestHandler):
        def _answer(self, body: bool) -> None:
            state.requests.append((self.command, self.path))
            if self.path != BUNDLE_PATH:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(state.data)))
            self.send_header(SHA256_HEADER, hashlib.sha256(state.data).hexdigest())
            self.end_headers()
            if body:
                self.wfile.write(state.data)

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


async def wait_for_text(run: Bootstrap, text: str, timeout: float = 10.0) -> None:
    """Wait until ``text`` is in the bootstrap's (or agent's) log."""
    for _ in range(int(timeout / 0.05)):
        if text in run.log():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in log: {run.log()}")


async def test_bootstrap_without_a_pin_asks_the_server_which_bundle_is_current(
    bundle_server: BundleServer, bootstrap: StartBootstrap
) -> None:
    url = f"http://127.0.0.1:{bundle_server.port}"
    for _ in range(2):
        run = await bootstrap(url)
        assert isinstance(run, Bootstrap)
        await wait_for_text(run, "stockade-agent INFO starting")
        run.process.terminate()
        assert await asyncio.wait_for(run.process.wait(), 10) == 0
    # One download; the second start only asked (HEAD) for the current sha.
    # (The agents' upgrade requests went elsewhere and got 404s.)
    bundle_requests = [method for method, path in bundle_server.requests if path == BUNDLE_PATH]
    assert bundle_requests == ["HEAD", "GET", "HEAD"]


def test_bootstrap_needs_python_3_9(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    result = subprocess.run(
        ["/bin/sh", "-c", BOOTSTRAP_SCRIPT],
        env=agent_env(tmp_path / "home", "http://127.0.0.1:9", PATH=str(empty)),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "python3 is not installed" in result.stderr

    fake = empty / "python3"
    fake.write_text('#!/bin/sh\n[ "$1" = -V ] && echo "Python 3.8.18" && exit 0\nexit 1\n')
    fake.chmod(0o755)
    result = subprocess.run(
        ["/bin/sh", "-c", BOOTSTRAP_SCRIPT],
        env=agent_env(tmp_path / "home", "http://127.0.0.1:9", PATH=f"{empty}:/bin"),
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 1
    assert "Python 3.8.18" in result.stderr
    assert "needs Python 3.9 or newer" in result.stderr
    assert TOKEN not in result.stderr + result.stdout


def test_the_agent_masks_frames_in_c_from_the_bundle(tmp_path: Path) -> None:
    """The bundle carries websockets' apply_mask for this Python; the agent's
    WebSocket client then masks with it, byte for byte as wsproto would."""
    data = build_bundle()
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
        assert any(n.startswith("stockade_speedups/speedups.") and tag in n for n in names)
        archive.extractall(tmp_path / "x")
    check = (
        "import os, sys\n"
        "from stockade.agent import wsclient\n"
        "from wsproto import frame_protocol\n"
        "assert wsclient.C_MASKING\n"
        "fast = frame_protocol.XorMaskerSimple\n"
        "slow = fast.__mro__[1]\n"
        "for size in (0, 1, 3, 5, 4096, 262147):\n"
        "    key = os.urandom(4); a, b = fast(key), slow(key)\n"
        "    chunk = os.urandom(size)\n"
        "    assert a.process(chunk) == b.process(chunk)\n"
        "    assert a.process(chunk[:7]) == b.process(chunk[:7])\n"
        "print('ok')\n"
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'x')!r})\n"
         + check],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
