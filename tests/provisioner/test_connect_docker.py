"""The issue's "done when", against a real docker workspace: a new user runs
`stockade config-ssh`, then plain OpenSSH tools (ssh, scp, rsync, git, ssh -L
and -R, the VS Code Remote-SSH pattern) and `stockade port-forward`, with no
address but the control plane's."""

from __future__ import annotations

import hashlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from tests.cli.test_cli import Run, cli  # noqa: F401  (fixture)
from tests.conftest import OWNER_PASSWORD, require
from tests.provisioner.test_agent_backends import owner, push, server  # noqa: F401  (fixtures)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def fetch(url: str, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return bytes(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


class Tools:
    """The OpenSSH tools, configured only by `stockade config-ssh`."""

    def __init__(self, ssh_config: Path, config_dir: Path) -> None:
        self.ssh_config = ssh_config
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
        self.env["STOCKADE_CONFIG_DIR"] = str(config_dir)
        self.ssh_cmd = f"ssh -F {ssh_config} -o BatchMode=yes"
        self.env["GIT_SSH_COMMAND"] = self.ssh_cmd

    def run(
        self, *argv: str, input: bytes | None = None, cwd: Path | None = None
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            argv, input=input, capture_output=True, env=self.env, cwd=cwd, timeout=120,
            check=False,
        )  # fmt: skip

    def ssh(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return self.run("ssh", "-F", str(self.ssh_config), "-o", "BatchMode=yes", *args,
                        input=input)  # fmt: skip


@pytest.fixture
def tools(
    server: ServerProcess,  # noqa: F811
    owner: Client,  # noqa: F811
    tmp_path: Path,
    base_image: str,
    cli: Run,  # noqa: F811
) -> Tools:
    for binary in ("ssh", "scp", "rsync", "git"):
        require(
            binary, shutil.which(binary) is not None, "apt-get install openssh-client rsync git"
        )
    template = push(owner, tmp_path, "docker")
    cli("login", server.url, "--username", "owner", "--password", OWNER_PASSWORD)
    created = cli("create", "box", "--template", template)
    assert "is ready" in created.stdout, created.stdout
    ssh_config = tmp_path / "ssh_config"
    cli("config-ssh", "--ssh-config-file", str(ssh_config))
    return Tools(ssh_config, cli.config_dir)  # type: ignore[attr-defined]


def test_plain_openssh_tools_reach_a_docker_workspace(tools: Tools, tmp_path: Path) -> None:
    status = tools.ssh("stockade.box", "id -un; pwd; exit 3")
    assert status.returncode == 3, status.stderr
    assert status.stdout == b"stockade\n/home/stockade\n"

    # scp both ways, bytes intact.
    payload = os.urandom(3_000_000)
    up = tmp_path / "up.bin"
    up.write_bytes(payload)
    sent = tools.run("scp", "-F", str(tools.ssh_config), "-o", "BatchMode=yes",
                     str(up), "stockade.box:up.bin")  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    remote_sum = tools.ssh("stockade.box", "sha256sum up.bin").stdout.split()[0].decode()
    assert remote_sum == hashlib.sha256(payload).hexdigest()
    back = tmp_path / "back.bin"
    got = tools.run("scp", "-F", str(tools.ssh_config), "-o", "BatchMode=yes",
                    "stockade.box:up.bin", str(back))  # fmt: skip
    assert got.returncode == 0, got.stderr
    assert back.read_bytes() == payload

    # rsync over ssh.
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    for i in range(20):
        (tree / "sub" / f"f{i}.txt").write_text(f"file {i}\n" * (i + 1))
    synced = tools.run("rsync", "-a", "-e", tools.ssh_cmd, f"{tree}/", "stockade.box:tree/")
    assert synced.returncode == 0, synced.stderr
    listing = tools.ssh("stockade.box", "cat tree/sub/f19.txt | wc -l; ls tree/sub | wc -l")
    assert listing.stdout.split() == [b"20", b"20"]

    # git clone and push over ssh, to a repository in the workspace.
    assert tools.ssh("stockade.box", "git init -q --bare repo.git").returncode == 0
    clone = tmp_path / "clone"
    cloned = tools.run("git", "clone", "-q", "stockade.box:repo.git", str(clone))
    assert cloned.returncode == 0, cloned.stderr
    (clone / "README").write_text("hello from a push\n")
    for argv in (
        ("git", "add", "README"),
        ("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "first"),
        ("git", "push", "-q", "origin", "HEAD:main"),
    ):
        done = tools.run(*argv, cwd=clone)
        assert done.returncode == 0, (argv, done.stderr)
    log = tools.ssh("stockade.box", "git --git-dir=repo.git log --format=%s main")
    assert log.stdout == b"first\n"


def test_forwarding_both_ways_and_the_vscode_pattern(
    tools: Tools,
    tmp_path: Path,
    cli: Run,  # noqa: F811
) -> None:
    # VS Code Remote-SSH: a script over exec starts a server that outlives
    # the session, then a local port forward reaches it.
    started = tools.ssh(
        "stockade.box",
        "bash -s",
        input=b"mkdir -p site && echo vscode-server > site/index.html\n"
        b"setsid -f python3 -m http.server 8123 --bind 127.0.0.1 --directory site "
        b">/dev/null 2>&1\necho started\n",
    )
    assert started.returncode == 0 and started.stdout == b"started\n", started.stderr
    local = free_port()
    forward = subprocess.Popen(
        ["ssh", "-F", str(tools.ssh_config), "-o", "BatchMode=yes", "-o",
         "ExitOnForwardFailure=yes", "-N", "-L", f"{local}:127.0.0.1:8123", "stockade.box"],
        env=tools.env, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert fetch(f"http://127.0.0.1:{local}/index.html") == b"vscode-server\n"
    finally:
        forward.terminate()
        forward.wait()
        if forward.stderr:
            forward.stderr.close()

    # ssh -R: a server on this machine, reached from inside the workspace.
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"from the laptop"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        reverse = tools.ssh(
            "-o", "ExitOnForwardFailure=yes",
            "-R", f"9123:127.0.0.1:{httpd.server_address[1]}",
            "stockade.box",
            "python3 -c \"import urllib.request as u; "
            "print(u.urlopen('http://127.0.0.1:9123/').read().decode())\"",
        )  # fmt: skip
        assert reverse.returncode == 0, reverse.stderr
        assert reverse.stdout == b"from the laptop\n"
    finally:
        httpd.shutdown()
        httpd.server_close()

    # stockade port-forward: many parallel connections, and a clear error
    # for a port nobody listens on.
    proc = subprocess.Popen(
        [sys.executable, "-m", "stockade", "port-forward", "box",
         "--tcp", "0:8123", "--tcp", "0:8999"],
        env=tools.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stderr is not None
        ports = []
        for _ in range(2):
            line = proc.stdout.readline()
            match = re.search(r"127\.0\.0\.1:(\d+) -> owner/box:(\d+)", line)
            assert match, line
            ports.append(int(match.group(1)))
        results: list[bytes] = []

        def get() -> None:
            results.append(fetch(f"http://127.0.0.1:{ports[0]}/index.html"))

        threads = [threading.Thread(target=get) for _ in range(30)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == [b"vscode-server\n"] * 30
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{ports[1]}/", timeout=10)
        proc.terminate()
        _, stderr = proc.communicate(timeout=10)
        assert "could not connect to port 8999 inside the workspace" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
