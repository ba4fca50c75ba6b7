"""Default locations shared by the server and the command line.

The CLI may not import the server (the import-linter contracts in
pyproject.toml), yet ``stockade terraform mirror`` must find the directory
the server reads by default: both take the defaults from here."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path


def default_data_dir(*, environ: Mapping[str, str] | None = None) -> Path:
    """The server's data directory when neither ``--data-dir`` nor
    ``STOCKADE_DATA_DIR`` says otherwise: ``$XDG_DATA_HOME/stockade``, else
    ``~/.local/share/stockade``."""
    env = os.environ if environ is None else environ
    xdg = env.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "stockade"


def default_terraform_mirror_dir(*, environ: Mapping[str, str] | None = None) -> Path:
    """The provider mirror the server's terraform builds read when its
    configuration file does not name one: ``$STOCKADE_TERRAFORM_MIRROR_DIR``,
    else ``$STOCKADE_DATA_DIR/terraform-mirror``, else the default data
    directory's ``terraform-mirror`` (the server's ``provider_mirror_dir``)."""
    env = os.environ if environ is None else environ
    if env.get("STOCKADE_TERRAFORM_MIRROR_DIR"):
        return Path(env["STOCKADE_TERRAFORM_MIRROR_DIR"])
    data_dir = Path(env["STOCKADE_DATA_DIR"]) if env.get("STOCKADE_DATA_DIR") else None
    return (data_dir or default_data_dir(environ=env)) / "terraform-mirror"
