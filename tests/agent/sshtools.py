"""Helpers for the SSH server tests: the server (``ssh_harness.py``) in a
process of its own on loopback, and the real OpenSSH client pinned to its
host key (no trust on first use)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

from tests.conftest import require

HARNESS = Path(__file__).with_name("ssh_harness.py")
SRC = Path(__file__).resolve().parents[2] / "src"
ROOT = Path(__file__).resolve().parents[2]


def require_ssh_client(*tools: str) -> None:
    """The OpenSSH client (and other tools) must be installed."""
    for tool in ("ssh", *tools):
        require(tool, shutil.which(tool) is not None, "apt-get install openssh-client rsync git")


def make_host_key(directory: Path) -> tuple[Path, str]:
    """An ed25519 host key as the control plane makes it: (key file, public half)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    path = directory / "host_key"
    path.write_bytes(key.export_private_key("openssh"))
    path.chmod(0o600)
    return path, key.export_public_key("openssh").decode().strip()


@dataclass
class SSHTarget:
    """Where a server listens, and how the real ``ssh`` reaches it."""

    host: str
    port: int
    known_hosts: Path
    home: Path
    extra: list[str] = field(default_factory=list)

    def options(self) -> list[str]:
        """Client options: no config, the pinned host key, no prompts."""
        return [
            "-F",
            "/dev/null",
            "-o",
            f"UserKnownHostsFile={self.known_hosts}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
            *self.extra,
        ]

    def ssh_argv(self, *args: str) -> list[str]:
        """``ssh`` with our options, then ``args`` (options, then command)."""
        return ["ssh", *self.options(), "-p", str(self.port), *args]

    def ssh_command(self) -> str:
        """For ``rsync -e`` and ``GIT_SSH_COMMAND``."""
        return " ".join(["ssh", *self.options(), "-p", str(self.port)])

    def run(
        self, *args: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """``ssh [args] host`` is NOT implied: pass the host in ``args``."""
        return subprocess.run(
            self.ssh_argv(*args), input=input, capture_output=True, timeout=timeout, check=False
        )

    def exec(
        self, command: str, *options: str, input: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        """``ssh [options] host command``."""
        return self.run(*options, self.host, command, input=input, timeout=timeout)


def write_known_hosts(path: Path, host: str, port: int, public_key: str) -> None:
    """A known_hosts line for host:port with the server's public key."""
    path.write_text(f"[{host}]:{port} {public_key}\n")


@dataclass
class HarnessProcess:
    """The SSH server harness as a child process."""

    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def stop(self) -> int:
        """SIGTERM (the server's close()), then its exit code."""
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
        return self.process.returncode

    def open_fds(self) -> int:
        """How many file descriptors the server process holds."""
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def children(self) -> list[int]:
        """Pids of the server's live child processes."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)],
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        return [int(line) for line in out.split()]


def start_harness(
    key_file: Path, home: Path, log: Path, transport: str = "socket"
) -> HarnessProcess:
    """Start ``ssh_harness.py`` with ``home`` as HOME; wait for its port."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "PYTHONPATH": f"{SRC}{os.pathsep}{ROOT}",
    }
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, str(HARNESS), str(key_file), "--transport", transport],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    assert process.stdout is not None
    line = process.stdout.readline().decode().strip()
    if not line.startswith("port="):
        process.kill()
        process.wait()
        raise AssertionError(f"harness did not start: {line!r} {log.read_text()}")
    return HarnessProcess(process, int(line.split("=", 1)[1]), log)


def wait_until(condition: object, timeout: float = 10.0, what: str = "") -> None:
    """Poll a callable until it is true."""
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.05)


def process_gone(pid: int) -> bool:
    """True once ``pid`` no longer exists (exited and reaped: no zombie)."""
    return not os.path.exists(f"/proc/{pid}")
