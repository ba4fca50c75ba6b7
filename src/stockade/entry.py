"""The ``stockade`` executable: the client CLI plus ``stockade server``.

Kept apart from ``stockade.cli`` so that the CLI package never imports the
server (the layering check enforces it). Neither side pays for the other's
imports: ``stockade server`` skips the client CLI (Typer, Rich, the SDK), and
client commands see ``server`` as a stub that loads the real command (and the
server's settings) only when it runs."""

from __future__ import annotations

import sys

import click


def _server_command() -> click.Command:
    from stockade.server.cli import server_command

    return server_command()


@click.command(
    "server",
    help="Run the control plane: API, dashboard and provisioners, on one port.",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def _server_stub(ctx: click.Context) -> None:
    _server_command().main(args=ctx.args, prog_name="stockade server")


def main() -> None:
    if sys.argv[1:2] == ["ssh"] and "--stdio" in sys.argv[2:]:
        # OpenSSH's ProxyCommand: one per ssh/scp/git run, so skip the CLI's imports.
        from stockade.cli import stdio

        sys.exit(stdio.main(sys.argv[2:]))
    if sys.argv[1:2] == ["server"]:
        _server_command().main(args=sys.argv[2:], prog_name="stockade server")
        return
    from stockade.cli.main import run

    sys.exit(run(extra=[_server_stub]))


if __name__ == "__main__":
    main()
