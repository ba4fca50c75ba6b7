"""stockade terraform mirror import|list: the offline provider mirror that
terraform builds install providers from (nothing is ever downloaded)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import BaseModel

from stockade.cli.common import OutputOpt, UserError
from stockade.cli.output import Format, console, show
from stockade.provisioner.terraform.mirror import (
    MirrorError,
    ProviderPackage,
    import_mirror,
    list_providers,
)
from stockade.sdk.paths import default_terraform_mirror_dir

app = typer.Typer(no_args_is_help=True)
mirror_app = typer.Typer(no_args_is_help=True)
app.add_typer(
    mirror_app,
    name="mirror",
    help="Fill and list the provider mirror terraform builds install providers from.",
)

COLUMNS = ["source", "version", "platform", "layout", "path"]

MirrorDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--mirror-dir",
        help="the mirror (default, as the server's: $STOCKADE_TERRAFORM_MIRROR_DIR, else "
        "$STOCKADE_DATA_DIR/terraform-mirror, else ~/.local/share/stockade/terraform-mirror; "
        "for a provisioner daemon pass its --terraform-mirror-dir, by default "
        "DATA_DIR/terraform-mirror of its --data-dir)",
        show_default=False,
    ),
]


class Package(BaseModel):
    """A provider package as printed."""

    source: str
    hostname: str
    namespace: str
    type: str
    version: str
    platform: str
    layout: str
    path: str


def _rows(packages: list[ProviderPackage]) -> list[Package]:
    return [Package(**p.as_dict()) for p in packages]


def _mirror(mirror_dir: Path | None) -> Path:
    return (mirror_dir or default_terraform_mirror_dir()).expanduser().absolute()


@mirror_app.command("import")
def import_(
    directory: Annotated[
        Path,
        typer.Argument(
            help="what `terraform providers mirror DIR` wrote on a connected machine, "
            "carried across (or an unpacked mirror)",
            show_default=False,
        ),
    ],
    mirror_dir: MirrorDirOpt = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Check a provider mirror directory and copy its packages into the mirror.

    On a machine with internet access, in a template's directory, run
    `terraform providers mirror -platform=linux_amd64 DIR`; carry DIR across,
    then import it here. Nothing is copied unless every file checks out;
    packages the mirror holds already (identical) are left alone."""
    mirror = _mirror(mirror_dir)
    try:
        imported = import_mirror(directory, mirror)
    except MirrorError as exc:
        raise UserError(str(exc)) from None
    if output is Format.JSON:
        show(_rows(imported), output, COLUMNS)
        return
    if not imported:
        console.print(
            f"Nothing new: the mirror {mirror} already holds every package in {directory}."
        )
        return
    count = f"{len(imported)} provider package{'s' if len(imported) != 1 else ''}"
    console.print(f"Imported {count} into {mirror}:")
    show(_rows(imported), output, COLUMNS[:-1])


@mirror_app.command("list")
def list_(mirror_dir: MirrorDirOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """List the provider packages in the mirror (provider, version, platform)."""
    mirror = _mirror(mirror_dir)
    try:
        packages = list_providers(mirror)
    except MirrorError as exc:
        raise UserError(str(exc)) from None
    if output is Format.TABLE and not packages:
        console.print(
            f"The mirror {mirror} holds no providers: fill it with "
            "`stockade terraform mirror import DIR`."
        )
        return
    show(_rows(packages), output, COLUMNS)
