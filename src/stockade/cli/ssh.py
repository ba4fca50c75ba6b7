"""stockade ssh, config-ssh, port-forward: reach a workspace through the
control plane, with the real OpenSSH client and nothing but the control
plane's address.

Host names: ``stockade.NAME`` is the signed-in user's workspace NAME,
``stockade.OWNER.NAME`` another user's (workspace and user names hold no
dots). Host keys are pinned: each workspace has a stable key kept by the
control plane, written to a known-hosts file of our own (``config-ssh`` for
every workspace, ``ssh --stdio`` for one it does not find there), so ssh
checks it strictly: no trust-on-first-use prompt, no
``StrictHostKeyChecking no``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from stockade.cli import config, stdio
from stockade.cli.common import UserError, client
from stockade.cli.output import console
from stockade.cli.stdio import HOST_PREFIX
from stockade.sdk import Client
from stockade.sdk.tunnel import Forward, serve_forwards

BLOCK_START = "# ------------ START STOCKADE: managed by `stockade config-ssh`; edits here are lost"
BLOCK_END = "# ------------ END STOCKADE"
# asyncssh (the agent's SSH server) runs AES-GCM at twice chacha20's speed;
# OpenSSH prefers chacha20 unless told otherwise.
CIPHERS = "aes128-gcm@openssh.com,aes256-gcm@openssh.com,chacha20-poly1305@openssh.com"


def known_hosts_file() -> Path:
    return config.config_dir() / "known_hosts"


def parse_host(host: str) -> tuple[str, str]:
    """``stockade.NAME`` / ``stockade.OWNER.NAME`` / ``NAME`` / ``OWNER/NAME``
    to (owner, name); owner ``me`` is the signed-in user."""
    parsed = stdio.parse_host(host)
    if parsed is None:
        raise UserError(f"name a workspace NAME or OWNER/NAME (or stockade.NAME), not {host!r}")
    return parsed


def host_alias(owner: str, name: str, me: str | None = None) -> str:
    return f"{HOST_PREFIX}{name}" if owner in ("me", me) else f"{HOST_PREFIX}{owner}.{name}"


def cli_command() -> list[str]:
    """How ssh should run this CLI: its absolute path (config files outlive
    shells and PATHs)."""
    argv0 = sys.argv[0]
    path = shutil.which(argv0) if os.sep not in argv0 else argv0
    if path and os.path.basename(path) == "stockade":
        return [os.path.realpath(path) if os.path.islink(path) else os.path.abspath(path)]
    return [sys.executable, "-m", "stockade"]


def _quote_config(value: str) -> str:
    return f'"{value}"' if re.search(r"\s", value) else value


def proxy_command(known_hosts: Path) -> str:
    parts = [*cli_command(), "ssh", "--stdio", "--known-hosts", str(known_hosts), "%n"]
    return " ".join(shlex.quote(part) for part in parts)


def ensure_known_host(api: Client, path: Path, alias: str, owner: str, name: str) -> None:
    """Put the workspace's host key in ``path`` unless it is there already."""
    if api.token is None:
        raise UserError("not logged in: run `stockade login URL`")
    try:
        stdio.ensure_known_host(api.url, api.token, path, alias, owner, name)
    except stdio.StdioError as exc:
        raise UserError(str(exc)) from None


# --- stockade ssh -------------------------------------------------------------------------


def ssh(
    workspace: Annotated[str, typer.Argument(help="NAME, OWNER/NAME or stockade.NAME")],
    command: Annotated[
        list[str] | None, typer.Argument(help="a command to run instead of a shell (after --)")
    ] = None,
    stdio_mode: Annotated[
        bool,
        typer.Option(
            "--stdio", help="relay stdin/stdout to the workspace's SSH server (a ProxyCommand)"
        ),
    ] = False,
    known_hosts: Annotated[
        Path | None,
        typer.Option(
            "--known-hosts", help="with --stdio: add the workspace's host key to this file"
        ),
    ] = None,
) -> None:
    """Open a shell (or run a command) in a workspace over SSH.

    Runs the OpenSSH client through the control plane, with the workspace's
    host key pinned. ``stockade ssh ws -- make test`` returns the command's
    exit status."""
    if stdio_mode:
        # Normally the entry point sends --stdio to stockade.cli.stdio before
        # the CLI loads; this is the same, for `python -m stockade.cli.main`.
        raise typer.Exit(stdio.main([workspace] if known_hosts is None else
                                    ["--known-hosts", str(known_hosts), workspace]))  # fmt: skip
    ssh_binary = shutil.which("ssh")
    if ssh_binary is None:
        raise UserError(
            "the OpenSSH client `ssh` is not installed (apt-get install openssh-client)"
        )
    owner, name = parse_host(workspace)
    words = list(command or [])
    if words[:1] == ["--"]:
        # Options end at the workspace (interspersed args are off), so
        # Click hands over the "--" that separates the command: not a word of it.
        words = words[1:]
    api = client()
    alias = host_alias(owner, name)
    path = known_hosts_file()
    ensure_known_host(api, path, alias, owner, name)
    argv = [
        "ssh",
        "-o", f"ProxyCommand={proxy_command(path)}",
        "-o", f"UserKnownHostsFile={_quote_config(str(path))}",
        "-o", "GlobalKnownHostsFile=/dev/null",
        "-o", "StrictHostKeyChecking=yes",
        "-o", f"Ciphers={CIPHERS}",
        "-o", "LogLevel=ERROR",
        # "--" ends ssh's options before the host: a command is the
        # remote's words, even one that starts with "-" (after the host,
        # ssh would pass a "--" on to the remote shell).
        "--", alias, *words,
    ]  # fmt: skip
    sys.stdout.flush()
    os.execv(ssh_binary, argv)  # noqa: S606 - the user's own ssh, with a fixed argv


# --- config-ssh -----------------------------------------------------------------------------


def _block(known_hosts: Path) -> str:
    lines = [
        BLOCK_START,
        f"Host {HOST_PREFIX}*",
        f"  ProxyCommand {proxy_command(known_hosts)}",
        f"  UserKnownHostsFile {_quote_config(str(known_hosts))}",
        "  GlobalKnownHostsFile /dev/null",
        "  StrictHostKeyChecking yes",
        f"  Ciphers {CIPHERS}",
        "  LogLevel ERROR",
        BLOCK_END,
    ]
    return "\n".join(lines) + "\n"


def _without_block(text: str) -> tuple[str, bool]:
    start = text.find(BLOCK_START)
    if start < 0:
        return text, False
    end = text.find(BLOCK_END, start)
    if end < 0:
        raise UserError(
            "the Stockade block in the SSH config has lost its end marker; fix it by hand"
        )
    end = text.find("\n", end)
    end = len(text) if end < 0 else end + 1
    return text[:start] + text[end:].lstrip("\n") if start == 0 else text[:start] + text[end:], True


def config_ssh(
    ssh_config_file: Annotated[
        Path, typer.Option("--ssh-config-file", help="the OpenSSH client config to edit")
    ] = Path("~/.ssh/config"),
    remove: Annotated[
        bool, typer.Option("--remove", help="take the Stockade block out again")
    ] = False,
) -> None:
    """Let plain `ssh stockade.NAME` (and scp, rsync, git, VS Code) reach
    your workspaces: writes a marked block into ~/.ssh/config and pins every
    workspace's host key. Run it again any time; it replaces its own block."""
    path = ssh_config_file.expanduser()
    try:
        text = path.read_text()
    except FileNotFoundError:
        text = ""
    rest, had_block = _without_block(text)
    if remove:
        if had_block:
            path.write_text(rest)
        known = known_hosts_file()
        if known.exists():
            known.unlink()
        console.print(f"removed the Stockade block from {path}" if had_block else
                      f"no Stockade block in {path}")  # fmt: skip
        return
    api = client()
    me = api.me().username
    keys = {}
    for ws in api.list_workspaces(owner=me).workspaces:
        keys[host_alias(ws.owner_name, ws.name, me)] = api.workspace_ssh(
            ws.owner_name, ws.name
        ).host_public_key
    known = known_hosts_file()
    stdio.write_known_hosts(known, keys, replace_all=True)
    # First in the file: ssh takes each option from the first Host block that
    # sets it, so a `Host *` above ours would win.
    new_text = _block(known) + ("\n" + rest if rest.strip() else "")
    if new_text != text:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(f".{path.name}.stockade-{os.getpid()}")
        tmp.write_text(new_text)
        tmp.chmod(0o600 if not path.exists() else path.stat().st_mode & 0o777)
        tmp.replace(path)
    names = ", ".join(sorted(keys)) or "none yet"
    console.print(f"{'updated' if had_block else 'added'} the Stockade block in {path}")
    console.print(f"workspaces: {names} — connect with `ssh {HOST_PREFIX}NAME`")


# --- port-forward ---------------------------------------------------------------------------

_FORWARD = re.compile(r"^(?:(\d{1,5}):)?(\d{1,5})$")


def _parse_forward(spec: str) -> Forward:
    match = _FORWARD.match(spec)
    local = int(match.group(1) or match.group(2)) if match else -1
    remote = int(match.group(2)) if match else -1
    if not match or not (0 <= local <= 65535) or not (1 <= remote <= 65535):
        raise UserError(
            f"--tcp takes LOCAL:REMOTE or PORT (ports 1-65535; LOCAL 0 picks one), not {spec!r}"
        )
    return Forward(local, remote)


def port_forward(
    workspace: Annotated[str, typer.Argument(help="NAME or OWNER/NAME")],
    tcp: Annotated[
        list[str],
        typer.Option("--tcp", help="LOCAL:REMOTE (or PORT for both); repeat for more"),
    ],
) -> None:
    """Forward local TCP ports to ports inside a workspace until Ctrl-C.
    Listens on 127.0.0.1 only; every connection gets its own stream."""
    forwards = [_parse_forward(spec) for spec in tcp]
    owner, name = parse_host(workspace)
    session = config.load()
    api = client()
    if owner == "me":
        owner = api.me().username
    api.get_workspace(owner, name)  # a clear error for a workspace that is not there

    def ready(bound: list[tuple[Forward, int]]) -> None:
        for forward, port in bound:
            console.print(
                f"forwarding {forward.local_host}:{port} -> {owner}/{name}:{forward.remote_port}"
            )
        sys.stdout.flush()

    assert session.url and session.token
    try:
        asyncio.run(serve_forwards(session.url, session.token, owner, name, forwards, ready=ready))
    except OSError as exc:
        raise UserError(f"cannot listen: {exc}") from None
    except KeyboardInterrupt:
        pass


def register(app: typer.Typer) -> None:
    app.command("ssh", context_settings={"allow_interspersed_args": False})(ssh)
    app.command("config-ssh")(config_ssh)
    app.command("port-forward")(port_forward)
