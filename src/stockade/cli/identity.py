"""login, logout, whoami."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Annotated

import typer

from stockade.cli import config
from stockade.cli.common import OutputOpt, UserError, client, interactive, prompt
from stockade.cli.output import Format, console, show
from stockade.sdk import ApiError, Client

# The dashboard page that makes a CLI token (stockade.server.web.cli_auth).
CLI_AUTH_PATH = "/cli-auth"

USER_COLUMNS = ["username", "email", "name", "status", "roles", "id"]


def login(
    url: Annotated[
        str | None, typer.Argument(help="server URL, e.g. http://stockade.internal:7080")
    ] = None,
    username: Annotated[str | None, typer.Option(help="username or email")] = None,
    password: Annotated[
        str | None,
        typer.Option(help="password (or set STOCKADE_PASSWORD; prompted when omitted)"),
    ] = None,
    first_user: Annotated[
        bool, typer.Option("--first-user", help="create the first user (the owner), then log in")
    ] = False,
    email: Annotated[str | None, typer.Option(help="email of the first user")] = None,
    name: Annotated[str, typer.Option(help="display name of the first user")] = "",
    sso: Annotated[
        bool,
        typer.Option(
            "--sso",
            help="sign in with single sign-on: open the printed page in a browser, sign in, "
            "and paste the token it shows",
        ),
    ] = False,
    token: Annotated[
        str | None,
        typer.Option(help="an API token to log in with (e.g. the one the --sso page shows)"),
    ] = None,
) -> None:
    """Log in and save the session for later commands."""
    url = url or config.load().url
    if not url:
        raise UserError("give the server URL: stockade login http://HOST:PORT")
    url = url.rstrip("/")
    if sso or token:
        _login_with_token(url, token)
        return
    password = password or os.environ.get("STOCKADE_PASSWORD")
    with Client(url) as api:
        if first_user or (interactive() and username is None and api.first_user_required()):
            if not api.first_user_required():
                raise UserError("the first user already exists: log in without --first-user")
            username = username or prompt("Username for the owner", flag="--username")
            email = email or prompt("Email", flag="--email")
            password = password or _new_password()
            api.create_first_user(username, email, password, name)
            console.print(f"Created the first user {username} (owner).")
        username = username or prompt("Username", flag="--username")
        password = password or prompt("Password", hide=True, flag="--password")
        result = api.login(username, password)
    path = config.save(url, result.session_token)
    console.print(f"Logged in to {url} as {result.user.username}. Session saved in {path}.")


def _login_with_token(url: str, token: str | None) -> None:
    """Single sign-on happens in the browser: the dashboard's CLI page makes
    an API token, which is pasted here (or given with --token)."""
    if not token:
        with Client(url) as api:
            try:
                methods = api.auth_methods()
            except ApiError as exc:
                raise UserError(f"{url} does not say how to sign in: {exc.message}") from None
        if not methods.oidc.enabled:
            raise UserError(
                f"{url} has no single sign-on; log in with a password: stockade login {url}"
            )
        typer.echo(
            f"Open this page in your browser, sign in ({methods.oidc.sign_in_text}) and create "
            f"a CLI token:\n\n    {url}{CLI_AUTH_PATH}\n"
        )
        token = _read_token()
    with Client(url, token.strip()) as api:
        try:
            user = api.me()
        except ApiError as exc:
            raise UserError(f"that token was not accepted: {exc.message}") from None
    path = config.save(url, token.strip())
    console.print(f"Logged in to {url} as {user.username}. Token saved in {path}.")


def _read_token() -> str:
    if interactive():
        value: str = typer.prompt("Paste the token", hide_input=True)
        return value
    # Piped (echo TOKEN | stockade login URL --sso): one line from stdin.
    line = sys.stdin.readline().strip()
    if not line:
        raise UserError("no token was given: paste it, pipe it in, or pass --token")
    return line


def _new_password() -> str:
    first = prompt("Password", hide=True, flag="--password")
    if prompt("Repeat password", hide=True, flag="--password") != first:
        raise UserError("the passwords do not match")
    return first


def logout() -> None:
    """End the session on the server and forget it here."""
    session = config.load()
    if session.url and session.token:
        # Forgetting the session locally is what matters; the server may be gone.
        with Client(session.url, session.token) as api, contextlib.suppress(Exception):
            api.logout()
    console.print("Logged out." if config.clear() else "No saved session.")


def whoami(output: OutputOpt = Format.TABLE) -> None:
    """Show the signed-in user."""
    with client() as api:
        show(api.me(), output, USER_COLUMNS)


def register(app: typer.Typer) -> None:
    app.command()(login)
    app.command()(logout)
    app.command()(whoami)
