"""``stockade ssh --stdio HOST``: the ProxyCommand OpenSSH runs for every
connection to ``stockade.*`` hosts.

It runs once per ``ssh``, ``scp``, ``rsync`` or ``git`` command, so it starts
without the rest of the CLI (Typer, Rich, pydantic, httpx take about a
second to import): the entry point sends it here directly. It relays
stdin/stdout to the workspace's SSH server through the control plane and,
with ``--known-hosts FILE``, first makes sure FILE has the workspace's host
key (asked of the control plane, over the authenticated API: never trusted
on first use).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from stockade.cli import config
from stockade.sdk.tls import CaFileError, client_ssl_context

HOST_PREFIX = "stockade."
USAGE = "usage: stockade ssh --stdio [--known-hosts FILE] HOST"


class StdioError(Exception):
    """Printed as one line on stderr; exit status 255 like ssh's own failures."""


def parse_host(host: str) -> tuple[str, str] | None:
    """``stockade.NAME`` / ``stockade.OWNER.NAME`` / ``NAME`` / ``OWNER/NAME``
    to (owner, name); owner ``me`` is the signed-in user. None if malformed."""
    text = host[len(HOST_PREFIX) :] if host.startswith(HOST_PREFIX) else host
    owner, sep, name = text.rpartition("." if "." in text else "/")
    if not sep:
        owner, name = "me", text
    if not name or not owner or "/" in name or "." in owner or "/" in owner:
        return None
    return owner, name


# --- known hosts --------------------------------------------------------------------


def known_lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def write_known_hosts(path: Path, entries: dict[str, str], *, replace_all: bool) -> None:
    """Set the key of each alias (``entries``: alias -> 'type base64'); with
    ``replace_all`` the file holds exactly ``entries`` afterwards."""
    kept = []
    if not replace_all:
        kept = [line for line in known_lines(path) if line.split(" ", 1)[0] not in entries]
    lines = kept + [f"{alias} {key}" for alias, key in sorted(entries.items())]
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.chmod(0o600)
    tmp.replace(path)


def _get_json(url: str, token: str, path: str) -> dict[str, object]:
    if not url.startswith(("http://", "https://")):
        raise StdioError(f"the server URL must be http(s), not {url!r}")
    headers = {"Authorization": f"Bearer {token}"}
    request = urllib.request.Request(url.rstrip("/") + path, headers=headers)  # noqa: S310
    context = None
    if url.startswith("https://"):
        try:
            context = client_ssl_context()
        except CaFileError as exc:
            raise StdioError(str(exc)) from None
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as response:  # noqa: S310 - checked above
            body: dict[str, object] = json.load(response)
            return body
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc).get("message") or f"HTTP {exc.code}"
        except (ValueError, AttributeError):
            message = f"HTTP {exc.code}"
        raise StdioError(str(message)) from None
    except (urllib.error.URLError, OSError) as exc:
        raise StdioError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None


def ensure_known_host(url: str, token: str, path: Path, alias: str, owner: str, name: str) -> None:
    """Put the workspace's host key in ``path`` unless it is there already."""
    if any(line.split(" ", 1)[0] == alias for line in known_lines(path)):
        return
    if owner == "me":
        owner = str(_get_json(url, token, "/api/v2/users/me")["username"])
    quoted = f"{urllib.parse.quote(owner)}/{urllib.parse.quote(name)}"
    info = _get_json(url, token, f"/api/v2/workspaces/{quoted}/ssh")
    write_known_hosts(path, {alias: str(info["host_public_key"])}, replace_all=False)


# --- the relay ----------------------------------------------------------------------


def run(host: str, known_hosts: Path | None) -> int:
    from stockade.sdk.tunnel import StreamSpec, TunnelError, open_stream, pipe_stdio
    from stockade.tunnel.protocol import KIND_SSH

    parsed = parse_host(host)
    if parsed is None:
        raise StdioError(f"not a workspace host name: {host!r} (stockade.NAME or OWNER/NAME)")
    owner, name = parsed
    session = config.load()
    if not session.url or not session.token:
        raise StdioError("not logged in: run `stockade login URL` (or set STOCKADE_URL)")
    if known_hosts is not None:
        ensure_known_host(session.url, session.token, known_hosts, host, owner, name)
    url, token = session.url, session.token

    async def relay() -> None:
        ws = await open_stream(url, token, StreamSpec(owner, name, KIND_SSH))
        await pipe_stdio(ws)

    try:
        asyncio.run(relay())
    except TunnelError as exc:
        raise StdioError(str(exc)) from None
    return 0


def main(argv: list[str]) -> int:
    """``argv``: the arguments after ``ssh``."""
    args = [arg for arg in argv if arg != "--stdio"]
    known_hosts: Path | None = None
    if args[:1] == ["--known-hosts"] and len(args) >= 2:
        known_hosts = Path(args[1])
        args = args[2:]
    if len(args) != 1 or args[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        return run(args[0], known_hosts)
    except StdioError as exc:
        print(f"stockade: {exc}", file=sys.stderr, flush=True)
        return 255
    except KeyboardInterrupt:
        return 130
