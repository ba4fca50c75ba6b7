"""The agent's SSH server (stockade.agent.ssh) against the real OpenSSH
client (ssh, scp, sftp, rsync, git) over loopback, the server running in a
process of its own (tests/agent/ssh_harness.py)."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import asyncssh
import pytest

from tests.agent.sshtools import (
    SRC,
    HarnessProcess,
    SSHTarget,
    make_host_key,
    process_gone,
    require_ssh_client,
    start_harness,
    wait_until,
    write_known_hosts,
)


@pytest.fixture(scope="module", params=["socket", "opaque"])
def served(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SSHTarget, HarnessProcess]]:
    """The server on a loopback port: over the socket's own transport, and
    over an opaque transport that hides the socket (as the tunnel's does)."""
    require_ssh_client()
    d = tmp_path_factory.mktemp(f"ssh-{request.param}")
    home = d / "home"
    home.mkdir()
    key_file, public = make_host_key(d)
    harness = start_harness(key_file, home, d / "server.log", transport=request.param)
    known = d / "known_hosts"
    write_known_hosts(known, "127.0.0.1", harness.port, public)
    yield SSHTarget("127.0.0.1", harness.port, known, home), harness
    assert harness.stop() == 0
    log = harness.log.read_text()
    assert "Traceback" not in log, log
    assert "never awaited" not in log, log


@pytest.fixture
def target(served: tuple[SSHTarget, HarnessProcess]) -> SSHTarget:
    return served[0]


def test_importing_ssh_does_not_import_asyncssh() -> None:
    code = (
        "import sys; import stockade.agent.ssh as s; assert 'asyncssh' not in sys.modules;"
        " print(s.ssh_available())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    ).stdout
    assert out.strip() == "(True, '')"


def test_a_host_key_that_is_not_one_is_refused() -> None:
    from stockade.agent.ssh import InvalidHostKey, WorkspaceSSHServer

    with pytest.raises(InvalidHostKey, match="host key"):
        WorkspaceSSHServer("not a key", environment=dict, cwd=lambda: "/")


def test_unknown_host_key_is_refused(target: SSHTarget, tmp_path: Path) -> None:
    other = tmp_path / "known_hosts"
    _, wrong = make_host_key(tmp_path)
    write_known_hosts(other, target.host, target.port, wrong)
    bad = SSHTarget(target.host, target.port, other, target.home)
    result = bad.exec("true")
    assert result.returncode == 255
    assert b"host key" in result.stderr.lower()


def test_exec_status_streams_and_stdin(target: SSHTarget) -> None:
    result = target.exec("echo out; echo err >&2; exit 3")
    assert (result.returncode, result.stdout, result.stderr) == (3, b"out\n", b"err\n")

    # stdout and stderr interleaved, large, complete and separate; stderr
    # outlives stdout (closed first), and still arrives in full.
    script = (
        "for i in $(seq 1 2000); do echo out-$i; echo err-$i >&2; done; "
        "exec 1>&-; sleep 0.3; head -c 300000 /dev/zero | tr '\\0' e >&2; exit 0"
    )
    result = target.exec(script)
    assert result.returncode == 0
    assert result.stdout == "".join(f"out-{i}\n" for i in range(1, 2001)).encode()
    expected_err = "".join(f"err-{i}\n" for i in range(1, 2001)).encode() + b"e" * 300000
    assert result.stderr == expected_err

    # stdin EOF reaches the command.
    result = target.exec("cat", input=b"hi\n")
    assert (result.returncode, result.stdout) == (0, b"hi\n")
    payload = os.urandom(3_000_000)
    result = target.exec("sha256sum", input=payload)
    assert result.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()


def test_environment_cwd_and_login_shell(target: SSHTarget) -> None:
    result = target.exec(
        'echo "$FOO|$BAR|$STOCKADE_WORKSPACE|$HOME|$(pwd)"',
        "-o",
        "SetEnv=FOO=set-env",
        "-o",
        "SendEnv=BAR",
    )
    env_home = str(target.home)
    assert result.stdout.decode().strip() == f"set-env||harness|{env_home}|{env_home}"
    sent = subprocess.run(
        target.ssh_argv("-o", "SendEnv=BAR", target.host, 'echo "$BAR"'),
        capture_output=True,
        env={**os.environ, "BAR": "sent-env"},
        check=False,
    )
    assert sent.stdout == b"sent-env\n"
    # A shell session without a command: a login shell reading stdin.
    result = target.run("-T", target.host, input=b'echo "$0"; exit 4\n')
    assert result.returncode == 4
    assert result.stdout.decode().strip().startswith("-")


class PtyClient:
    """The real ssh client on a terminal of our own, as a person runs it."""

    def __init__(self, argv: list[str], rows: int, cols: int, env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        self.resize(rows, cols)
        self.process = subprocess.Popen(
            argv,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            start_new_session=True,
            env=env,
        )
        os.close(slave)
        self.output = b""

    def resize(self, rows: int, cols: int) -> None:
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 15.0) -> re.Match[bytes]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern.encode())
        while True:
            match = regex.search(self.output)
            if match:
                self.output = self.output[match.end() :]
                return match
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen; output: {self.output!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:
                    time.sleep(0.05)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        os.close(self.master)


def test_pty_shell_term_and_window_size(target: SSHTarget) -> None:
    env = {**os.environ, "TERM": "xterm-256color"}
    client = PtyClient(target.ssh_argv("-tt", target.host), 40, 100, env)
    try:
        client.send("echo TERM=$TERM; stty size; tty; echo $0\n")
        client.expect(r"TERM=xterm-256color")
        client.expect(r"40 100")
        client.expect(r"/dev/pts/\d+")
        client.expect(r"-\w+")
        # A resize reaches the remote terminal (the client sends window-change
        # on SIGWINCH), and the foreground program gets SIGWINCH.
        waiter = (
            "python3 -c 'import os, signal; signal.pthread_sigmask(signal.SIG_BLOCK,"
            ' [signal.SIGWINCH]); print("wait" "ing", flush=True);'
            " signal.sigwait([signal.SIGWINCH]); s = os.get_terminal_size();"
            ' print("WINCH-%dx%d" % (s.lines, s.columns))\'\n'
        )
        client.send(waiter)
        client.expect("waiting")
        client.resize(50, 120)
        client.process.send_signal(signal.SIGWINCH)
        client.expect(r"WINCH-50x120")
        client.send("stty size\n")
        client.expect(r"50 120")
        client.send("exit 5\n")
        assert client.process.wait(timeout=15) == 5
    finally:
        client.close()


async def test_signals_reach_the_command(target: SSHTarget) -> None:
    # The OpenSSH client cannot send "signal" requests; asyncssh's client can.
    async with asyncssh.connect(
        target.host,
        target.port,
        known_hosts=str(target.known_hosts),
        username="anyone",
        client_keys=None,
        agent_path=None,
        config=None,
    ) as conn:
        process = await conn.create_process(
            "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done"
        )
        # Bounded waits: a signal that never arrives must fail the test, not hang the suite.
        assert (await asyncio.wait_for(process.stdout.readline(), 30)).strip() == "ready"
        process.send_signal("TERM")
        assert (await asyncio.wait_for(process.stdout.readline(), 30)).strip() == "got-term"
        result = await asyncio.wait_for(process.wait(), 30)
        assert result.exit_status == 7

        killed = await conn.run("kill -KILL $$", check=False)
        assert killed.exit_signal is not None
        assert killed.exit_signal[0] == "KILL"


def test_sftp_and_scp_both_ways(target: SSHTarget, tmp_path: Path) -> None:
    require_ssh_client("scp", "sftp")
    data = os.urandom(2_500_000)
    local = tmp_path / "up.bin"
    local.write_bytes(data)
    scp = ["scp", *target.options(), "-P", str(target.port)]
    # Relative remote paths start in the home; SFTP-based scp, then legacy.
    subprocess.run([*scp, str(local), f"{target.host}:up.bin"], check=True, timeout=60)
    assert (target.home / "up.bin").read_bytes() == data
    subprocess.run([*scp, "-O", str(local), f"{target.host}:up-legacy.bin"], check=True, timeout=60)
    assert (target.home / "up-legacy.bin").read_bytes() == data
    subprocess.run([*scp, f"{target.host}:up.bin", str(tmp_path / "down.bin")], check=True)
    subprocess.run([*scp, "-O", f"{target.host}:up.bin", str(tmp_path / "down2.bin")], check=True)
    assert (tmp_path / "down.bin").read_bytes() == data
    assert (tmp_path / "down2.bin").read_bytes() == data

    batch = f"mkdir sdir\nput {local} sdir/s.bin\nls sdir\nget sdir/s.bin {tmp_path}/s.bin\npwd\n"
    out = subprocess.run(
        ["sftp", *target.options(), "-P", str(target.port), "-b", "-", target.host],
        input=batch.encode(),
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    assert "sdir/s.bin" in out
    assert f"Remote working directory: {target.home}" in out
    assert (tmp_path / "s.bin").read_bytes() == data


def test_rsync_over_ssh(target: SSHTarget, tmp_path: Path) -> None:
    require_ssh_client("rsync")
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    for i in range(20):
        (src / "sub" / f"f{i}").write_bytes(os.urandom(10_000 + i))
    rsync = ["rsync", "-a", "-e", target.ssh_command()]
    subprocess.run([*rsync, f"{src}/", f"{target.host}:synced/"], check=True, timeout=60)
    for i in range(20):
        assert (target.home / "synced" / "sub" / f"f{i}").read_bytes() == (
            src / "sub" / f"f{i}"
        ).read_bytes()
    back = tmp_path / "back"
    subprocess.run([*rsync, f"{target.host}:synced/", f"{back}/"], check=True, timeout=60)
    assert sorted(p.name for p in (back / "sub").iterdir()) == sorted(
        p.name for p in (src / "sub").iterdir()
    )


def test_git_clone_and_push_over_ssh(target: SSHTarget, tmp_path: Path) -> None:
    require_ssh_client("git")
    bare = target.home / "repo.git"
    git_env = {
        **os.environ,
        "GIT_SSH_COMMAND": target.ssh_command(),
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
        "GIT_CONFIG_NOSYSTEM": "1",
        "HOME": str(tmp_path),
    }

    def git(*args: str, cwd: Path = tmp_path) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, env=git_env, capture_output=True, text=True, check=True
        ).stdout

    git("init", "-q", "--bare", "-b", "main", str(bare))
    url = f"ssh://{target.host}:{target.port}{bare}"
    git("clone", "-q", url, "work")
    work = tmp_path / "work"
    (work / "README").write_text("hello\n")
    git("add", "README", cwd=work)
    git("commit", "-q", "-m", "first", cwd=work)
    git("push", "-q", "origin", "HEAD:main", cwd=work)
    assert git("--git-dir", str(bare), "log", "--format=%s", "main").strip() == "first"
    git("clone", "-q", url, "again")
    assert (tmp_path / "again" / "README").read_text() == "hello\n"


class EchoServer:
    """A TCP echo server on loopback (a thread), for the forwarding tests."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def echo_through(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
        return received


def connect_when_listening(port: int, timeout: float = 10.0) -> None:
    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_until(listening, timeout, f"port {port}")


def test_local_and_remote_forwarding(target: SSHTarget) -> None:
    echo = EchoServer()
    try:
        local = free_port()
        forward = f"{local}:127.0.0.1:{echo.port}"
        tunnel = subprocess.Popen(
            target.ssh_argv("-N", "-o", "ExitOnForwardFailure=yes", "-L", forward, target.host)
        )
        try:
            connect_when_listening(local)
            payload = os.urandom(500_000)
            assert echo_through(local, payload) == payload
        finally:
            tunnel.terminate()
            tunnel.wait(timeout=10)

        # -R: the workspace listens on loopback, even when asked for every
        # interface, and connections come back to the client's side.
        remote = free_port()
        probe = (
            "python3 -c \"import socket; s = socket.create_connection(('127.0.0.1', "
            f"{remote})); s.sendall(b'ping'); s.shutdown(1); print(s.recv(10).decode())\"; "
            f"grep -i ':{remote:04X} ' /proc/net/tcp | awk '$4 == \"0A\" {{print $2}}'"
        )
        result = target.exec(
            probe, "-o", "ExitOnForwardFailure=yes", "-R", f"0.0.0.0:{remote}:127.0.0.1:{echo.port}"
        )
        assert result.returncode == 0, result.stderr
        lines = result.stdout.decode().split()
        assert lines[0] == "ping"
        assert lines[1:] == [f"0100007F:{remote:04X}"]  # 127.0.0.1 only
    finally:
        echo.close()


def test_agent_forwarding(target: SSHTarget, tmp_path: Path) -> None:
    require_ssh_client("ssh-agent", "ssh-add", "ssh-keygen")
    sock = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 10, "ssh-agent socket")
        key = tmp_path / "id_ed25519"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "forwarded-key", "-f", str(key)],
            check=True,
        )
        env = {**os.environ, "SSH_AUTH_SOCK": str(sock)}
        subprocess.run(["ssh-add", "-q", str(key)], env=env, check=True, capture_output=True)
        result = subprocess.run(
            target.ssh_argv("-A", target.host, 'test -S "$SSH_AUTH_SOCK" && ssh-add -l'),
            env=env,
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert b"forwarded-key" in result.stdout
        # Without -A there is no agent.
        result = subprocess.run(
            target.ssh_argv("-a", target.host, 'echo "[$SSH_AUTH_SOCK]"'),
            env=env,
            capture_output=True,
            check=False,
        )
        assert result.stdout == b"[]\n"
    finally:
        agent.terminate()
        agent.wait(timeout=10)


VSCODE_LIKE_SCRIPT = """
set -e
cat > "$HOME/fake-server.py" <<'EOF'
import http.server, os, socketserver
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"vscode-server here"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = socketserver.TCPServer(("127.0.0.1", 0), Handler)
with open(os.environ["HOME"] + "/fake-server.port.tmp", "w") as f:
    f.write(str(server.server_address[1]))
os.rename(os.environ["HOME"] + "/fake-server.port.tmp", os.environ["HOME"] + "/fake-server.port")
server.serve_forever()
EOF
rm -f "$HOME/fake-server.port"
nohup python3 "$HOME/fake-server.py" > "$HOME/fake-server.log" 2>&1 < /dev/null &
echo "serverPid==$!=="
while [ ! -f "$HOME/fake-server.port" ]; do sleep 0.05; done
echo "listeningOn==$(cat "$HOME/fake-server.port")=="
"""


def test_vscode_remote_ssh_flow(target: SSHTarget) -> None:
    # What VS Code Remote-SSH does: bash reads a script on stdin that starts
    # a server in the background and prints its port; then a forward to it.
    result = target.exec("bash", input=VSCODE_LIKE_SCRIPT.encode(), timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout.decode()
    port = int(re.search(r"listeningOn==(\d+)==", out).group(1))  # type: ignore[union-attr]
    pid = int(re.search(r"serverPid==(\d+)==", out).group(1))  # type: ignore[union-attr]
    try:
        # The server outlived the session that started it.
        time.sleep(0.3)
        assert not process_gone(pid)
        local = free_port()
        forward = f"{local}:127.0.0.1:{port}"
        tunnel = subprocess.Popen(
            target.ssh_argv("-N", "-o", "ExitOnForwardFailure=yes", "-L", forward, target.host)
        )
        try:
            connect_when_listening(local)
            with urllib.request.urlopen(f"http://127.0.0.1:{local}/", timeout=10) as response:
                assert response.read() == b"vscode-server here"
        finally:
            tunnel.terminate()
            tunnel.wait(timeout=10)
    finally:
        os.kill(pid, signal.SIGTERM)


def test_disconnect_hangs_up_the_session(
    served: tuple[SSHTarget, HarnessProcess], tmp_path: Path
) -> None:
    target, harness = served
    fds_before = harness.open_fds()
    # A command still running when its client vanishes is hung up and reaped.
    client = subprocess.Popen(
        target.ssh_argv(target.host, "echo $$; sleep 300 & echo $!; wait"),
        stdout=subprocess.PIPE,
    )
    assert client.stdout is not None
    shell_pid = int(client.stdout.readline())
    job_pid = int(client.stdout.readline())
    client.kill()
    client.wait()
    client.stdout.close()
    wait_until(lambda: process_gone(shell_pid) and process_gone(job_pid), 15, "hangup")

    # The same with a terminal: the shell and its job get SIGHUP.
    pty = PtyClient(target.ssh_argv("-tt", target.host), 24, 80, dict(os.environ))
    try:
        pty.send("echo SHELL=$$; sleep 300 & echo JOB=$!\n")
        shell_pid = int(pty.expect(r"SHELL=(\d+)").group(1))
        job_pid = int(pty.expect(r"JOB=(\d+)").group(1))
    finally:
        pty.close()
    wait_until(lambda: process_gone(shell_pid) and process_gone(job_pid), 15, "pty hangup")

    # Many sessions later, no descriptor and no child is left behind.
    for _ in range(10):
        assert target.exec("true").returncode == 0
        assert target.exec("true", "-tt").returncode == 0
    wait_until(lambda: harness.children() == [], 10, f"children reaped: {harness.children()}")
    wait_until(
        lambda: harness.open_fds() <= fds_before,
        10,
        f"fds back to {fds_before}: {os.listdir(f'/proc/{harness.process.pid}/fd')}",
    )


def test_server_close_ends_sessions(tmp_path: Path) -> None:
    require_ssh_client()
    home = tmp_path / "home"
    home.mkdir()
    key_file, public = make_host_key(tmp_path)
    harness = start_harness(key_file, home, tmp_path / "server.log")
    try:
        known = tmp_path / "known_hosts"
        write_known_hosts(known, "127.0.0.1", harness.port, public)
        target = SSHTarget("127.0.0.1", harness.port, known, home)
        client = subprocess.Popen(
            target.ssh_argv(target.host, "echo $$; exec sleep 300"), stdout=subprocess.PIPE
        )
        assert client.stdout is not None
        pid = int(client.stdout.readline())
        client.stdout.close()
        started = time.monotonic()
        assert harness.stop() == 0
        assert time.monotonic() - started < 15
        assert process_gone(pid)
        assert client.wait(timeout=10) == 255
    finally:
        if harness.process.poll() is None:
            harness.process.kill()
            harness.process.wait()
