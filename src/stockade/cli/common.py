"""What every command shares: the client from the saved session, prompts that
never hang without a terminal, durations, the ``--output`` option."""

from __future__ import annotations

import re
import sys
from datetime import datetime
from typing import Annotated, Any

import typer

from stockade.cli import config
from stockade.cli.output import Format
from stockade.sdk import Client


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 1."""


OutputOpt = Annotated[
    Format, typer.Option("--output", "-o", help="table for people, json for scripts")
]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")]


def client() -> Client:
    session = config.load()
    if not session.url:
        raise UserError("not logged in: run `stockade login URL` (or set STOCKADE_URL)")
    if not session.token:
        raise UserError(f"not logged in to {session.url}: run `stockade login {session.url}`")
    return Client(session.url, session.token)


def interactive() -> bool:
    return sys.stdin.isatty()


def prompt(text: str, *, hide: bool = False, flag: str) -> str:
    if not interactive():
        raise UserError(f"{flag} is required when stdin is not a terminal")
    value: str = typer.prompt(text, hide_input=hide)
    return value


def confirm(question: str, yes: bool) -> None:
    if yes:
        return
    if not interactive():
        raise UserError(f"{question} Pass --yes to confirm (stdin is not a terminal).")
    if not typer.confirm(question, default=False):
        raise typer.Exit(1)


_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90``, ``90s``, ``15m``, ``12h`` or ``30d`` to seconds."""
    match = _DURATION.match(text.strip().lower())
    if not match:
        raise UserError(f"cannot read duration {text!r}: use a number with s, m, h or d (e.g. 30d)")
    return int(match.group(1)) * _UNITS[match.group(2)]


def query_filters(**values: Any) -> dict[str, Any]:
    """The filters given (None left out); a time without a zone is the
    user's local time."""
    out = {}
    for key, value in values.items():
        if isinstance(value, datetime) and value.tzinfo is None:
            value = value.astimezone()
        if value is not None:
            out[key] = value
    return out
