"""The asyncssh side of :mod:`stockade.agent.ssh` (imported only once
:func:`stockade.agent.ssh.ssh_available` said yes).

asyncssh 2.24.1 is pinned; this module relies on these parts of it beyond
the documented API, each checked by the tests in ``tests/agent/test_ssh.py``:

- ``SSHServerConnection(loop, options, acceptor, error_handler)``: the
  protocol class ``asyncssh.listen()`` builds in its ``conn_factory``
  (connection.py); we build it the same way, with options made once by
  ``SSHServerConnectionOptions(...)``. ``asyncssh.run_server()`` exists too,
  but takes a connected socket, and the tunnel has none.
- ``SSHConnection.send_packet`` and ``_enc_alg_cs``/``_enc_alg_sc``: asyncssh
  puts an empty ``MSG_IGNORE`` before every packet it encrypts, a
  countermeasure against the CBC-mode chosen-plaintext attack (RFC 4251
  9.3.1) that costs ~20% of bulk throughput. We never offer CBC ciphers, and
  :class:`_Connection` drops exactly that empty ignore packet while neither
  direction's cipher is CBC.
- ``SSHServerProcess.redirect`` to raw file descriptors (the child's pipes
  or PTY master), with ``set_redirect_pid`` so signals and window changes
  reach the child: data never goes through asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import posixpath
import signal
import socket
from collections.abc import Callable
from typing import Any

import asyncssh
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import SSHPacketLogger
from asyncssh.sftp import MIN_SFTP_VERSION

from stockade.agent.terminals import (
    login_environment,
    login_shell,
    reset_signals,
    signal_group,
    spawn_on_pty,
)

log = logging.getLogger("stockade.agent.ssh")

# Ciphers we offer, in our order of preference (the client's order decides):
# AEAD and CTR only; without CBC the MSG_IGNORE countermeasure is not needed.
ENCRYPTION_ALGS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
# A session whose client went away gets SIGHUP, then SIGKILL this much later.
HANGUP_GRACE_SECONDS = 3.0
# After a PTY session's shell exits, its remaining output is read for at most
# this long (a background job that keeps the terminal open must not hold the
# session forever).
PTY_DRAIN_SECONDS = 2.0
# How long an exited session waits for the client to acknowledge the close.
CLOSE_WAIT_SECONDS = 30.0
_EMPTY_STRING = b"\x00\x00\x00\x00"  # an SSH "string" of length 0

SessionProcess = asyncssh.SSHServerProcess[bytes]


class _Connection(asyncssh.SSHServerConnection):
    """asyncssh's server connection without the empty MSG_IGNORE before
    every packet (see the module docstring)."""

    def send_packet(
        self,
        pkttype: int,
        *args: bytes,
        handler: SSHPacketLogger | None = None,
    ) -> None:
        if (
            pkttype == MSG_IGNORE
            and args == (_EMPTY_STRING,)
            and b"cbc" not in self._enc_alg_cs
            and b"cbc" not in self._enc_alg_sc
        ):
            return
        super().send_packet(pkttype, *args, handler=handler)


def _loopback_only(host: str) -> str | None:
    """Where a ``tcpip-forward`` for ``host`` listens in the workspace:
    ``None`` when it already is a loopback name or address, otherwise the
    loopback address of the same family (the workspace is never exposed)."""
    if host == "localhost":
        # "localhost" binds every loopback address, and fails as a whole where
        # one is missing (containers often lack ::1): IPv4's is always there.
        return "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return "127.0.0.1"
    if address.is_loopback:
        return None
    return "::1" if address.version == 6 else "127.0.0.1"


class _HomeSFTPServer(asyncssh.SFTPServer):
    """asyncssh's SFTP server, with relative paths starting at the home."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes], home: str) -> None:
        super().__init__(chan)
        self._home = os.fsencode(home)

    def map_path(self, path: bytes) -> bytes:
        return path if path.startswith(b"/") else posixpath.join(self._home, path)

    def exit(self) -> None:
        # asyncssh ends an SFTP session without an exit status; OpenSSH's scp
        # (SFTP mode) then reports a failure, as ssh exits 255.
        super().exit()
        chan = self.channel
        if not chan.is_closing():
            chan.exit(0)


class _SessionProcess(asyncssh.SSHServerProcess[bytes]):
    """asyncssh's server process, delivering ``signal`` and ``break``
    requests to the session's process itself: asyncssh does so only when
    stdin is redirected to a pipe or a PTY, and ours may be a socket."""

    def exception_received(self, exc: Exception) -> None:
        pid = self.redirect_pid
        if pid and isinstance(exc, asyncssh.SignalReceived):
            number = getattr(signal, f"SIG{exc.signal}", None)
            if isinstance(number, int):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, number)
            return
        if pid and isinstance(exc, asyncssh.BreakReceived):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGINT)
            return
        super().exception_received(exc)


class _ConnectionHandler(asyncssh.SSHServer):
    """Per connection: accepts any client, allows forwarding."""

    def __init__(self, core: SSHServerCore) -> None:
        self._core = core
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._core.connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._core.connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        # The tunnel authenticated and authorized the user already.
        return False

    def connection_requested(
        self, dest_host: str, dest_port: int, orig_host: str, orig_port: int
    ) -> bool:
        return True

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        loopback = _loopback_only(listen_host)
        if loopback is None or self._conn is None:
            return True
        # Listen on loopback, but tell the client about the address it asked
        # for: it matches forwarded connections by that name.
        return self._conn.forward_local_port(loopback, listen_port, listen_host, listen_port)

    def session_requested(self) -> asyncssh.SSHServerSession[bytes]:
        core = self._core
        sftp_factory: Any = core._sftp_server  # asyncssh types it for any channel
        return _SessionProcess(core._start_session, sftp_factory, core.sftp_version, allow_scp=True)

    def unix_connection_requested(self, dest_path: str) -> bool:
        return True

    def unix_server_requested(self, listen_path: str) -> bool:
        return True


class SSHServerCore:
    """What :class:`stockade.agent.ssh.WorkspaceSSHServer` delegates to."""

    def __init__(
        self,
        host_key: str,
        *,
        environment: Callable[[], dict[str, str]],
        cwd: Callable[[], str],
    ) -> None:
        from stockade.agent.ssh import InvalidHostKey

        try:
            key = asyncssh.import_private_key(host_key)
        except (asyncssh.KeyImportError, ValueError, TypeError) as exc:
            raise InvalidHostKey(f"the SSH host key cannot be used: {exc}") from None
        self._environment = environment
        self._cwd = cwd
        self.public_key: str = key.export_public_key("openssh").decode().strip()
        self.connections: set[asyncssh.SSHServerConnection] = set()
        self._sessions: set[asyncio.Task[None]] = set()
        self._closing = False
        self.sftp_version = MIN_SFTP_VERSION
        # asyncssh logs every channel and request at INFO, environment
        # variables included; the agent's log keeps its warnings only.
        logging.getLogger("asyncssh").setLevel(logging.WARNING)
        self._options = asyncssh.SSHServerConnectionOptions(
            server_host_keys=[key],
            server_factory=lambda: _ConnectionHandler(self),
            # Sessions come from _ConnectionHandler.session_requested (our
            # process class): no process_factory/sftp_factory here, which
            # would make asyncssh build its own.
            agent_forwarding=True,
            x11_forwarding=False,
            allow_pty=True,
            line_editor=False,
            encoding=None,
            encryption_algs=list(ENCRYPTION_ALGS),
            server_version="Stockade",
            # No GSS: asyncssh's default looks up this host's FQDN at every
            # connection (socket.getfqdn), a DNS query when the workspace's
            # name is in no hosts file: 20 s of timeouts per ssh.
            gss_host=None,
        )

    def connection_protocol(self) -> asyncio.Protocol:
        """A new protocol for one incoming connection (see the contract)."""
        if self._closing:
            raise RuntimeError("the SSH server is closed")
        loop = asyncio.get_running_loop()
        return _Connection(loop, self._options, None, None)

    async def close(self) -> None:
        """Close every connection, then wait for the sessions to end."""
        self._closing = True
        for conn in list(self.connections):
            conn.close()
        for conn in list(self.connections):
            with contextlib.suppress(Exception):
                await conn.wait_closed()
        if self._sessions:
            await asyncio.gather(*self._sessions, return_exceptions=True)

    def _sftp_server(self, chan: asyncssh.SSHServerChannel[bytes]) -> asyncssh.SFTPServer:
        return _HomeSFTPServer(chan, self._cwd())

    def _start_session(self, process: SessionProcess) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self._session(process))
        self._sessions.add(task)
        task.add_done_callback(self._sessions.discard)
        return task

    def _working_directory(self) -> str:
        cwd = self._cwd()
        # A home that is gone must not make every session fail.
        return cwd if os.path.isdir(cwd) else "/"

    def _session_env(self, process: SessionProcess, shell: str) -> dict[str, str]:
        env = login_environment(self._environment(), shell)
        # What the client sent (SendEnv/SetEnv): the user's own session, so
        # every name is accepted, as in Coder.
        for name, value in process.channel.get_environment_bytes().items():
            key = os.fsdecode(name)
            if key and "=" not in key and "\0" not in key and b"\0" not in value:
                env[key] = os.fsdecode(value)
        conn = process.channel.get_connection()
        agent_path = (
            conn.get_agent_path() if isinstance(conn, asyncssh.SSHServerConnection) else None
        )
        if agent_path:
            env["SSH_AUTH_SOCK"] = agent_path
        term = process.term_type
        if term:
            env["TERM"] = term
        return env

    async def _session(self, process: SessionProcess) -> None:
        try:
            if process.subsystem:
                process.stderr.write(f"subsystem {process.subsystem!r} is not supported\n".encode())
                process.exit(1)
                return
            await self._run(process)
        except Exception:
            log.exception("SSH session failed")
            with contextlib.suppress(Exception):
                process.exit(255)

    async def _run(self, process: SessionProcess) -> None:
        shell = login_shell()
        env = self._session_env(process, shell)
        command = process.command
        name = os.path.basename(shell)
        # A shell session runs a login shell ("-bash"), a command "bash -c".
        argv = ["-" + name] if command is None else [name, "-c", command]
        cwd = self._working_directory()
        if process.term_type is not None:
            child = await self._spawn_pty(process, shell, argv, env, cwd)
            await self._supervise(process, child, pty=True)
            return
        child, stdin = await self._spawn_pipes(process, shell, argv, env, cwd)
        try:
            await self._supervise(process, child, pty=False)
        finally:
            stdin.close()

    async def _spawn_pipes(
        self,
        process: SessionProcess,
        shell: str,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
    ) -> tuple[asyncio.subprocess.Process, asyncio.StreamWriter]:
        # stdin is a socket pair (as OpenSSH's sshd may use): asyncio's write
        # pipe transport can close its pipe twice when the child exits as the
        # client's EOF arrives (Python 3.11), which corrupts the selector.
        stdin_parent, stdin_child = socket.socketpair()
        stdout_r, stdout_w = os.pipe()
        stderr_r, stderr_w = os.pipe()
        try:
            child = await asyncio.create_subprocess_exec(
                argv[0],
                *argv[1:],
                executable=shell,
                stdin=stdin_child.fileno(),
                stdout=stdout_w,
                stderr=stderr_w,
                cwd=cwd,
                env=env,
                start_new_session=True,
                preexec_fn=reset_signals,
            )
        except OSError:
            stdin_parent.close()
            for fd in (stdout_r, stderr_r):
                os.close(fd)
            raise
        finally:
            stdin_child.close()
            for fd in (stdout_w, stderr_w):
                os.close(fd)
        _, stdin = await asyncio.open_unix_connection(sock=stdin_parent)
        process.set_redirect_pid(child.pid)
        # send_eof=False: the channel's EOF would end stderr too, and stderr
        # may still be coming after stdout ends; the exit closes the channel.
        await process.redirect(stdin=stdin, stdout=stdout_r, stderr=stderr_r, send_eof=False)
        return child, stdin

    async def _spawn_pty(
        self,
        process: SessionProcess,
        shell: str,
        argv: list[str],
        env: dict[str, str],
        cwd: str,
    ) -> asyncio.subprocess.Process:
        width, height, pixwidth, pixheight = process.term_size
        master, child = await spawn_on_pty(
            argv, shell, env, cwd, height, width,
            xpixels=pixwidth, ypixels=pixheight, tty_env="SSH_TTY",
        )  # fmt: skip
        process.set_redirect_pid(child.pid)
        # The master carries both directions; each redirect owns one fd.
        await process.redirect(stdin=os.dup(master), stdout=master, send_eof=False)
        return child

    async def _supervise(
        self, process: SessionProcess, child: asyncio.subprocess.Process, *, pty: bool
    ) -> None:
        exited = asyncio.ensure_future(child.wait())
        closed = asyncio.ensure_future(process.wait_closed())
        try:
            await asyncio.wait({exited, closed}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                # The client went away (or the server closes): hang up.
                await self._hang_up(child)
                return
            drained: asyncio.Future[Any] = asyncio.gather(
                process.stdout.drain(), process.stderr.drain()
            )
            waiting: set[asyncio.Future[Any]] = {drained, closed}
            # A PTY may be held open by a background job: read what is left
            # for a while only.
            await asyncio.wait(
                waiting,
                timeout=PTY_DRAIN_SECONDS if pty else None,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if not drained.done():
                drained.cancel()
            with contextlib.suppress(BaseException):
                await drained
            if closed.done():
                return
            status = child.returncode
            if status is not None and status < 0:
                process.exit_with_signal(_signal_name(-status))
            else:
                process.exit(status or 0)
            # Until the client acknowledges the close (asyncssh's cleanup of
            # the redirections runs in wait_closed()).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(closed), CLOSE_WAIT_SECONDS)
        finally:
            for future in (exited, closed):
                if not future.done():
                    future.cancel()
            if child.returncode is None:
                await self._hang_up(child)

    async def _hang_up(self, child: asyncio.subprocess.Process) -> None:
        """SIGHUP (and SIGCONT, for stopped jobs) to the session's process
        group, then SIGKILL if it is still there after the grace period.

        Background jobs of an interactive shell run in process groups of
        their own: they get the SIGHUP too, as from the kernel's hangup of a
        terminal (a shell forwards it to its jobs, but not when it dies
        first). Jobs that ignore it (nohup) keep running, as under sshd."""
        for sig in (signal.SIGHUP, signal.SIGCONT):
            signal_group(child.pid, sig)
            for pgid in _session_groups(child.pid) - {child.pid}:
                signal_group(pgid, sig)
        try:
            await asyncio.wait_for(child.wait(), HANGUP_GRACE_SECONDS)
        except asyncio.TimeoutError:
            signal_group(child.pid, signal.SIGKILL)
            await child.wait()


def _session_groups(sid: int) -> set[int]:
    """The process groups of session ``sid`` (Linux /proc; empty elsewhere)."""
    groups: set[int] = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return groups
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as handle:
                stat = handle.read()
        except OSError:
            continue
        # pid (comm) state ppid pgrp session ...: comm may hold spaces.
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 3 and int(fields[3]) == sid:
            groups.add(int(fields[2]))
    return groups


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name[3:]
    except ValueError:
        return "KILL"
