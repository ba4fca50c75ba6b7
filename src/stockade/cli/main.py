"""``stockade``: the command line. Commands live in one module per area."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated

import click
import typer
from pydantic import ValidationError

from stockade.cli import (
    aibridge,
    airgap,
    audit,
    common,
    egress,
    groups,
    identity,
    orgs,
    provisioners,
    ssh,
    templates,
    terraform,
    tokens,
    users,
    workspaces,
)
from stockade.cli.output import fail
from stockade.sdk import ApiError, ConnectionFailed

app = typer.Typer(
    name="stockade",
    help="Stockade: self-hosted, offline remote developer workspaces.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
identity.register(app)
app.add_typer(users.app, name="users", help="Manage users and their roles.")
app.add_typer(tokens.app, name="tokens", help="Create, list and revoke API tokens.")
app.add_typer(audit.app, name="audit", help="Read, verify and export the audit log.")
app.add_typer(
    aibridge.app,
    name="aibridge",
    help="What went through the AI bridge (prompts, tool calls, tokens); point clients at it.",
)
app.add_typer(templates.app, name="templates", help="Write, push, list and pull templates.")
app.add_typer(orgs.app, name="orgs", help="Manage organizations and their members.")
app.add_typer(groups.app, name="groups", help="Manage an organization's groups.")
app.add_typer(airgap.app, name="airgap", help="Build, verify and install offline bundles.")
app.add_typer(terraform.app, name="terraform", help="The offline Terraform provider mirror.")
app.add_typer(
    egress.app, name="egress", help="Show what the deployment tried to reach (owners, auditors)."
)
workspaces.register(app)
ssh.register(app)
app.add_typer(
    provisioners.keys_app,
    name="provisioner-keys",
    help="Create, list and delete keys for provisioner daemons (owners).",
)
app.add_typer(
    provisioners.daemon_app,
    name="provisionerd",
    help="Run builds on this host for a Stockade server.",
)


@app.callback()
def _global(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="show tracebacks on errors")
    ] = False,
) -> None:
    if verbose:
        os.environ["STOCKADE_VERBOSE"] = "1"


def run(argv: list[str] | None = None, extra: list[object] | None = None) -> int:
    """Run the CLI and turn expected failures into one line and exit code 1.
    ``extra`` holds click commands registered by the entry point (``server``)."""
    command = typer.main.get_command(app)
    for cmd in extra or []:
        command.add_command(cmd)  # type: ignore[attr-defined]
    verbose = "--verbose" in (argv or sys.argv) or "-v" in (argv or sys.argv)
    try:
        result = command.main(args=argv, prog_name="stockade", standalone_mode=False)
    except (common.UserError, ApiError, ConnectionFailed, ValidationError) as exc:
        if verbose:
            traceback.print_exc()
        fail(_describe(exc))
        return 1
    except (typer.Exit, click.exceptions.Exit) as exc:
        return exc.exit_code
    except typer.Abort:
        fail("aborted")
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # click's own usage errors
        # typer 0.29 raises its bundled copy of click's exceptions, which are
        # not click.ClickException: both have show() and exit_code.
        if isinstance(exc, click.ClickException) or (
            callable(getattr(exc, "show", None))
            and isinstance(getattr(exc, "exit_code", None), int)
        ):
            exc.show()  # type: ignore[attr-defined]
            return exc.exit_code  # type: ignore[attr-defined,no-any-return]
        if verbose:
            raise
        fail(f"unexpected error: {exc} (run with --verbose for details)")
        return 1
    # click returns the exit code of typer.Exit (and --help) in this mode.
    return result if isinstance(result, int) else 0


def _describe(exc: Exception) -> str:
    if isinstance(exc, ApiError):
        return exc.message
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    return str(exc)


def main() -> None:
    sys.exit(run())
