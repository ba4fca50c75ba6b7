"""The local backend against the real bubblewrap: sandbox properties, the
lifecycle (start, adopt, update, stop, delete), reconcile, and the unsandboxed
opt-in. Every test kills what it started (the ``local`` fixture reconciles
everything away and checks no process of its workspaces is left)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from stockade.provisioner.backends.base import BackendError, BackendOptions, WorkspaceSpec
from stockade.provisioner.backends.local import LocalBackend
from stockade.sdk.templates import Compute, resolve_compute
from tests.conftest import require
from tests.provisioner.conftest import RecordedProgress, SpecFactory, stop_local_workspaces

ROOT = os.geteuid() == 0


async def settled_carriers(workspace_id: str) -> list[int]:
    """The workspace's pids once they stop changing: right after a start the
    bootstrap still starts and ends helper processes (python for the bundle
    fetch), so one reading may catch one of them."""
    previous = sorted(carriers(workspace_id))
    deadline = time.monotonic() + 15
    while True:
        await asyncio.sleep(0.4)
        current = sorted(carriers(workspace_id))
        if current == previous or time.monotonic() > deadline:
            return current
        previous = current


def carriers(workspace_id: str) -> list[int]:
    """Pids of live processes whose environment names the workspace."""
    needle = f"STOCKADE_WORKSPACE_ID={workspace_id}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle in handle.read().split(b"\0"):
                    found.append(int(name))
        except OSError:
            continue
    return found


def proc_alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            data = handle.read()
    except OSError:
        return False
    return data[data.rindex(")") + 2] not in "ZXx"


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def ns_pids(pid: int) -> list[str]:
    """A process's pid in each pid namespace it belongs to, outermost first."""
    with open(f"/proc/{pid}/status") as handle:
        return next(line for line in handle if line.startswith("NSpid:")).split()[1:]


def kill_all(workspace_id: str) -> None:
    for pid in carriers(workspace_id):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


async def wait_gone(workspace_id: str, timeout: float = 5.0) -> list[int]:
    """The workspace's processes once they are gone, or what is left at the timeout
    (a process may take a moment to exit after its pid namespace dies)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        left = [pid for pid in carriers(workspace_id) if proc_alive(pid)]
        if not left or asyncio.get_running_loop().time() > deadline:
            return left
        await asyncio.sleep(0.02)


class Local:
    """A backend under test and the workspaces it made (cleaned up after)."""

    def __init__(self, backend: LocalBackend, workspaces_dir: Path) -> None:
        self.backend = backend
        self.dir = workspaces_dir
        self.ids: set[str] = set()

    def track(self, spec: WorkspaceSpec) -> WorkspaceSpec:
        self.ids.add(spec.workspace_id)
        return spec


@pytest.fixture
def bwrap() -> str:
    path = shutil.which("bwrap")
    require("bubblewrap", path is not None, "apt-get install -y bubblewrap")
    assert path is not None
    return path


async def _cleanup(local: Local) -> None:
    local.backend.reconcile_grace_seconds = 0
    await local.backend.reconcile(set())
    leftovers = {ws: await wait_gone(ws) for ws in local.ids}
    for ws in local.ids:
        kill_all(ws)
    assert not any(leftovers.values()), f"processes left behind: {leftovers}"


@pytest.fixture
async def local(bwrap: str, tmp_path: Path) -> AsyncIterator[Local]:
    workspaces = tmp_path / "data" / "workspaces"
    local = Local(LocalBackend(BackendOptions(workspaces_dir=workspaces)), workspaces)
    try:
        yield local
    finally:
        await _cleanup(local)


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every uid can traverse: unsandboxed workspaces reach their
    home by its real path (pytest's tmp_path sits under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="stockade-local-"))
    path.chmod(0o711)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def unsandboxed(open_dir: Path) -> AsyncIterator[Local]:
    workspaces = open_dir / "workspaces"
    backend = LocalBackend(
        BackendOptions(workspaces_dir=workspaces, allow_unsandboxed=True), bwrap=None
    )
    local = Local(backend, workspaces)
    try:
        yield local
    finally:
        await _cleanup(local)


def script(spec_factory: SpecFactory, text: str, **overrides: object) -> WorkspaceSpec:
    return spec_factory(agent={"startup_script": text}, **overrides)


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        items = handle.read().decode(errors="replace").split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def workspace_environ(pid: int) -> dict[str, str]:
    """The environment of the sandbox's main process once it has exec'd the
    bootstrap: start() returns once that process exists, which may be
    before; until then /proc shows bwrap's environment (no HOME), not the
    workspace's."""
    deadline = time.monotonic() + 10
    while "STOCKADE_WORKSPACE_ID" not in (env := environ(pid)):
        assert time.monotonic() < deadline, "the workspace's main process never exec'd"
        time.sleep(0.01)
    return env


def in_workspace(local: Local, spec: WorkspaceSpec, state: dict[str, object], text: str) -> str:
    """Run ``text`` inside the running workspace, as its user, with its
    environment and in its home (the agent, which would run the startup
    script, has no server to talk to here): what a process of the workspace
    sees. Needs root (nsenter)."""
    require("root", ROOT, "run the tests as root (.ci/run does): nsenter needs it")
    run = json.loads((local.dir / spec.workspace_id / "run.json").read_text())
    env = workspace_environ(run["main_pid"])
    command = ["/bin/sh", "-c", f'cd "$HOME" 2>/dev/null; {text}']
    if run["sandboxed"]:
        command = [
            "nsenter", "--target", str(run["pid"]), "--mount", "--uts", "--ipc", "--pid",
            f"--setuid={run['uid']}", f"--setgid={run['gid']}", "--", *command,
        ]  # fmt: skip
    else:
        command = ["setpriv", f"--reuid={run['uid']}", f"--regid={run['gid']}", "--clear-groups",
                   "--", *command]  # fmt: skip
    # A file, not a pipe: background processes it starts keep their output open.
    with tempfile.TemporaryFile() as output:
        subprocess.run(
            command, env=env, stdout=output, stderr=subprocess.STDOUT, timeout=30, check=False
        )
        output.seek(0)
        return output.read().decode(errors="replace")


# --- lifecycle ----------------------------------------------------------------------------


async def test_the_agent_is_the_main_process_and_the_home_persists(
    local: Local, make_spec: SpecFactory, progress: RecordedProgress
) -> None:
    spec = local.track(make_spec(agent_token="tok-1", agent_bundle_sha256="ab" * 32))
    state = await local.backend.start(spec, {}, progress)
    # The build ends once the agent is launched: no startup script stage.
    assert progress.stages == ["Preparing home", "Starting sandbox"]
    assert "the agent runs" in progress.text() and "tok-1" not in progress.text()
    assert state["sandboxed"] is True and state["config_hash"] == spec.config_hash
    assert (await local.backend.status(spec.workspace_id, state)).state == "running"
    run = json.loads((local.dir / spec.workspace_id / "run.json").read_text())
    # The main process is the bootstrap (no server answers: it keeps trying).
    env = workspace_environ(run["main_pid"])
    assert env["STOCKADE_ACCESS_URL"] == spec.access_url
    assert env["STOCKADE_AGENT_TOKEN"] == "tok-1"
    assert env["STOCKADE_AGENT_BUNDLE_SHA256"] == "ab" * 32
    assert b"stockade-bootstrap" in cmdline(run["main_pid"])
    assert "tok-1" not in json.dumps(state) and "tok-1" not in json.dumps(run)
    (local.dir / spec.workspace_id / "home" / "kept.txt").write_text("kept-data\n")

    stopped = await local.backend.stop(spec, state, RecordedProgress())
    assert "pid" not in stopped
    assert (await local.backend.status(spec.workspace_id, stopped)).state == "stopped"
    assert not proc_alive(state["pid"])

    state2 = await local.backend.start(spec, stopped, RecordedProgress())
    assert (local.dir / spec.workspace_id / "home" / "kept.txt").read_text() == "kept-data\n"
    assert state2["pid"] != state["pid"]
    assert state2["uid"] == state["uid"]  # allocated once


async def test_an_agent_that_cannot_start_is_reported_with_its_output(
    local: Local, make_spec: SpecFactory, progress: RecordedProgress
) -> None:
    # No access URL: the bootstrap says so and exits, and the workspace with it.
    spec = local.track(make_spec(access_url=""))
    with contextlib.suppress(BackendError):  # when it is gone before start() looks
        await local.backend.start(spec, {}, progress)
    deadline = asyncio.get_running_loop().time() + 30
    while (status := await local.backend.status(spec.workspace_id, {})).state == "running":
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert status.state == "stopped"
    assert "STOCKADE_ACCESS_URL is not set" in status.detail


# --- the sandbox ----------------------------------------------------------------------------


async def test_sandbox_isolates_the_workspace(
    local: Local,
    make_spec: SpecFactory,
    progress: RecordedProgress,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STOCKADE_TEST_HOST_SECRET", "leaked")
    other = local.track(make_spec(workspace_name="other"))
    await local.backend.start(other, {}, RecordedProgress())
    other_home = local.dir / other.workspace_id / "home"
    probe = f"""
echo "pid=$$"
echo "procs=$(ls /proc | grep -c '^[0-9][0-9]*$')"
echo "host=$(hostname)"
echo "resolves=$(getent hosts "$(hostname)" | tr -s ' \t' ',')"
echo "uid=$(id -u)"
echo "user=$(id -un) home=$HOME pwd=$(pwd)"
touch /usr/stockade-probe 2>/dev/null && echo usr=writable || echo usr=readonly
touch /etc/stockade-probe 2>/dev/null && echo etc=writable || echo etc=readonly
touch $HOME/probe && echo home=writable || echo home=readonly
test -e {local.dir} && echo data=visible || echo data=hidden
test -e {other_home} && echo other=visible || echo other=hidden
ls /home
echo "secret=${{STOCKADE_TEST_HOST_SECRET:-unset}} token=$AGENT_TOKEN url=$STOCKADE_ACCESS_URL"
echo "marker=${{STOCKADE_SANDBOX_OF:-unset}}"
"""
    spec = local.track(
        make_spec(workspace_name="box-1", env={"AGENT_TOKEN": "tok-123"}, agent_token="tok-123")
    )
    state = await local.backend.start(spec, {}, progress)
    output = in_workspace(local, spec, state, probe)
    lines = output.splitlines()
    seen = dict(line.split("=", 1) for line in lines if "=" in line and " " not in line)
    # Its own pid namespace: the startup script sees a handful of processes
    # with small pids, and the recorded process is pid 1 of that namespace.
    assert int(seen["pid"]) < 10 and int(seen["procs"]) < 10
    assert ns_pids(state["pid"])[1:] == ["1"]
    assert seen["host"] == "box-1"
    # Its name resolves in the sandbox's own hosts file, not through DNS.
    assert seen["resolves"] == "127.0.1.1,box-1", seen
    assert seen["usr"] == "readonly" and seen["etc"] == "readonly"
    assert seen["home"] == "writable"
    assert seen["data"] == "hidden" and seen["other"] == "hidden"
    assert "user=alice home=/home/alice pwd=/home/alice" in output
    assert "alice" in lines  # the only home there
    assert f"secret=unset token=tok-123 url={spec.access_url}" in output
    assert seen["marker"] == "unset"
    # The environment (the agent's token) is on no command line on the host.
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    assert not [pid for pid in pids if b"tok-123" in cmdline(pid)]
    if ROOT:
        assert seen["uid"] != "0" and int(seen["uid"]) == state["uid"]
        home = local.dir / spec.workspace_id / "home"
        info = home.stat()
        assert info.st_uid == state["uid"] and stat.S_IMODE(info.st_mode) == 0o700
        assert (home / "probe").stat().st_uid == state["uid"]
        other_state = await local.backend.status(other.workspace_id, {})
        assert other_state.state == "running"
        other_uid = (local.dir / other.workspace_id / "home").stat().st_uid
        assert other_uid not in (0, state["uid"])
    for path in (local.dir, local.dir / spec.workspace_id):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700


async def test_environment_cannot_smuggle_sandbox_options(
    local: Local, make_spec: SpecFactory
) -> None:
    # bwrap's options are NUL-separated: a NUL in a value must not add one.
    for env in (
        {"STOCKADE_PARAMETER_X": "a\0--bind\0/\0/host"},
        {"BAD=NAME": "x"},
        {"": "x"},
    ):
        spec = local.track(make_spec(env=env))
        with pytest.raises(BackendError) as caught:
            await local.backend.start(spec, {}, RecordedProgress())
        assert caught.value.reason == "invalid_spec"
        assert carriers(spec.workspace_id) == []


async def test_stop_leaves_no_process(
    local: Local, make_spec: SpecFactory, progress: RecordedProgress
) -> None:
    # Background processes that leave the process group and ignore SIGTERM.
    spec = local.track(make_spec())
    state = await local.backend.start(spec, {}, progress)
    in_workspace(
        local,
        spec,
        state,
        "setsid sleep 1000 &\n(trap '' TERM; sleep 1001) &\nnohup sleep 1002 >/dev/null 2>&1 &",
    )
    # All three run (once forked they may take a moment to exec sleep), and
    # so does the agent's bootstrap, whose helper processes come and go.
    sleeps = {f"sleep\0{n}\0".encode() for n in (1000, 1001, 1002)}
    deadline = time.monotonic() + 10
    while not sleeps <= (seen := {cmdline(pid) for pid in carriers(spec.workspace_id)}):
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.05)
    run = json.loads((local.dir / spec.workspace_id / "run.json").read_text())
    assert run["main_pid"] in carriers(spec.workspace_id)
    await local.backend.stop(spec, state, RecordedProgress())
    assert not proc_alive(state["pid"])
    assert await wait_gone(spec.workspace_id) == []
    # Stopping a stopped workspace succeeds.
    await local.backend.stop(spec, {}, RecordedProgress())


async def test_a_new_backend_adopts_the_running_workspace(
    local: Local, make_spec: SpecFactory, progress: RecordedProgress
) -> None:
    spec = local.track(make_spec(agent_token="tok-1"))
    state = await local.backend.start(spec, {}, progress)
    before = await settled_carriers(spec.workspace_id)

    # A restarted server: a new backend object, the state from the database.
    restarted = LocalBackend(BackendOptions(workspaces_dir=local.dir))
    again = RecordedProgress()
    state2 = await restarted.start(spec, state, again)
    assert state2 == state
    assert "Starting sandbox" not in again.stages
    assert await settled_carriers(spec.workspace_id) == before
    # Even with the state lost, the workspace is found by name.
    assert (await restarted.start(spec, {}, RecordedProgress()))["pid"] == state["pid"]
    # A new start build brings a new token (the old one is revoked): the
    # processes are replaced, or the agent could never connect again.
    renewed = RecordedProgress()
    state3 = await restarted.start(dataclasses.replace(spec, agent_token="tok-2"), state, renewed)
    assert state3["pid"] != state["pid"] and not proc_alive(state["pid"])
    assert "with this build's agent" in renewed.text()


async def test_concurrent_starts_make_one_sandbox_and_distinct_uids(
    local: Local, make_spec: SpecFactory
) -> None:
    spec = local.track(make_spec())
    first, second = await asyncio.gather(
        local.backend.start(spec, {}, RecordedProgress()),
        LocalBackend(BackendOptions(workspaces_dir=local.dir)).start(spec, {}, RecordedProgress()),
    )
    assert first["pid"] == second["pid"]
    others = [local.track(make_spec()) for _ in range(3)]
    states = await asyncio.gather(*(local.backend.start(s, {}, RecordedProgress()) for s in others))
    assert len({s["uid"] for s in [first, *states]}) == (4 if ROOT else 1)


async def test_a_changed_configuration_restarts_and_keeps_the_home(
    local: Local, make_spec: SpecFactory
) -> None:
    workspace_id = str(uuid.uuid4())
    v1 = local.track(script(make_spec, "echo v1", workspace_id=workspace_id))
    state = await local.backend.start(v1, {}, RecordedProgress())
    (local.dir / workspace_id / "home" / "version.txt").write_text("v1\n")
    v2 = script(make_spec, "echo v2", workspace_id=workspace_id)
    assert v2.config_hash != v1.config_hash
    progress = RecordedProgress()
    state2 = await local.backend.start(v2, state, progress)
    assert (local.dir / workspace_id / "home" / "version.txt").read_text() == "v1\n"
    assert "Stopping the old processes" in progress.stages
    assert state2["pid"] != state["pid"] and not proc_alive(state["pid"])
    assert state2["config_hash"] == v2.config_hash


async def test_cancelled_start_leaves_a_workspace_that_stops_cleanly(
    local: Local, make_spec: SpecFactory, progress: RecordedProgress
) -> None:
    spec = local.track(make_spec())
    task = asyncio.create_task(local.backend.start(spec, {}, progress))
    for _ in range(5000):
        if "Starting sandbox" in progress.stages:
            break
        await asyncio.sleep(0.001)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await local.backend.stop(spec, {}, RecordedProgress())
    assert await wait_gone(spec.workspace_id) == []


async def test_delete_removes_everything(local: Local, make_spec: SpecFactory) -> None:
    spec = local.track(make_spec())
    state = await local.backend.start(spec, {}, RecordedProgress())
    if ROOT:
        in_workspace(local, spec, state, "mkdir -p deep/er && chmod 0500 deep && touch x")
    progress = RecordedProgress()
    await local.backend.delete(spec, state, progress)
    assert progress.stages == ["Stopping processes", "Removing home"]
    assert not (local.dir / spec.workspace_id).exists()
    assert await wait_gone(spec.workspace_id) == []
    assert (await local.backend.status(spec.workspace_id, state)).state == "missing"
    # Deleting and stopping what is gone succeed; reconcile tidies the lock
    # file that stop made.
    await local.backend.delete(spec, state, RecordedProgress())
    await local.backend.stop(spec, {}, RecordedProgress())
    assert await local.backend.reconcile(set()) == []
    assert list((local.dir / ".locks").glob("*-*.lock")) == []


async def test_reconcile_removes_orphans_and_keeps_live_workspaces(
    local: Local, make_spec: SpecFactory, tmp_path: Path
) -> None:
    live = local.track(make_spec())
    orphan = local.track(make_spec())
    stopped_orphan = local.track(make_spec())
    live_state = await local.backend.start(live, {}, RecordedProgress())
    orphan_state = await local.backend.start(orphan, {}, RecordedProgress())
    await local.backend.start(stopped_orphan, {}, RecordedProgress())
    await local.backend.stop(stopped_orphan, {}, RecordedProgress())
    # Things in the workspaces dir reconcile must leave alone.
    (local.dir / "not-a-workspace").mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("keep me")
    (local.dir / str(uuid.uuid4())).symlink_to(outside)

    # Just made: their workspaces may be newer than the live set, so they stay.
    assert await local.backend.reconcile({live.workspace_id}) == []
    local.backend.reconcile_grace_seconds = 0
    found = await local.backend.reconcile({live.workspace_id})

    assert sorted((o.kind, o.workspace_id) for o in found) == sorted(
        [
            ("process", orphan.workspace_id),
            ("home", orphan.workspace_id),
            ("home", stopped_orphan.workspace_id),
        ]
    )
    assert str(orphan_state["pid"]) in {o.name for o in found if o.kind == "process"}
    assert await wait_gone(orphan.workspace_id) == []
    assert not (local.dir / orphan.workspace_id).exists()
    assert not (local.dir / stopped_orphan.workspace_id).exists()
    assert (await local.backend.status(live.workspace_id, live_state)).state == "running"
    assert (local.dir / "not-a-workspace").is_dir()
    assert (outside / "precious").read_text() == "keep me"
    assert await local.backend.reconcile({live.workspace_id}) == []


async def test_invalid_workspace_ids_are_refused(local: Local) -> None:
    for bad in ("../../etc", "not-a-uuid", str(uuid.uuid4()).upper()):
        with pytest.raises(BackendError) as caught:
            await local.backend.status(bad, {})
        assert caught.value.reason == "invalid_workspace_id"


async def test_unenforced_limits_are_warned_about(
    local: Local, make_spec: SpecFactory, progress: RecordedProgress
) -> None:
    # "compute" names the spec's resolved field in make_spec, not the manifest's.
    compute = Compute(cpu=1.5, memory="512MiB", home_size="1GiB")
    spec = local.track(make_spec(compute=resolve_compute(compute, {})))
    await local.backend.start(spec, {}, progress)
    warnings = [line for level, line in progress.lines if level == "warn"]
    assert any("not enforced" in line and "cpu=1.5" in line for line in warnings)
    assert any("home_size" in line for line in warnings)


# --- without bubblewrap ------------------------------------------------------------------------


async def test_without_bwrap_start_is_refused(tmp_path: Path, make_spec: SpecFactory) -> None:
    backend = LocalBackend(BackendOptions(workspaces_dir=tmp_path / "ws"), bwrap=None)
    assert backend.sandboxed is False
    with pytest.raises(BackendError) as caught:
        await backend.start(make_spec(), {}, RecordedProgress())
    assert caught.value.reason == "sandbox_unavailable"
    assert "apt-get install bubblewrap" in caught.value.message
    assert "--local-allow-unsandboxed" in caught.value.message
    assert not (tmp_path / "ws").exists()


async def test_unsandboxed_opt_in_runs_and_warns_at_every_start(
    unsandboxed: Local, make_spec: SpecFactory, progress: RecordedProgress
) -> None:
    spec = unsandboxed.track(make_spec())
    backend = unsandboxed.backend
    state = await backend.start(spec, {}, progress)
    home = unsandboxed.dir / spec.workspace_id / "home"
    assert state["sandboxed"] is False
    assert progress.stages == ["Preparing home", "Starting processes"]
    assert any(level == "warn" and "NOT sandboxed" in line for level, line in progress.lines)
    run = json.loads((unsandboxed.dir / spec.workspace_id / "run.json").read_text())
    assert os.readlink(f"/proc/{run['main_pid']}/cwd") == str(home)
    if ROOT:
        assert os.stat(f"/proc/{run['main_pid']}").st_uid == state["uid"] != 0
        output = in_workspace(
            unsandboxed, spec, state, "setsid sleep 1000 &\n(trap '' TERM; sleep 1001) &\necho ok"
        )
        assert "ok" in output
    (home / "kept.txt").write_text("kept\n")
    adopted = RecordedProgress()
    await backend.start(spec, state, adopted)
    assert any(level == "warn" and "NOT sandboxed" in line for level, line in adopted.lines)

    await backend.stop(spec, state, RecordedProgress())
    assert await wait_gone(spec.workspace_id) == []
    await backend.start(spec, {}, RecordedProgress())
    assert (home / "kept.txt").read_text() == "kept\n"
    await backend.delete(spec, {}, RecordedProgress())
    assert await wait_gone(spec.workspace_id) == []
    assert not home.exists()


async def test_unsandboxed_home_out_of_reach_is_warned_about(
    tmp_path: Path, make_spec: SpecFactory, progress: RecordedProgress
) -> None:
    require("root", ROOT, "run the tests as root (.ci/run does): only root gives own uids")
    # pytest's base temporary directory is 0700, as a data dir is.
    workspaces = tmp_path / "workspaces"
    backend = LocalBackend(
        BackendOptions(workspaces_dir=workspaces, allow_unsandboxed=True), bwrap=None
    )
    local = Local(backend, workspaces)
    try:
        await backend.start(local.track(make_spec()), {}, progress)
        warnings = [line for level, line in progress.lines if level == "warn"]
        closed = [d for d in workspaces.parents if f"{d} is not searchable" in " ".join(warnings)]
        assert closed and not closed[0].stat().st_mode & stat.S_IXOTH
    finally:
        await _cleanup(local)


def test_stop_local_workspaces_helper_cleans_up_after_a_server(
    bwrap: str, tmp_path: Path, make_spec: SpecFactory
) -> None:
    workspaces = tmp_path / "server" / "workspaces"
    spec = make_spec()
    try:
        backend = LocalBackend(BackendOptions(workspaces_dir=workspaces))
        asyncio.run(backend.start(spec, {}, RecordedProgress()))
        assert carriers(spec.workspace_id)
        assert stop_local_workspaces(workspaces) == [spec.workspace_id]
        assert [pid for pid in carriers(spec.workspace_id) if proc_alive(pid)] == []
        assert stop_local_workspaces(tmp_path / "nothing-here") == []
    finally:
        kill_all(spec.workspace_id)
