"""``stockade provisionerd start`` as a separate process: builds of a server
without built-in workers run on it (and the agent they launch reports to the
server); a deleted key stops it; a daemon killed mid-build has its build
retried by another once the lease runs out. Every test deletes its
workspaces (through a daemon) and stops its daemons."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from stockade.devtools.server import ServerProcess
from stockade.sdk import ApiError, Client, types
from stockade.sdk.templates import build_archive
from tests.builds import agent_lines, build_lines, wait_for_agent, workspace_lock
from tests.conftest import OWNER_PASSWORD, ServerFactory

TEMPLATE = """\
name: {name}
backend: local
agent:
  startup_script: |
    echo "begin on $STOCKADE_PARAMETER_NOTE"
    sleep {sleep}
    echo "startup done"
parameters:
  - name: note
    type: string
    default: daemon
"""
SERVER_ENV = {"STOCKADE_PROVISIONER_WORKERS": "0", "STOCKADE_JOB_LEASE_SECONDS": "3"}


class Daemon:
    """A ``stockade provisionerd start`` subprocess, its log in a file."""

    def __init__(self, url: str, key: str, data_dir: Path, name: str, log: Path) -> None:
        self.name = name
        self.log_path = log
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
        env["STOCKADE_PROVISIONER_KEY"] = key  # the key from the environment
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "stockade", "provisionerd", "start", "--url", url,
                 "--data-dir", str(data_dir), "--name", name, "--backend", "local"],
                stdout=out, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.logs():
            assert time.monotonic() < deadline, f"{text!r} not in the log:\n{self.logs()}"
            assert self.process.poll() is None, f"the daemon exited:\n{self.logs()}"
            time.sleep(0.1)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the daemon did not stop on {sig}:\n{self.logs()}") from None


DaemonFactory = Callable[[str], Daemon]


class Setup:
    def __init__(self, server: ServerProcess, owner: Client, key: str, tmp_path: Path) -> None:
        self.server = server
        self.owner = owner
        self.key = key
        self.tmp_path = tmp_path
        self.daemons: list[Daemon] = []
        self.workspaces: list[str] = []

    def daemon(self, name: str, key: str | None = None) -> Daemon:
        made = Daemon(
            self.server.url,
            key or self.key,
            self.tmp_path / "provisionerd",  # one host: daemons share the data dir
            name,
            self.tmp_path / f"{name}.log",
        )
        self.daemons.append(made)
        return made

    def template(self, name: str, sleep: float) -> str:
        directory = self.tmp_path / name
        directory.mkdir()
        (directory / "stockade.yaml").write_text(TEMPLATE.format(name=name, sleep=sleep))
        self.owner.push_template(name, build_archive(directory))
        return name

    def create(self, name: str, template: str) -> types.Workspace:
        self.workspaces.append(name)
        return self.owner.create_workspace(name, template)

    def wait(self, name: str, timeout: float = 60.0) -> types.Workspace:
        deadline = time.monotonic() + timeout
        while True:
            ws = self.owner.get_workspace("owner", name)
            if ws.latest_build.status in ("succeeded", "failed", "canceled"):
                return ws
            assert time.monotonic() < deadline, f"{name} still {ws.status}: {ws}"
            time.sleep(0.1)

    def delete(self, name: str, timeout: float = 60.0) -> None:
        try:
            self.owner.create_build("owner", name, "delete", cancel_running=True)
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.owner.get_workspace("owner", name)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                return
            assert time.monotonic() < deadline, f"{name} was not deleted"
            time.sleep(0.1)


@pytest.fixture
def setup(start_server: ServerFactory, tmp_path: Path) -> Iterator[Setup]:
    server = start_server(env=SERVER_ENV)
    owner = Client(server.url)
    owner.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    owner.login("owner", OWNER_PASSWORD)
    key = owner.create_provisioner_key("test-host").key
    made = Setup(server, owner, key, tmp_path)
    yield made
    # Leave no sandbox behind: delete what is left through a daemon that works.
    left = [n for n in made.workspaces if _exists(owner, n)]
    if left:
        cleaner = made.daemon("cleaner", owner.create_provisioner_key("cleanup").key)
        for name in left:
            made.delete(name)
        cleaner.stop()
    for daemon in made.daemons:
        if daemon.process.poll() is None:
            daemon.stop(signal.SIGKILL)
    owner.close()


def _exists(owner: Client, name: str) -> bool:
    try:
        owner.get_workspace("owner", name)
    except ApiError as exc:
        if exc.status == 404:
            return False
        raise
    return True


def _carriers(workspace_id: str) -> list[int]:
    """Live processes whose environment names the workspace."""
    needle = f"STOCKADE_WORKSPACE_ID={workspace_id}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        if needle in environ and stat[stat.rindex(")") + 2] not in "ZXx":
            found.append(int(pid))
    return found


def test_builds_run_on_the_daemon_until_its_key_is_deleted(setup: Setup) -> None:
    template = setup.template("quick", sleep=0)
    daemon = setup.daemon("host-a")
    daemon.wait_for("provisionerd_started")
    created = setup.create("dev", template)
    ws = setup.wait("dev")
    assert ws.status == "running", ws.latest_build.error
    assert ws.latest_build.worker_name == "host-a"
    assert (setup.tmp_path / "provisionerd" / "workspaces" / created.id / "home").is_dir()
    # The build launched the agent; the agent, on the daemon's host, ran the
    # startup script and reported its output to the server.
    assert any(x.startswith("the agent runs") for x in build_lines(setup.owner, "owner", "dev"))
    ws = wait_for_agent(setup.owner, "owner", "dev")
    assert ws.agent is not None and ws.agent.lifecycle_state == "ready"
    assert agent_lines(setup.owner, "owner", "dev") == ["begin on daemon", "startup done"]
    assert _carriers(created.id)
    daemon.wait_for("build_finished")

    setup.owner.create_build("owner", "dev", "stop")
    assert setup.wait("dev").status == "stopped"
    assert not _carriers(created.id)
    setup.delete("dev")
    assert not (setup.tmp_path / "provisionerd" / "workspaces" / created.id).exists()

    # The daemon's egress guard counted its calls to the server and sent them
    # (at start, then every 10 s); the server's report shows them as its own.
    deadline = time.monotonic() + 25
    while True:
        sources = {
            (d.component, d.kind, d.destination, d.port, d.allowed)
            for d in setup.owner.egress_report().destinations
        }
        mine = ("provisionerd:host-a", "connect", "127.0.0.1", setup.server.port, True)
        if mine in sources or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert mine in sources, sources
    assert not any(not allowed for *_, allowed in sources), sources

    # Revoked: the daemon's next call (its long poll ends within 10 s) is
    # refused, and it stops with a message that says so.
    setup.owner.delete_provisioner_key("test-host")
    code = daemon.process.wait(30)
    assert code == 1, daemon.logs()
    assert "key_refused" in daemon.logs()
    assert "error: the server refused the provisioner key" in daemon.logs()


def test_a_killed_daemons_build_is_retried_by_another(setup: Setup) -> None:
    template = setup.template("slow", sleep=1)
    created = setup.create("dev", template)  # pending: no daemon runs yet
    retried = "retrying on host-b (attempt 2): the previous worker stopped answering"
    # A start build ends once the agent is launched. Holding the workspace's
    # lock (as a worker of another daemon on this host would) keeps it in
    # progress on host-a, and then on host-b, until the test lets go.
    with workspace_lock(setup.tmp_path / "provisionerd" / "workspaces", created.id):
        first = setup.daemon("host-a")
        deadline = time.monotonic() + 30
        while not any(x.endswith(" on host-a") for x in build_lines(setup.owner, "owner", "dev")):
            assert time.monotonic() < deadline, first.logs()
            time.sleep(0.1)
        assert setup.owner.get_build("owner", "dev", 1).status == "running"
        first.stop(signal.SIGKILL)

        second = setup.daemon("host-b")
        deadline = time.monotonic() + 30
        while retried not in (lines := build_lines(setup.owner, "owner", "dev")):
            assert time.monotonic() < deadline, (lines, second.logs())
            time.sleep(0.1)
        assert setup.owner.get_build("owner", "dev", 1).status == "running"
    ws = setup.wait("dev")
    assert ws.status == "running", ws.latest_build.error
    build = ws.latest_build
    assert build.number == 1 and build.attempts == 2 and build.worker_name == "host-b"
    lines = build_lines(setup.owner, "owner", "dev")
    assert any("stopped answering" in line for line in lines), lines
    assert lines.index(retried) < len(lines) - 1
    assert lines[-1].startswith("the agent runs"), lines
    assert len(_carriers(created.id)) >= 1
    # The agent host-b launched runs the startup script to its end.
    ws = wait_for_agent(setup.owner, "owner", "dev")
    assert ws.agent is not None and ws.agent.lifecycle_state == "ready"
    assert agent_lines(setup.owner, "owner", "dev") == ["begin on daemon", "startup done"]

    setup.delete("dev")
    assert not _carriers(created.id)
    assert second.stop() == 0
    assert "provisionerd_stopped" in second.logs()


def test_an_unreachable_server_is_retried_not_fatal(tmp_path: Path) -> None:
    """No server at the URL: the daemon logs and retries until stopped."""
    daemon = Daemon("http://127.0.0.1:9", "no-key", tmp_path / "data", "lonely", tmp_path / "log")
    try:
        daemon.wait_for("server_unreachable")
        time.sleep(1.5)
        assert daemon.process.poll() is None
        assert daemon.logs().count("server_unreachable") >= 2
    finally:
        assert daemon.stop() == 0
    assert "provisionerd_stopping signal=SIGTERM" in daemon.logs()
