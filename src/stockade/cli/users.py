"""stockade users ..."""

from __future__ import annotations

from typing import Annotated, cast

import typer

from stockade.cli.common import OutputOpt, UserError, YesOpt, client, confirm, prompt
from stockade.cli.identity import USER_COLUMNS
from stockade.cli.output import Format, console, show
from stockade.sdk.types import RoleName

app = typer.Typer(no_args_is_help=True)
ROLE_NAMES = ("owner", "user-admin", "template-admin", "auditor")


def _roles(values: list[str]) -> list[RoleName]:
    bad = [v for v in values if v not in ROLE_NAMES]
    if bad:
        raise UserError(f"unknown role(s) {', '.join(bad)}; roles are: {', '.join(ROLE_NAMES)}")
    return [cast(RoleName, v) for v in values]


@app.command("create")
def create(
    username: str,
    email: Annotated[str, typer.Option(help="email address")],
    password: Annotated[
        str | None, typer.Option(help="initial password (prompted when omitted)")
    ] = None,
    name: Annotated[str, typer.Option(help="display name")] = "",
    role: Annotated[
        list[str] | None, typer.Option("--role", help=f"repeatable: {', '.join(ROLE_NAMES)}")
    ] = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create a user."""
    password = password or prompt("Password", hide=True, flag="--password")
    with client() as api:
        user = api.create_user(username, email, password, name=name, roles=_roles(role or []))
    show(user, output, USER_COLUMNS)


@app.command("list")
def list_(
    search: Annotated[str | None, typer.Option("--search", "-s", help="text to match")] = None,
    status: Annotated[str | None, typer.Option(help="active or suspended")] = None,
    limit: Annotated[int, typer.Option(help="page size")] = 100,
    offset: Annotated[int, typer.Option(help="rows to skip")] = 0,
    output: OutputOpt = Format.TABLE,
) -> None:
    """List users."""
    with client() as api:
        page = api.list_users(q=search, status=status, limit=limit, offset=offset)
    show(page.users, output, USER_COLUMNS)
    if output is Format.TABLE:
        console.print(f"{len(page.users)} of {page.count} users", style="dim")


@app.command("show")
def show_(user: str, output: OutputOpt = Format.TABLE) -> None:
    """Show one user (id, username or `me`)."""
    with client() as api:
        show(api.get_user(user), output, [*USER_COLUMNS, "created_at", "last_seen_at"])


@app.command("suspend")
def suspend(user: str, yes: YesOpt = False, output: OutputOpt = Format.TABLE) -> None:
    """Suspend a user: their sessions and tokens stop working at once."""
    confirm(f"Suspend {user}?", yes)
    with client() as api:
        show(api.suspend_user(user), output, USER_COLUMNS)


@app.command("activate")
def activate(user: str, output: OutputOpt = Format.TABLE) -> None:
    """Re-activate a suspended user."""
    with client() as api:
        show(api.activate_user(user), output, USER_COLUMNS)


@app.command("roles")
def roles(
    user: str,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="replace the roles with these (repeatable)"),
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="remove every role")] = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Show a user's roles, or replace them with --set / --clear."""
    with client() as api:
        if clear or set_:
            result = api.set_roles(user, [] if clear else _roles(set_ or []))
        else:
            result = api.get_user(user)
    show(result, output, ["username", "roles"])


@app.command("password")
def password(
    user: str,
    new_password: Annotated[
        str | None, typer.Option("--password", help="new password (prompted when omitted)")
    ] = None,
    old_password: Annotated[
        str | None, typer.Option(help="current password, for your own account")
    ] = None,
) -> None:
    """Change a password (yours needs --old-password)."""
    new_password = new_password or prompt("New password", hide=True, flag="--password")
    with client() as api:
        api.change_password(user, new_password, old_password)
    console.print(f"Password changed for {user}.")


@app.command("delete")
def delete(user: str, yes: YesOpt = False) -> None:
    """Delete a user and their tokens."""
    confirm(f"Delete {user}? This cannot be undone.", yes)
    with client() as api:
        api.delete_user(user)
    console.print(f"Deleted {user}.")
