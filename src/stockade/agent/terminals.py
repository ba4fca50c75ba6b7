"""What the agent's terminals share, whether an SSH session's PTY
(:mod:`stockade.agent.sshserver`) or a reconnecting web terminal
(:mod:`stockade.agent.ptys`): the user's shell, the window size, the
controlling terminal, signals to a process group. Python 3.9+, stdlib."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pwd
import signal
import struct
import termios

FALLBACK_SHELL = "/bin/sh"


def login_shell() -> str:
    """The user's shell from the password database, else /bin/sh."""
    try:
        shell = pwd.getpwuid(os.getuid()).pw_shell
    except KeyError:
        shell = ""
    if shell and os.path.isabs(shell) and os.access(shell, os.X_OK):
        return shell
    return FALLBACK_SHELL


def set_window_size(fd: int, rows: int, cols: int, xpixels: int = 0, ypixels: int = 0) -> None:
    """Set the PTY's window size (the foreground job gets SIGWINCH)."""
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, xpixels, ypixels))


# What a session's programs must get with the default action whatever the
# agent inherited: an agent started under nohup ignores SIGHUP, an ignored
# signal stays ignored across exec, and a shell cannot trap what it was
# started ignoring, so its jobs would outlive the client's hangup.
SESSION_SIGNALS = tuple(
    getattr(signal, name)
    for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGTSTP", "SIGTTIN", "SIGTTOU")
)


def reset_signals() -> None:
    """In a session's child, before exec: default actions, nothing blocked
    (as sshd and login give a session)."""
    for sig in SESSION_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def take_controlling_terminal() -> None:
    """In the child, after setsid(): default signals, and its stdin (the PTY)
    as the controlling terminal, so job control, ^C and hangups work."""
    reset_signals()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group that may be gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def login_environment(base: dict[str, str], shell: str) -> dict[str, str]:
    """``base`` plus what a login sets when it is missing: USER, LOGNAME,
    HOME, SHELL and a PATH."""
    env = dict(base)
    try:
        entry: pwd.struct_passwd | None = pwd.getpwuid(os.getuid())
    except KeyError:
        entry = None
    if entry is not None:
        env.setdefault("USER", entry.pw_name)
        env.setdefault("LOGNAME", entry.pw_name)
        env.setdefault("HOME", entry.pw_dir)
    env.setdefault("SHELL", shell)
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    return env


async def spawn_on_pty(
    argv: list[str],
    executable: str,
    env: dict[str, str],
    cwd: str,
    rows: int,
    cols: int,
    *,
    xpixels: int = 0,
    ypixels: int = 0,
    tty_env: str | None = None,
) -> tuple[int, asyncio.subprocess.Process]:
    """Start ``argv`` in a new session on a new PTY of the given size, the
    PTY its controlling terminal; returns (the PTY's master fd, the process).
    ``tty_env`` names a variable to set to the terminal's path (SSH_TTY).
    Raises OSError (the master is closed then)."""
    master, slave = os.openpty()
    try:
        if rows and cols:
            set_window_size(slave, rows, cols, xpixels, ypixels)
        if tty_env:
            env = {**env, tty_env: os.ttyname(slave)}
        process = await asyncio.create_subprocess_exec(
            argv[0], *argv[1:], executable=executable,
            stdin=slave, stdout=slave, stderr=slave,
            cwd=cwd, env=env, start_new_session=True,
            preexec_fn=take_controlling_terminal,
        )  # fmt: skip
    except OSError:
        os.close(master)
        raise
    finally:
        os.close(slave)
    return master, process
