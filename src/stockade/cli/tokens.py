"""stockade tokens ..."""

from __future__ import annotations

from typing import Annotated

import typer

from stockade.cli.common import OutputOpt, YesOpt, client, confirm, parse_duration
from stockade.cli.output import Format, console, show

app = typer.Typer(no_args_is_help=True)
COLUMNS = ["name", "id", "created_at", "expires_at", "last_used_at"]
UserOpt = Annotated[str, typer.Option("--user", "-u", help="whose tokens (default: yours)")]


@app.command("create")
def create(
    name: str,
    lifetime: Annotated[
        str | None, typer.Option(help="e.g. 12h or 30d (default: the server's default)")
    ] = None,
    user: UserOpt = "me",
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create an API token. The secret is printed once; store it now."""
    seconds = parse_duration(lifetime) if lifetime else None
    with client() as api:
        created = api.create_token(name, lifetime_seconds=seconds, user=user)
    if output is Format.JSON:
        show(created, output, COLUMNS)
        return
    console.print(f"Token {created.name} expires {created.expires_at:%Y-%m-%d %H:%M} UTC.")
    console.print("It is shown only this once:")
    print(created.token)


@app.command("list")
def list_(user: UserOpt = "me", output: OutputOpt = Format.TABLE) -> None:
    """List API tokens (never their secrets)."""
    with client() as api:
        show(api.list_tokens(user), output, COLUMNS)


@app.command("revoke")
def revoke(token: str, user: UserOpt = "me", yes: YesOpt = False) -> None:
    """Revoke a token by name or id; it stops working at once."""
    confirm(f"Revoke token {token}?", yes)
    with client() as api:
        api.revoke_token(token, user)
    console.print(f"Revoked {token}.")
