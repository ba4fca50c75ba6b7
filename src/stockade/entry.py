"""The ``stockade`` executable: the client CLI plus ``stockade server``.

Kept apart from ``stockade.cli`` so that the CLI package never imports the
server (the layering check enforces it)."""

from __future__ import annotations

import sys

from stockade.cli.main import run
from stockade.server.cli import server_command


def main() -> None:
    sys.exit(run(extra=[server_command()]))


if __name__ == "__main__":
    main()
