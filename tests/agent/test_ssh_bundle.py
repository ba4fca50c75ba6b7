"""The agent bundle's native part: what it carries, its extraction, and the
SSH server running from it inside a real workspace container."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from stockade.agent.bundle import native_support
from tests.agent.sshtools import (
    HARNESS,
    SSHTarget,
    make_host_key,
    require_ssh_client,
    wait_until,
    write_known_hosts,
)
from tests.conftest import require
from tests.provisioner.conftest import BASE_IMAGE, docker_available

PREPARE = (
    "import runpy, sys; d = runpy.run_path(sys.argv[1], run_name='bundle')['prepare']();"
    " from stockade.agent.ssh import ssh_available; import stockade.agent.agent;"
    " print(repr((d, ssh_available())))"
)


def test_the_bundle_carries_the_ssh_server_and_its_native_parts(bundle_file: Path) -> None:
    with zipfile.ZipFile(io.BytesIO(bundle_file.read_bytes())) as archive:
        names = set(archive.namelist())
    support = native_support()
    assert support.python_floor >= (3, 10)
    assert f"3.{sys.version_info.minor}" in support.python_versions
    assert {
        "stockade/agent/ssh.py",
        "stockade/agent/sshserver.py",
        "asyncssh/__init__.py",
        "cryptography/hazmat/bindings/_rust.abi3.so",
        "typing_extensions.py",
        f"_cffi_backend.cpython-3{sys.version_info.minor}-x86_64-linux-gnu.so",
    } <= names
    for version in support.python_versions:
        assert f"_cffi_backend.cpython-{version.replace('.', '')}-x86_64-linux-gnu.so" in names
    assert any(name.startswith("licenses/asyncssh/") for name in names)
    assert any(name.startswith("licenses/cryptography/") for name in names)


def test_concurrent_starts_extract_once(bundle_file: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "agent.pyz"
    shutil.copy(bundle_file, bundle)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    starts = [
        subprocess.Popen(
            [sys.executable, "-I", "-c", PREPARE, str(bundle)],
            stdout=subprocess.PIPE,
            env=env,
        )
        for _ in range(4)
    ]
    results = []
    for start in starts:
        out, _ = start.communicate(timeout=60)
        assert start.returncode == 0
        results.append(out.decode().strip())
    extracted = [p for p in tmp_path.iterdir() if p.name.startswith("agent-")]
    assert len(extracted) == 1
    assert set(results) == {repr((str(extracted[0]), (True, "")))}
    # No temporary directory is left behind; a restart reuses the directory.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["agent.pyz", extracted[0].name])
    marker = extracted[0] / ".complete"
    before = marker.stat().st_mtime_ns
    time.sleep(0.02)
    subprocess.run([sys.executable, "-I", "-c", PREPARE, str(bundle)], check=True, env=env)
    assert marker.stat().st_mtime_ns > before


def test_a_broken_native_part_leaves_the_agent_running_without_ssh(
    bundle_file: Path, tmp_path: Path
) -> None:
    bundle = tmp_path / "agent.pyz"
    shutil.copy(bundle_file, bundle)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home")}
    subprocess.run([sys.executable, "-I", "-c", PREPARE, str(bundle)], check=True, env=env)
    (extracted,) = (p for p in tmp_path.iterdir() if p.name.startswith("agent-"))
    # As if the workspace were of another architecture: the library is not loadable.
    (extracted / "cryptography" / "hazmat" / "bindings" / "_rust.abi3.so").write_bytes(b"junk")
    out = subprocess.run(
        [sys.executable, "-I", "-c", PREPARE, str(bundle)],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    ).stdout
    assert '(False, "SSH is unavailable in this workspace (Python' in out
    assert "_rust" in out


def test_the_bundle_serves_ssh_in_a_workspace_container(bundle_file: Path, tmp_path: Path) -> None:
    require("Docker", docker_available(), "apt-get install docker.io and start dockerd")
    require_ssh_client()
    image = subprocess.run(
        ["docker", "image", "inspect", BASE_IMAGE], capture_output=True, check=False
    )
    require(BASE_IMAGE, image.returncode == 0, "scripts/build-base-image.sh")
    share = tmp_path / "share"
    share.mkdir()
    shutil.copy(bundle_file, share / "agent.pyz")
    shutil.copy(HARNESS, share / "ssh_harness.py")
    key_file, public = make_host_key(share)
    key_file.chmod(0o644)
    share.chmod(0o777)
    # The workspace user (uid 1000) runs the bundle from a directory of its own.
    script = (
        "import runpy, sys; runpy.run_path('/share/agent.pyz', run_name='bundle')['prepare']();"
        " sys.argv = ['ssh_harness', '/share/host_key', '--bind', '0.0.0.0'];"
        " runpy.run_path('/share/ssh_harness.py', run_name='__main__')"
    )
    container = subprocess.run(
        [
            "docker",
            "run",
            "-d",
            "--rm",
            "--user",
            "1000:1000",
            "-e",
            "HOME=/home/stockade",
            "-v",
            f"{share}:/share",
            "--label",
            "stockade.test=ssh-bundle",
            BASE_IMAGE,
            "python3",
            "-I",
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:

        def logs() -> str:
            return subprocess.run(
                ["docker", "logs", container], capture_output=True, text=True, check=False
            ).stdout

        wait_until(
            lambda: "port=" in logs() or "error=" in logs(), 60, "the server in the container"
        )
        assert "error=" not in logs(), logs()
        port = int(logs().split("port=", 1)[1].split()[0])
        info = json.loads(
            subprocess.run(
                ["docker", "inspect", container], capture_output=True, text=True, check=True
            ).stdout
        )[0]
        address = next(net["IPAddress"] for net in info["NetworkSettings"]["Networks"].values())
        assert address
        known = tmp_path / "known_hosts"
        write_known_hosts(known, address, port, public)
        target = SSHTarget(address, port, known, Path("/home/stockade"))
        result = target.exec(
            'echo "$(id -u) $(python3 -c "import sys; print(sys.version_info[:2])") $PWD"; exit 6'
        )
        assert result.returncode == 6, result.stderr
        assert result.stdout.decode().split(" ", 1)[0] == "1000"
        assert result.stdout.decode().strip().endswith("/home/stockade")
        assert any(name.startswith("agent-") for name in os.listdir(share))
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True, check=False)
