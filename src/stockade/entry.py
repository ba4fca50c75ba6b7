"""The ``stockade`` executable: the client CLI plus ``stockade server``.

Kept apart from ``stockade.cli`` so that the CLI package never imports the
server (the layering check enforces it). ``stockade server`` skips importing
the client CLI (Typer, Rich, the SDK): start-up time is a target."""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["server"]:
        from stockade.server.cli import server_command

        server_command().main(args=sys.argv[2:], prog_name="stockade server")
        return
    from stockade.cli.main import run
    from stockade.server.cli import server_command

    sys.exit(run(extra=[server_command()]))


if __name__ == "__main__":
    main()
