"""stockade templates ..."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from stockade.cli.common import OutputOpt, UserError, YesOpt, client, confirm
from stockade.cli.output import Format, console, print_json, show
from stockade.sdk.starters import STARTERS, write_starter
from stockade.sdk.templates import (
    MANIFEST_NAME,
    ArchiveError,
    ManifestError,
    build_archive,
    extract_archive,
    parse_manifest,
)

app = typer.Typer(no_args_is_help=True)
COLUMNS = ["name", "display_name", "backend", "active_version", "archived_at", "updated_at"]
VERSION_COLUMNS = ["number", "active", "message", "size", "archive_sha256", "created_at"]
DirOpt = Annotated[Path, typer.Option("--directory", "-d", help="the template directory")]


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="where to write the starter")],
    backend: Annotated[str, typer.Option(help="local or docker")] = "local",
    name: Annotated[str | None, typer.Option(help="template name (default: from DIR)")] = None,
    force: Annotated[bool, typer.Option("--force", help="write into a non-empty dir")] = False,
) -> None:
    """Write a working starter template (stockade.yaml and README.md) into DIR."""
    if backend not in STARTERS:
        raise UserError(f"unknown backend {backend!r}; choose local or docker")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UserError(f"{directory} is not empty; pass --force to write into it anyway")
    name = write_starter(directory, backend, name)
    console.print(f"Wrote a {backend} template {name!r} to {directory}.")
    console.print(f"Push it with: stockade templates push {name} -d {directory}")


@app.command("push")
def push(
    name: str,
    directory: DirOpt = Path("."),
    no_activate: Annotated[
        bool, typer.Option("--no-activate", help="upload without making it active")
    ] = False,
    message: Annotated[str, typer.Option("--message", "-m", help="what changed")] = "",
    output: OutputOpt = Format.TABLE,
) -> None:
    """Upload DIR as a new immutable version of template NAME."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} not found; create one with `stockade templates init`")
    try:
        parse_manifest(manifest_path.read_bytes(), expected_name=name)
    except ManifestError as exc:
        prefix = f"{directory}/" if str(directory) not in ("", ".") else ""
        lines = [f"{prefix}{problem}" for problem in exc.problems]
        raise UserError("invalid manifest:\n" + "\n".join(lines)) from exc
    try:
        archive = build_archive(directory)
    except ArchiveError as exc:
        raise UserError(str(exc)) from exc
    with client() as api:
        version = api.push_template(name, archive, activate=not no_activate, message=message)
    if output is Format.JSON:
        print_json(version)
        return
    state = "active" if version.active else "not active"
    console.print(f"Pushed {name} version {version.number} ({version.size} bytes, {state}).")


@app.command("list")
def list_(
    include_archived: Annotated[
        bool, typer.Option("--include-archived", help="also archived templates (admins)")
    ] = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """List templates."""
    with client() as api:
        show(api.list_templates(include_archived=include_archived).templates, output, COLUMNS)


@app.command("versions")
def versions(name: str, output: OutputOpt = Format.TABLE) -> None:
    """List a template's versions, oldest first."""
    with client() as api:
        show(api.list_template_versions(name), output, VERSION_COLUMNS)


@app.command("pull")
def pull(
    name: str,
    directory: DirOpt,
    version: Annotated[int | None, typer.Option(help="version number (default: active)")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="allow a non-empty DIR (never overwrites files)")
    ] = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Download a version (the active one by default) into DIR."""
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UserError(f"{directory} is not empty; pass --force to write into it anyway")
    with client() as api:
        number = version
        if number is None:
            number = api.get_template(name).active_version
            if number is None:
                raise UserError(f"template {name} has no active version; pass --version")
        data = api.download_template_version(name, number)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as staging:
        try:
            extract_archive(data, Path(staging))
        except ArchiveError as exc:
            raise UserError(f"the downloaded archive is unsafe: {exc}") from exc
        for item in sorted(Path(staging).iterdir()):
            target = directory / item.name
            if target.exists() or target.is_symlink():
                raise UserError(f"{target} already exists; pull into an empty directory")
            item.rename(target)
    if output is Format.JSON:
        print_json({"name": name, "version": number, "directory": str(directory)})
        return
    console.print(f"Pulled {name} version {number} into {directory}.")


@app.command("archive")
def archive(name: str, yes: YesOpt = False, output: OutputOpt = Format.TABLE) -> None:
    """Archive a template: hidden from members, no new pushes or activations."""
    confirm(f"Archive template {name}?", yes)
    with client() as api:
        result = api.archive_template(name)
    if output is Format.JSON:
        print_json(result)
        return
    console.print(f"Archived {name}.")
