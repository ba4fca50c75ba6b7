"""The workspace's SSH server: what ``ssh stockade.<workspace>`` talks to.

The contract (the agent's tunnel code relies on exactly this):

``ssh_available() -> (ok, reason)``
    ``(True, "")`` when asyncssh and its native dependencies (cryptography's
    ``_rust.abi3.so``, cffi's ``_cffi_backend``) import in this interpreter;
    otherwise ``(False, reason)``, a sentence for the agent's log and for the
    user. The answer is computed once per process. The agent's core never
    depends on it: without SSH the agent still runs.

``WorkspaceSSHServer(host_key, *, environment, cwd)``
    ``host_key`` is an OpenSSH-format private key (text). The control plane
    generates an ed25519 key per workspace and keeps it, so clients can pin
    it. ``environment()`` returns the environment of shells, commands, SFTP
    and forwarded connections, called once per session; ``cwd()`` returns
    their working directory (the user's home), also per session. Raises
    :class:`SSHUnavailable` when :func:`ssh_available` is false and
    :class:`InvalidHostKey` when the key cannot be used.

``server.connection_protocol() -> asyncio.Protocol``
    A new protocol serving ONE incoming SSH connection (the server side of
    the handshake starts as soon as a transport is attached). The caller
    attaches any ``asyncio.Transport``: ``protocol.connection_made(t)``, then
    ``data_received``/``eof_received``/``connection_lost``. The transport
    needs ``write``, ``writelines``, ``close``, ``abort``, ``is_closing``,
    ``pause_reading``/``resume_reading``, ``get_extra_info`` (``socket``,
    ``sockname`` and ``peername`` may be ``None``),
    ``set_write_buffer_limits``/``get_write_buffer_size``, and calls
    ``protocol.pause_writing()``/``resume_writing()`` for backpressure. With
    a real socket: ``loop.connect_accepted_socket(server.connection_protocol,
    sock)`` or ``loop.create_server(server.connection_protocol, ...)``.
    Call it from inside the running event loop.

``await server.close()``
    Closes every connection and session it serves; sessions still running get
    SIGHUP, then SIGKILL after a grace period (agent shutdown).

What a connection gets: SSH connections only arrive through the control
plane's tunnel, which has already authenticated and authorized the user, so
every client authentication is accepted (``none``, any user name, like
Coder's agent) and every session runs as the agent's own user:

- shells (a login shell: the user's shell from the password database, else
  ``/bin/sh``) and commands (``$SHELL -c COMMAND``), with or without a PTY;
  TERM and window size changes are honoured; exit statuses and signals
  (``exit-signal``) are reported; stdout and stderr stay separate and
  complete; stdin EOF reaches the command; client environment variables
  (``SendEnv``/``SetEnv``) are all accepted; ``signal`` requests are
  delivered to the session's process;
- SFTP and scp (both the SFTP-based and the legacy protocol), relative paths
  starting at ``cwd()``; rsync and git over ssh (they are commands);
- ``direct-tcpip`` (``ssh -L``) to any host the workspace can reach,
  ``tcpip-forward`` (``ssh -R``) listening on loopback only inside the
  workspace, agent forwarding (``ssh -A`` sets ``SSH_AUTH_SOCK``),
  Unix-socket forwarding both ways;
- when the client goes away while a session's command still runs, its
  process group gets SIGHUP, then SIGKILL after a grace period; a command
  that exits normally leaves its ``nohup``-ed background jobs alone (VS Code
  Remote-SSH starts its server that way).

The implementation is in :mod:`stockade.agent.sshserver`, which imports
asyncssh; this module does not, so importing it is safe anywhere.
"""

from __future__ import annotations

import asyncio
import platform
import sys
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from stockade.agent.sshserver import SSHServerCore

_availability: tuple[bool, str] | None = None


class SSHUnavailable(RuntimeError):
    """asyncssh or one of its native dependencies cannot be used here."""


class InvalidHostKey(ValueError):
    """The host key is not an OpenSSH-format private key asyncssh can use."""


def _check() -> tuple[bool, str]:
    where = f"Python {platform.python_version()} on {platform.machine() or 'unknown'}"
    if sys.version_info < (3, 10):
        return False, f"SSH needs Python 3.10 or newer in the workspace ({where})"
    try:
        import asyncssh
        from cryptography.hazmat.primitives.asymmetric import ed25519

        # Importing is not enough: a native library that loads but cannot
        # run (wrong CPU features, broken libc) fails only when used.
        ed25519.Ed25519PrivateKey.generate().sign(b"stockade")
        asyncssh.generate_private_key("ssh-ed25519")
    except Exception as exc:  # any failure of the native part means "no SSH"
        return False, f"SSH is unavailable in this workspace ({where}): {exc!r}"
    return True, ""


def ssh_available() -> tuple[bool, str]:
    """(True, "") when asyncssh and cryptography import here; else (False,
    a reason for the log/user)."""
    global _availability
    if _availability is None:
        _availability = _check()
    return _availability


class WorkspaceSSHServer:
    """The SSH server of one workspace (see the module docstring for the whole contract)."""

    def __init__(
        self,
        host_key: str,
        *,
        environment: Callable[[], dict[str, str]],
        cwd: Callable[[], str],
    ) -> None:
        """host_key: an OpenSSH-format private key (text; the control plane
        generates an ed25519 key per workspace and keeps it, so the host key
        is stable). environment(): the env for shells/commands (called per
        session). cwd(): their working directory (the user's home)."""
        ok, reason = ssh_available()
        if not ok:
            raise SSHUnavailable(reason)
        from stockade.agent.sshserver import SSHServerCore

        self._core: SSHServerCore = SSHServerCore(host_key, environment=environment, cwd=cwd)

    def connection_protocol(self) -> asyncio.Protocol:
        """A new asyncio protocol serving ONE incoming SSH connection. The
        caller attaches any asyncio.Transport to it
        (protocol.connection_made(transport), then
        data_received/eof_received/connection_lost), e.g. a WebSocket-backed
        transport that supports write/writelines/close/abort/is_closing/
        pause_reading/resume_reading/get_extra_info/set_write_buffer_limits/
        get_write_buffer_size and calls protocol.pause_writing()/
        resume_writing(). With a real socket:
        loop.connect_accepted_socket(server.connection_protocol, sock)."""
        return self._core.connection_protocol()

    @property
    def public_key(self) -> str:
        """The host key's public half, OpenSSH format (``ssh-ed25519 AAAA...``)."""
        return self._core.public_key

    async def close(self) -> None:
        """Close every connection and session it serves (agent shutdown)."""
        await self._core.close()
