"""The ``local`` backend: each workspace is a home directory under the data dir
and processes on the server host, inside a bubblewrap sandbox.

Layout (``options.workspaces_dir``, directories 0700)::

    <workspace id>/home/     the home directory (owned by the workspace's uid)
    <workspace id>/uid       the workspace's uid (= gid), allocated once
    <workspace id>/run.json  the running compute: pid, start time, config hash...
    <workspace id>/agent.log the agent's own log (bootstrap and agent) for the current run
    <workspace id>/ca.pem    the control plane's private CA, when it has one (0644)
    .locks/                  per-workspace and uid-allocation file locks

The sandbox (``bwrap``): its own pid, ipc and uts namespaces (hostname = the
workspace name), ``/usr`` and ``/etc`` read-only, a fresh ``/proc``, ``/dev``
and ``/tmp``, and the home bind-mounted read-write at ``/home/<owner>``
(``/etc/passwd`` and ``/etc/group`` gain an entry for the owner, so tools that
look the user up work), and the control plane's private CA, if any, read-only at
``SANDBOX_CA_PATH``. Nothing else of the host is visible (not the data dir,
not other homes). The environment is only what the workspace is given; it
reaches bwrap through a file descriptor (``--args``), never a command line,
because it holds the agent's token. The network namespace is shared: the
agent must reach the control plane.

Who the processes run as:

* **server as root**: each workspace gets its own uid/gid (from ``UID_BASE``
  up, skipping ids that exist in the passwd/group databases or in
  ``/etc/subuid``/``/etc/subgid`` ranges). bwrap runs privileged (as root,
  like a setuid bwrap) and its first command, ``setpriv``, drops to that uid
  with no capabilities, an empty bounding set and ``no_new_privs`` before the
  bootstrap runs. bwrap cannot run *as* that uid here: the home lives under
  the 0700 data dir, which an unprivileged bwrap cannot traverse (it resolves
  every bind source by path, even with ``--bind-fd``).
* **server as another user**: the workspaces run as the server's user, in an
  unprivileged bwrap (a user namespace; Debian 12 allows it).

Uids are allocated per workspaces dir: two deployments on one host (two
workspaces dirs) can hand out the same uid; give each its own host, or run
only one as root.

Processes are started detached (``setsid --fork``, no ``--die-with-parent``):
they keep running when the server stops, and a restarted server finds them
again through ``run.json`` (pid *and* start time, so a reused pid is never
mistaken for the workspace). The intermediate ``setsid`` exits at once and is
reaped; the sandbox is reparented to init, so the server keeps no zombies and
no ``Popen`` object outlives the launch. bwrap reports the pid of the
sandbox's pid 1 on ``--info-fd``: killing it kills everything in the
workspace, exactly. The workspace's main process is the agent (pid 2 inside: the
bootstrap shell, which execs the agent once it has its bundle); the workspace
*runs* while it does: bwrap's pid 1 outlives it as long as any straggler does.
To stop, the process group gets SIGTERM (the agent reports shutting_down and
off, then exits), and once the agent is gone (or after ``STOP_TIMEOUT``) pid 1
gets SIGKILL.

Without bwrap the backend refuses to start workspaces unless the owner has
opted in (``allow_unsandboxed``); the processes then run directly on the host
(as the workspace's uid when the server is root; that uid must be able to
traverse to its home, so the data dir must then be ``o+x`` or the workspaces
dir elsewhere) and every start logs a warning. Stopping an unsandboxed
workspace kills its process group and every process that carries its
``STOCKADE_WORKSPACE_ID`` in its environment.

CPU and memory limits are not enforced (a warning says so when a template sets
them): that needs cgroup v2 with the cpu and memory controllers delegated, which
the hosts this was built on (a cgroup v1/v2 hybrid) do not offer. ``home_size``
is not enforced either.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import fcntl
import functools
import grp
import json
import os
import pwd
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from stockade.agent.bundle import BOOTSTRAP_SCRIPT
from stockade.provisioner.backends.base import (
    AGENT_STOP_SECONDS,
    Backend,
    BackendError,
    BackendOptions,
    ComputeStatus,
    Orphan,
    Progress,
    WorkspaceSpec,
    agent_environment,
    token_fingerprint,
)

# The first uid/gid given to a workspace when the server runs as root. Ids in
# use by accounts or by subordinate ranges (/etc/subuid) are skipped.
UID_BASE = 200_000
# Stay below 2**31: some tools still treat uids as signed.
UID_LIMIT = 2**31 - 2
# How long a workspace gets to exit after SIGTERM before SIGKILL: its agent
# reports shutting_down and off in that time.
STOP_TIMEOUT = AGENT_STOP_SECONDS + 1.0
# How long the launcher may take to report the sandbox's pid.
LAUNCH_TIMEOUT = 15.0
# Lines of the agent's log quoted when the compute dies as it starts.
TAIL_LINES = 20
PATH_VALUE = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Top-level system directories given to the sandbox (read-only) when present.
SYSTEM_DIRS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RUN_FILE = "run.json"
_UID_FILE = "uid"
_LOG_FILE = "agent.log"
_CA_FILE = "ca.pem"
# Where a sandboxed agent finds the control plane's private CA. Not under
# /etc as in docker workspaces: the sandbox's /etc is the host's, read-only,
# and bwrap cannot make a mount point in it; /run is on the sandbox's own root.
SANDBOX_CA_DIR = "/run/stockade"
SANDBOX_CA_PATH = f"{SANDBOX_CA_DIR}/ca.pem"
_HOME = "home"
_LOCKS = ".locks"
# In the environment of the bwrap processes of a workspace (not inside).
_SANDBOX_MARKER = "STOCKADE_SANDBOX_OF"


class _Find(enum.Enum):
    """``LocalBackend(bwrap=...)`` default: look ``bwrap`` up on the PATH."""

    ON_PATH = "on-path"


@dataclass(frozen=True)
class _Run:
    """What ``run.json`` records about the running compute."""

    # The sandbox's init (pid 1 of its pid namespace), or the init shell when
    # unsandboxed: it lives exactly as long as the workspace's compute.
    pid: int
    # Field 22 of /proc/<pid>/stat: tells a reused pid from ours.
    start_time: int
    # The process group everything was started in (the bwrap monitor's).
    pgid: int
    # The agent (pid 2 in the sandbox): the workspace runs while it does.
    # bwrap's pid 1 lingers until *every* process inside has exited.
    main_pid: int
    main_start_time: int
    config_hash: str
    uid: int
    gid: int
    sandboxed: bool
    started_at: float
    # token_fingerprint() of the agent's token: a start build with another
    # token replaces the processes (the old token is revoked).
    agent: str = ""

    def state(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "start_time": self.start_time,
            "uid": self.uid,
            "gid": self.gid,
            "sandboxed": self.sandboxed,
            "config_hash": self.config_hash,
        }


@dataclass(frozen=True)
class _Paths:
    workspace_id: str
    root: Path

    @property
    def home(self) -> Path:
        return self.root / _HOME

    @property
    def run(self) -> Path:
        return self.root / _RUN_FILE

    @property
    def log(self) -> Path:
        return self.root / _LOG_FILE

    @property
    def uid(self) -> Path:
        return self.root / _UID_FILE

    @property
    def ca(self) -> Path:
        return self.root / _CA_FILE


@dataclass(frozen=True)
class _ProcStat:
    state: str
    ppid: int
    pgrp: int
    start_time: int


class LocalBackend(Backend):
    """Workspaces as sandboxed processes on the provisioner's host."""

    name: ClassVar[str] = "local"

    def __init__(
        self, options: BackendOptions, *, bwrap: str | _Find | None = _Find.ON_PATH
    ) -> None:
        self.options = options
        self._bwrap = shutil.which("bwrap") if bwrap is _Find.ON_PATH else bwrap
        # bwrap resolves bind sources by path, so it needs an absolute one.
        self._dir = Path(os.path.abspath(options.workspaces_dir))
        self._root = os.geteuid() == 0

    @property
    def sandboxed(self) -> bool:
        """Whether workspaces run in a bubblewrap sandbox (the server warns
        at startup when they do not)."""
        return self._bwrap is not None

    # --- the contract ------------------------------------------------------------

    async def start(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]:
        """Start (or adopt) the workspace's processes, the agent first; see
        the contract in ``base``."""
        paths = self._paths(spec.workspace_id)
        user, hostname = _user_name(spec.owner_username), _host_name(spec.workspace_name)
        env = self._environment(spec, paths, user)
        if not self.sandboxed and not self.options.allow_unsandboxed:
            raise BackendError(
                "this server cannot sandbox workspaces: bubblewrap is not installed. "
                "Ask the administrator to install it (apt-get install bubblewrap) or to "
                "start the server with --local-allow-unsandboxed",
                reason="sandbox_unavailable",
            )
        await progress.stage("Preparing home")
        await self._warn_unenforced(spec, progress)
        async with self._locked(spec.workspace_id):
            uid, gid, unreachable = await asyncio.to_thread(self._prepare, paths)
            if unreachable is not None:
                await progress.log(
                    f"the workspace's user cannot reach its home: {unreachable} is not "
                    "searchable by other users (chmod o+x it, or keep the workspaces "
                    "directory elsewhere)",
                    level="warn",
                )
            run = await asyncio.to_thread(_read_run, paths)
            adopted = False
            if run is not None and await asyncio.to_thread(_running, run):
                same_agent = run.agent == token_fingerprint(spec.agent_token)
                if (
                    run.config_hash == spec.config_hash
                    and run.sandboxed == self.sandboxed
                    and same_agent
                ):
                    adopted = True
                    await progress.log(f"the workspace is already running (pid {run.pid})")
                else:
                    await progress.stage("Stopping the old processes")
                    await progress.log(
                        "the workspace's configuration changed; restarting it"
                        if same_agent
                        else "restarting the running workspace with this build's agent"
                    )
            if not adopted:
                # Also clears a run.json of dead processes and kills strays (a
                # worker killed between launching and recording leaves one).
                await self._terminate(paths, run, uid)
                await asyncio.to_thread(_install_ca, paths, spec.agent_ca)
                if self.sandboxed:
                    await progress.stage("Starting sandbox")
                else:
                    await progress.stage("Starting processes")
                run = await self._launch(spec, paths, (uid, gid), user, hostname, env)
        assert run is not None
        if not run.sandboxed:
            await progress.log(
                "this workspace is NOT sandboxed: its processes run directly on the server "
                "host (bubblewrap is not installed; install it with apt-get install bubblewrap)",
                level="warn",
            )
        if not adopted and not await asyncio.to_thread(_running, run):
            await asyncio.to_thread(_reap, run)
            raise _launch_failed(
                paths, "the workspace's agent exited as it started", reason="compute_exited"
            )
        await progress.log(
            f"the agent runs (pid {run.main_pid}); it runs the startup script and reports on "
            "the workspace (`stockade logs` shows its output)"
        )
        return run.state()

    async def stop(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]:
        """Stop every process of the workspace; the home stays."""
        paths = self._paths(spec.workspace_id)
        await progress.stage("Stopping processes")
        async with self._locked(spec.workspace_id):
            if not await asyncio.to_thread(_is_dir, paths.root):
                await self._terminate(paths, None, -1)
                await progress.log("the workspace has no files on this host; nothing to stop")
                return _without_process(state)
            run = await asyncio.to_thread(_read_run, paths)
            uid = await asyncio.to_thread(self._known_uid, paths)
            killed = await self._terminate(paths, run, uid)
        await progress.log(
            f"stopped the workspace's processes (pid {killed})"
            if killed is not None
            else "the workspace was not running"
        )
        return _without_process(state)

    async def delete(self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress) -> None:
        """Stop the workspace and remove its directory, home included."""
        paths = self._paths(spec.workspace_id)
        await progress.stage("Stopping processes")
        async with self._locked(spec.workspace_id) as lock_path:
            if await asyncio.to_thread(os.path.lexists, paths.root):
                run = await asyncio.to_thread(_read_run, paths)
                uid = await asyncio.to_thread(self._known_uid, paths)
                await self._terminate(paths, run, uid)
                await progress.stage("Removing home")
                await asyncio.to_thread(_remove_tree, paths.root)
                await progress.log("removed the workspace's home directory")
            else:
                await self._terminate(paths, None, -1)
                await progress.log("the workspace has no files on this host")
            # Waiters holding the old inode notice it is gone and retry.
            await asyncio.to_thread(_unlink, lock_path)

    async def status(self, workspace_id: str, state: dict[str, Any]) -> ComputeStatus:
        """``running`` when the recorded process lives, ``stopped`` when only
        the home is there, ``missing`` when nothing is."""
        paths = self._paths(workspace_id)
        return await asyncio.to_thread(_status, paths)

    async def reconcile(self, live: set[str]) -> list[Orphan]:
        """Kill the processes and remove the directory of every workspace
        under the workspaces dir that is not in ``live``."""
        names = await asyncio.to_thread(_workspace_dirs, self._dir)
        locks = await asyncio.to_thread(_lock_names, self._dir)
        orphans: list[Orphan] = []
        for workspace_id in sorted((set(names) | set(locks)) - live):
            paths = self._paths(workspace_id)
            async with self._locked(workspace_id) as lock_path:
                if not await asyncio.to_thread(_is_dir, paths.root):
                    # Only a lock file is left (a stop of a workspace with no
                    # files here made it).
                    await asyncio.to_thread(_unlink, lock_path)
                    continue
                if await asyncio.to_thread(_age_seconds, paths.root) < (
                    self.reconcile_grace_seconds
                ):
                    continue  # its workspace may be newer than ``live``
                run = await asyncio.to_thread(_read_run, paths)
                uid = await asyncio.to_thread(self._known_uid, paths)
                killed = await self._terminate(paths, run, uid)
                if killed is not None:
                    orphans.append(Orphan("process", str(killed), workspace_id))
                await asyncio.to_thread(_remove_tree, paths.root)
                orphans.append(Orphan("home", str(paths.root), workspace_id))
                await asyncio.to_thread(_unlink, lock_path)
        return orphans

    # --- preparing -----------------------------------------------------------------

    def _paths(self, workspace_id: str) -> _Paths:
        if not _is_workspace_id(workspace_id):
            raise BackendError(
                f"{workspace_id!r} is not a workspace id", reason="invalid_workspace_id"
            )
        return _Paths(workspace_id, self._dir / workspace_id)

    async def _warn_unenforced(self, spec: WorkspaceSpec, progress: Progress) -> None:
        compute = spec.compute
        limits = []
        if compute.cpu is not None:
            limits.append(f"cpu={compute.cpu:g}")
        if compute.memory_bytes is not None:
            limits.append(f"memory={compute.memory_bytes} bytes")
        if limits:
            await progress.log(
                f"CPU and memory limits are not enforced by the local backend "
                f"({', '.join(limits)}): the workspace can use all of the server's",
                level="warn",
            )
        if compute.home_bytes is not None:
            await progress.log(
                "home_size is not enforced by the local backend; the home can grow "
                "as large as the server's disk allows",
                level="warn",
            )

    def _prepare(self, paths: _Paths) -> tuple[int, int, Path | None]:
        """Create the directories and the uid (in a worker thread); also the
        directory that keeps an unsandboxed workspace from its home, if any."""
        _makedirs_private(self._dir)
        _mkdir_private(paths.root)
        uid, gid = self._uid(paths)
        _mkdir_private(paths.home)
        # Checked every time: a start killed between mkdir and chown must not
        # leave a home its owner cannot write.
        if self._root and os.lstat(paths.home).st_uid != uid:
            os.lchown(paths.home, uid, gid)
        unreachable = None
        if self._root and not self.sandboxed:
            # Unsandboxed, the workspace's uid reaches its home by its real path.
            for directory in (self._dir, paths.root):
                os.chmod(directory, 0o711)  # noqa: S103 - traverse only, no listing
            unreachable = next(
                (d for d in self._dir.parents if not os.stat(d).st_mode & stat.S_IXOTH), None
            )
        return uid, gid, unreachable

    def _known_uid(self, paths: _Paths) -> int:
        if not self._root:
            return os.getuid()
        try:
            return int(paths.uid.read_text())
        except (OSError, ValueError):
            return -1

    def _uid(self, paths: _Paths) -> tuple[int, int]:
        """The workspace's uid and gid; allocated on its first start."""
        if not self._root:
            return os.getuid(), os.getgid()
        with contextlib.suppress(OSError, ValueError):
            uid = int(paths.uid.read_text())
            return uid, uid
        # One allocation at a time, across tasks and processes: two workspaces
        # must never share a uid.
        with _blocking_lock(self._dir / _LOCKS / "uids.lock"):
            with contextlib.suppress(OSError, ValueError):
                uid = int(paths.uid.read_text())
                return uid, uid
            uid = _free_uid(self._dir)
            _write_atomic(paths.uid, f"{uid}\n")
            _write_atomic(self._dir / _LOCKS / "uid-next", f"{uid + 1}\n")
        return uid, uid

    # --- launching -------------------------------------------------------------------

    def _environment(self, spec: WorkspaceSpec, paths: _Paths, user: str) -> dict[str, str]:
        """The workspace's processes' whole environment (nothing of the server's)."""
        env = {
            "PATH": PATH_VALUE,
            "SHELL": "/bin/sh",
            "LANG": "C.UTF-8",
            **spec.env,
            "HOME": f"/home/{user}" if self.sandboxed else str(paths.home),
            "USER": user,
            "LOGNAME": user,
            "STOCKADE_WORKSPACE_ID": spec.workspace_id,
            "STOCKADE_WORKSPACE_NAME": spec.workspace_name,
            # The sandbox shares the host's network: the access URL works as is.
            **agent_environment(spec, ca_path=SANDBOX_CA_PATH if self.sandboxed else str(paths.ca)),
        }
        _check_env(env)
        return env

    async def _launch(
        self,
        spec: WorkspaceSpec,
        paths: _Paths,
        ids: tuple[int, int],
        user: str,
        hostname: str,
        env: dict[str, str],
    ) -> _Run:
        uid, gid = ids
        launch: Callable[[], _Run]
        if self.sandboxed:
            launch = functools.partial(
                self._launch_sandbox, spec, paths, uid, gid, user, hostname, env
            )
        else:
            launch = functools.partial(self._launch_unsandboxed, spec, paths, uid, gid, env)
        task = asyncio.ensure_future(asyncio.to_thread(launch))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The launch cannot be interrupted half-way; let it record the
            # process in run.json (under our lock) so the next build finds it.
            await asyncio.wait([task])
            raise

    def _launch_sandbox(
        self,
        spec: WorkspaceSpec,
        paths: _Paths,
        uid: int,
        gid: int,
        user: str,
        hostname: str,
        env: dict[str, str],
    ) -> _Run:
        assert self._bwrap is not None
        home = f"/home/{user}"
        fds: list[int] = []
        try:
            passwd = _memfd(
                "passwd",
                f"{user}:x:{uid}:{gid}:{user}:{home}:/bin/sh\n" + _read_or_empty("/etc/passwd"),
            )
            fds.append(passwd)
            group = _memfd("group", f"{user}:x:{gid}:\n" + _read_or_empty("/etc/group"))
            fds.append(group)
            # The sandbox's own name resolves locally, as in a container:
            # otherwise every tool that looks it up asks the site's DNS.
            hosts = _memfd("hosts", f"127.0.1.1\t{hostname}\n" + _read_or_empty("/etc/hosts"))
            fds.append(hosts)
            info_r, info_w = os.pipe()
            fds += [info_r, info_w]
            args = [
                "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--hostname", hostname,
                "--ro-bind", "/usr", "/usr",
                *_system_dir_args(),
                "--ro-bind", "/etc", "/etc",
                "--perms", "0644", "--ro-bind-data", str(passwd), "/etc/passwd",
                "--perms", "0644", "--ro-bind-data", str(group), "/etc/group",
                "--perms", "0644", "--ro-bind-data", str(hosts), "/etc/hosts",
                "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",  # noqa: S108 - the sandbox's own
                "--perms", "0755", "--dir", "/home",
                "--bind", str(paths.home), home,
                *(_ca_args(paths) if spec.agent_ca else []),
                "--chdir", home,
                "--info-fd", str(info_w),
                "--clearenv",
            ]  # fmt: skip
            for name, value in env.items():
                args += ["--setenv", name, value]
            command = ["/bin/sh", "-c", BOOTSTRAP_SCRIPT, "stockade-bootstrap"]
            if self._root:
                # Privileged bwrap keeps only what setpriv needs to become the
                # workspace's uid; setpriv then drops every capability for good.
                args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
                args += ["--cap-add", "CAP_SETPCAP"]
                command = [
                    _setpriv(), f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                    "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--",
                    *command,
                ]  # fmt: skip
            # The options go through a file descriptor, not the command line
            # that every user of the host can read: the environment holds the
            # agent's token, and the home's host path is nobody's business.
            argfd = _memfd("bwrap-args", "".join(a + "\0" for a in args))
            fds.append(argfd)
            self._spawn(
                [self._bwrap, "--args", str(argfd), "--", *command],
                paths,
                # bwrap itself carries only a marker, which finds it (and
                # through it the whole sandbox) should run.json ever be lost.
                env={"PATH": PATH_VALUE, _SANDBOX_MARKER: spec.workspace_id},
                pass_fds=(argfd, passwd, group, hosts, info_w),
            )
            os.close(info_w)
            fds.remove(info_w)
            info = _read_report(info_r, LAUNCH_TIMEOUT)
        finally:
            for fd in fds:
                os.close(fd)
        pid = info.get("child-pid") if isinstance(info, dict) else None
        if not isinstance(pid, int):
            raise _launch_failed(paths, "bubblewrap could not start the sandbox")
        return self._record(spec, paths, pid, uid, gid)

    def _launch_unsandboxed(
        self, spec: WorkspaceSpec, paths: _Paths, uid: int, gid: int, env: dict[str, str]
    ) -> _Run:
        report_r, report_w = os.pipe()
        try:
            # The shell reports its pid on its stdin (the pipe: fd 0 is the one
            # descriptor number every shell can name), swaps in /dev/null, then
            # becomes the bootstrap, then the agent (same pid).
            wrapper = 'echo "{\\"child-pid\\": $$}" >&0; exec </dev/null; exec /bin/sh -c "$1"'
            self._spawn(
                ["/bin/sh", "-c", wrapper, "stockade-init", BOOTSTRAP_SCRIPT],
                paths,
                env=env,
                stdin=report_w,
                user=(uid, gid) if self._root else None,
            )
            os.close(report_w)
            report_w = -1
            info = _read_report(report_r, LAUNCH_TIMEOUT)
        finally:
            os.close(report_r)
            if report_w >= 0:
                os.close(report_w)
        pid = info.get("child-pid") if isinstance(info, dict) else None
        if not isinstance(pid, int):
            raise _launch_failed(paths, "the workspace's init could not start")
        return self._record(spec, paths, pid, uid, gid)

    def _spawn(
        self,
        command: list[str],
        paths: _Paths,
        *,
        env: dict[str, str],
        pass_fds: tuple[int, ...] = (),
        stdin: int = subprocess.DEVNULL,
        user: tuple[int, int] | None = None,
    ) -> None:
        """Start ``command`` detached: ``setsid --fork`` exits as soon as it has
        forked the command into a new session, so the command is an orphan
        (reparented to init, which reaps it) and the server's only child is
        gone before this returns."""
        setsid = shutil.which("setsid")
        if setsid is None:
            raise BackendError(
                "the server host lacks setsid (util-linux); ask the administrator to "
                "install util-linux",
                reason="launcher_missing",
            )
        log = os.open(
            paths.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
        )
        try:
            extra: dict[str, Any] = {}
            if user is not None:
                extra = {"user": user[0], "group": user[1], "extra_groups": []}
            with subprocess.Popen(
                [setsid, "--fork", *command],
                stdin=stdin,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=paths.home,
                pass_fds=pass_fds,
                # The server's umask may be 077; bwrap's own directories
                # (/home) and the workspace's files want the usual 022.
                umask=0o022,
                **extra,
            ) as launcher:
                launcher.wait(timeout=LAUNCH_TIMEOUT)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BackendError(
                "the workspace's processes could not be started",
                reason="launch_failed",
                log_message=f"launching {command[0]} failed: {exc}",
            ) from exc
        finally:
            os.close(log)

    def _record(self, spec: WorkspaceSpec, paths: _Paths, pid: int, uid: int, gid: int) -> _Run:
        proc = _proc_stat(pid)
        if proc is None:
            # It has already died; start() reports its output.
            proc = _ProcStat("X", 0, 0, -1)
        main = (pid, proc.start_time)
        if self.sandboxed:
            main = _find_main(pid, proc.start_time, LAUNCH_TIMEOUT)
        run = _Run(
            pid=pid,
            start_time=proc.start_time,
            pgid=proc.pgrp,
            main_pid=main[0],
            main_start_time=main[1],
            config_hash=spec.config_hash,
            uid=uid,
            gid=gid,
            sandboxed=self.sandboxed,
            started_at=time.time(),
            agent=token_fingerprint(spec.agent_token),
        )
        _write_atomic(paths.run, json.dumps(asdict(run)))
        return run

    # --- stopping ------------------------------------------------------------------------

    async def _terminate(self, paths: _Paths, run: _Run | None, uid: int) -> int | None:
        """Stop everything of the workspace: SIGTERM, then SIGKILL after
        ``STOP_TIMEOUT``; then kill whatever still carries its id. Returns the
        pid stopped, if the recorded process was alive."""
        stopped: int | None = None
        if run is not None and await asyncio.to_thread(_alive, run):
            stopped = run.pid
            await asyncio.to_thread(_signal_run, run, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            while time.monotonic() < deadline:
                if not await asyncio.to_thread(_running, run):
                    break
                await asyncio.sleep(0.02)
            if await asyncio.to_thread(_alive, run):
                # Once the agent has exited (or not, in time), SIGKILL to
                # the sandbox's pid 1 takes its whole pid namespace: stragglers
                # that ignored SIGTERM or left the process group go with it.
                await asyncio.to_thread(_signal_run, run, signal.SIGKILL)
        # Whatever still carries the workspace's id (all of an unsandboxed
        # workspace's strays) gets SIGKILL; then wait until every process
        # killed is really gone (exiting takes a moment; the sandbox's pid 1
        # exits last, once its whole namespace has).
        uids = {os.getuid()} | ({uid} if uid >= 0 else set())
        dying: set[tuple[int, int]] = set()
        if run is not None:
            dying.add((run.pid, run.start_time))
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            found = await asyncio.to_thread(_kill_carriers, paths.workspace_id, uids)
            dying = {p for p in dying | set(found) if _is(*p)}
            if not found and not dying:
                break
            await asyncio.sleep(0.01)
        if run is not None:
            await asyncio.to_thread(_reap, run)
        await asyncio.to_thread(_unlink, paths.run)
        return stopped

    # --- locking -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _locked(self, workspace_id: str) -> AsyncIterator[Path]:
        """Serialise the builds of one workspace across tasks and processes
        (a retried job may overlap the worker it replaces)."""
        path = self._dir / _LOCKS / f"{workspace_id}.lock"
        while True:
            task = asyncio.ensure_future(asyncio.to_thread(_try_lock, path))
            try:
                fd = await asyncio.shield(task)
            except asyncio.CancelledError:
                task.add_done_callback(_close_result)
                raise
            if fd is not None:
                break
            await asyncio.sleep(0.05)
        try:
            yield path
        finally:
            os.close(fd)


# --- helpers (all blocking; called in worker threads) ----------------------------------------


def _is_workspace_id(name: str) -> bool:
    """Only canonical uuids name workspace directories (never ``..``, never a
    path separator)."""
    try:
        return str(uuid.UUID(name)) == name
    except ValueError:
        return False


def _user_name(name: str) -> str:
    if not _NAME.match(name):
        raise BackendError(
            f"the owner name {name!r} cannot name a home directory", reason="invalid_spec"
        )
    return name


def _host_name(name: str) -> str:
    cleaned = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].strip("-")
    return cleaned or "workspace"


def _check_env(env: dict[str, str]) -> None:
    """Refuse what an environment cannot hold. A NUL matters most: bwrap's
    options are NUL-separated, so a value with one (a parameter a user typed)
    could otherwise add options such as a bind mount of the host's root."""
    for name, value in env.items():
        if not _ENV_NAME.match(name) or "\0" in value:
            raise BackendError(
                f"the environment variable {name!r} has an invalid name or a NUL "
                "character in its value; change the parameter or template that sets it",
                reason="invalid_spec",
            )


def _without_process(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in state.items() if k not in ("pid", "start_time")}


def _setpriv() -> str:
    found = shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")
    if found is None or not os.path.realpath(found).startswith("/usr/"):
        raise BackendError(
            "the server host lacks setpriv (util-linux); ask the administrator to "
            "install util-linux",
            reason="launcher_missing",
        )
    return os.path.realpath(found)


def _system_dir_args() -> list[str]:
    """/bin, /lib... as on the host: symlinks into /usr (merged /usr) or
    read-only binds of real directories."""
    args: list[str] = []
    for name in SYSTEM_DIRS:
        path = f"/{name}"
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return args


def _memfd(name: str, text: str) -> int:
    fd = os.memfd_create(name)
    os.write(fd, text.encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _read_or_empty(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _read_report(fd: int, timeout: float) -> Any:
    """The JSON object written on ``fd`` (bwrap's --info-fd), or ``None`` when
    the writer exits (closes it) first."""
    data = b""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        ready, _, _ = select.select([fd], [], [], remaining)
        if not ready:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        data += chunk
        with contextlib.suppress(ValueError):
            return json.loads(data)


def _launch_failed(paths: _Paths, what: str, *, reason: str = "sandbox_failed") -> BackendError:
    output = _tail(paths.log)
    return BackendError(
        f"{what}: {output or 'no output'}",
        reason=reason,
        log_message=f"{what} for {paths.workspace_id}: {output}",
    )


def _tail(path: Path, lines: int = TAIL_LINES) -> str:
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 16384))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def _proc_stat(pid: int) -> _ProcStat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read().decode("ascii", "replace")
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    fields = data[data.rindex(")") + 2 :].split()
    return _ProcStat(fields[0], int(fields[1]), int(fields[2]), int(fields[19]))


def _alive(run: _Run) -> bool:
    """Whether the recorded process (the sandbox's pid 1) still exists."""
    return _is(run.pid, run.start_time)


def _running(run: _Run) -> bool:
    """Whether the workspace runs: its agent (or the bootstrap before it) is alive."""
    return _is(run.main_pid, run.main_start_time) and _alive(run)


def _is(pid: int, start_time: int) -> bool:
    proc = _proc_stat(pid)
    return proc is not None and proc.state not in "ZXx" and proc.start_time == start_time


def _find_main(pid: int, start_time: int, timeout: float) -> tuple[int, int]:
    """The sandboxed command: pid 2 of the sandbox's pid namespace, a child of
    its pid 1 (which forks it first, once the sandbox is set up). ``(pid,
    start time)``, or ``(0, -1)`` when it is already gone."""
    deadline = time.monotonic() + timeout
    while True:
        children = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                proc = _proc_stat(int(name))
                if proc is not None and proc.ppid == pid:
                    children.append((int(name), proc.start_time))
        for child, child_start in children:
            try:
                with open(f"/proc/{child}/status") as handle:
                    nspid = next((x for x in handle if x.startswith("NSpid:")), "").split()
            except OSError:
                continue
            if nspid and nspid[-1] == "2":
                return child, child_start
        # Other children of pid 1 are orphans it adopted: pid 2 existed and
        # has exited. A pid 1 that is gone will never get one.
        if children or not _is(pid, start_time) or time.monotonic() > deadline:
            return 0, -1
        time.sleep(0.001)


def _signal_run(run: _Run, sig: signal.Signals) -> None:
    """``sig`` to the recorded process (through a pidfd: never a reused pid)
    and to its process group, while the process still belongs to it."""
    try:
        pidfd = os.pidfd_open(run.pid)
    except OSError:
        return
    try:
        proc = _proc_stat(run.pid)
        if proc is None or proc.start_time != run.start_time:
            return
        # The group cannot be a reused id while one of its members lives.
        if proc.pgrp == run.pgid and run.pgid > 1:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(run.pgid, sig)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            signal.pidfd_send_signal(pidfd, sig)
    finally:
        os.close(pidfd)


def _kill_carriers(workspace_id: str, uids: set[int]) -> list[tuple[int, int]]:
    """SIGKILL every process (run by ``uids``) whose environment names the
    workspace (its own processes, and its bwrap's); their pids and start times."""
    needles = {
        f"STOCKADE_WORKSPACE_ID={workspace_id}".encode(),
        f"{_SANDBOX_MARKER}={workspace_id}".encode(),
    }
    found: list[tuple[int, int]] = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        pid = int(name)
        try:
            if os.stat(f"/proc/{name}").st_uid not in uids or not _carries(pid, needles):
                continue
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            # Checked again once the pidfd is open: if the pid was reused in
            # between, the stranger does not carry the id; if it is reused
            # after, the signal goes to the (dead) process the pidfd names.
            proc = _proc_stat(pid)
            if _carries(pid, needles) and proc is not None:
                found.append((pid, proc.start_time))
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(pidfd)
    return found


def _carries(pid: int, needles: set[bytes]) -> bool:
    with open(f"/proc/{pid}/environ", "rb") as handle:
        return not needles.isdisjoint(handle.read().split(b"\0"))


def _reap(run: _Run) -> None:
    """Collect the exit status of our processes when they are our children
    (the server is pid 1 or a subreaper), so none stays a zombie."""
    for pid in {run.pid, run.pgid}:
        if pid > 1:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


def _read_run(paths: _Paths) -> _Run | None:
    try:
        data = json.loads(paths.run.read_text())
        return _Run(**data)
    except (OSError, ValueError, TypeError):
        return None


def _status(paths: _Paths) -> ComputeStatus:
    if not _is_dir(paths.root):
        return ComputeStatus("missing")
    run = _read_run(paths)
    if run is None:
        return ComputeStatus("stopped", "not running")
    if _running(run):
        return ComputeStatus("running")
    _reap(run)
    last = _tail(paths.log, 1)[:200]
    return ComputeStatus("stopped", f"its processes exited (last output: {last or 'none'})")


def _is_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _mkdir_private(path: Path) -> bool:
    """Create ``path`` (0700); whether it was created. A symlink in its place
    is refused: the backend never follows one out of the workspaces dir."""
    try:
        os.mkdir(path, 0o700)
        return True
    except FileExistsError:
        if not _is_dir(path):
            raise BackendError(
                "the workspace's files on the server are damaged; ask the administrator",
                reason="workspace_dir_invalid",
                log_message=f"{path} exists and is not a directory",
            ) from None
        return False


def _makedirs_private(path: Path) -> None:
    """``mkdir -p`` where every directory created is 0700 (``os.makedirs``
    gives the intermediate ones the umask's mode)."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o700)


def _lock_names(root: Path) -> list[str]:
    try:
        names = os.listdir(root / _LOCKS)
    except FileNotFoundError:
        return []
    ids = [name.removesuffix(".lock") for name in names if name.endswith(".lock")]
    return [name for name in ids if _is_workspace_id(name)]


def _workspace_dirs(root: Path) -> list[str]:
    try:
        entries = list(os.scandir(root))
    except FileNotFoundError:
        return []
    return [e.name for e in entries if _is_workspace_id(e.name) and e.is_dir(follow_symlinks=False)]


def _remove_tree(path: Path) -> None:
    """Remove a workspace directory; its files may belong to the workspace's
    uid and have any mode (a read-only directory inside the home...)."""
    if os.path.islink(path) or not os.path.lexists(path):
        _unlink(path)
        return

    def retry(function: Callable[..., Any], target: str, _: object) -> None:
        parent = os.path.dirname(target)
        with contextlib.suppress(OSError):
            os.chmod(parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            function(target)

    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=retry)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _ca_args(paths: _Paths) -> list[str]:
    """bwrap options that show the installed CA at SANDBOX_CA_PATH. The
    directories are made explicitly: those bwrap makes for a bind's parents
    are 0700 root, which the workspace's uid cannot traverse."""
    return [
        "--perms", "0755", "--dir", "/run",
        "--perms", "0755", "--dir", SANDBOX_CA_DIR,
        "--ro-bind", str(paths.ca), SANDBOX_CA_PATH,
    ]  # fmt: skip


def _install_ca(paths: _Paths, pem: str | None) -> None:
    """Put the control plane's CA where the workspace's agent reads it
    (world-readable: the workspace's uid reads it; it is no secret), or
    remove one a previous start installed."""
    if pem is None:
        _unlink(paths.ca)
        return
    _write_atomic(paths.ca, pem)
    os.chmod(paths.ca, 0o644)


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def _try_lock(path: Path) -> int | None:
    _makedirs_private(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A delete may have removed the file while we waited: then our lock
        # is on an inode nobody else will ever lock.
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise BlockingIOError(errno.EAGAIN, "lock file replaced")
    except OSError:
        os.close(fd)
        return None
    return fd


def _close_result(task: asyncio.Future[int | None]) -> None:
    if not task.cancelled() and task.exception() is None:
        fd = task.result()
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def _blocking_lock(path: Path) -> Iterator[None]:
    _makedirs_private(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _subordinate_ranges() -> list[range]:
    """The uid/gid ranges handed to users for their own user namespaces: a
    workspace uid inside one would be reachable by that user."""
    ranges: list[range] = []
    for name in ("/etc/subuid", "/etc/subgid"):
        for line in _read_or_empty(name).splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                start = int(parts[1])
                ranges.append(range(start, start + int(parts[2])))
    return ranges


def _taken(uid: int, ranges: list[range]) -> bool:
    if any(uid in r for r in ranges):
        return True
    for lookup in (pwd.getpwuid, grp.getgrgid):
        try:
            lookup(uid)
            return True
        except KeyError:
            pass
    return False


def _free_uid(root: Path) -> int:
    """The next uid never given to a workspace here (called under the uid
    lock): above the high-water mark and every uid still recorded."""
    candidates = [UID_BASE]
    with contextlib.suppress(OSError, ValueError):
        candidates.append(int((root / _LOCKS / "uid-next").read_text()))
    for name in _workspace_dirs(root):
        with contextlib.suppress(OSError, ValueError):
            candidates.append(int((root / name / _UID_FILE).read_text()) + 1)
    uid = max(candidates)
    ranges = _subordinate_ranges()
    while _taken(uid, ranges):
        uid += 1
    if uid > UID_LIMIT:
        raise BackendError("this server has run out of workspace user ids", reason="uids_exhausted")
    return uid


def _age_seconds(path: Path) -> float:
    """Seconds since ``path`` (a workspace dir) last changed; its run files
    are rewritten at every start and stop."""
    try:
        info = path.lstat()
    except OSError:
        return float("inf")
    return time.time() - max(info.st_mtime, info.st_ctime)
