"""What the agent's terminals share, whether an SSH session's PTY
(:mod:`stockade.agent.sshserver`) or a reconnecting web terminal
(:mod:`stockade.agent.ptys`): the user's shell, the window size, the
controlling terminal, signals to a process group. Python 3.9+, stdlib."""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
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


def take_controlling_terminal() -> None:
    """In the child, after setsid(): make its stdin (the PTY) the
    controlling terminal, so job control, ^C and hangups work."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to a process group that may be gone already."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
