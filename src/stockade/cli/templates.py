"""stockade templates ..."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, cast, get_args

import click
import typer
from pydantic import BaseModel

from stockade.cli.common import OutputOpt, UserError, YesOpt, client, confirm
from stockade.cli.orgs import DEFAULT_ORG
from stockade.cli.output import Format, console, print_json, show
from stockade.sdk import types
from stockade.sdk.starters import STARTERS, write_starter
from stockade.sdk.templates import (
    MANIFEST_NAME,
    ArchiveError,
    ManifestError,
    build_archive,
    extract_archive,
    parse_manifest,
    read_directory_files,
)
from stockade.sdk.terraform_variables import merge_terraform_parameters

app = typer.Typer(no_args_is_help=True)
COLUMNS = ["name", "display_name", "backend", "active_version", "archived_at", "updated_at"]
VERSION_COLUMNS = ["number", "active", "message", "size", "archive_sha256", "created_at"]
SHOW_COLUMNS = ["name", "organization", "display_name", "description", "backend",
                "active_version", "archived_at", "created_at", "updated_at"]  # fmt: skip
DirOpt = Annotated[Path, typer.Option("--directory", "-d", help="the template directory")]
TemplateOrgOpt = Annotated[
    str | None,
    typer.Option("--org", help="the template's organization, when its name is in several"),
]
PushOrgOpt = Annotated[
    str | None,
    typer.Option(
        "--org",
        help="the template's organization; for a new template, where to create it "
        "(default: the default organization)",
    ),
]


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="where to write the starter")],
    backend: Annotated[str, typer.Option(help="local, docker, terraform or kubernetes")] = "local",
    name: Annotated[str | None, typer.Option(help="template name (default: from DIR)")] = None,
    force: Annotated[bool, typer.Option("--force", help="write into a non-empty dir")] = False,
) -> None:
    """Write a working starter template (stockade.yaml and README.md) into DIR."""
    if backend not in STARTERS:
        raise UserError(f"unknown backend {backend!r}; choose {', '.join(STARTERS)}")
    if directory.exists() and not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UserError(f"{directory} is not empty; pass --force to write into it anyway")
    name = write_starter(directory, backend, name)
    console.print(f"Wrote a {backend} template {name!r} to {directory}.")
    console.print(f"Push it with: stockade templates push {name} -d {directory}")
    if backend == "terraform":
        console.print(
            "Its builds need a provisioner serving terraform: `stockade provisionerd start "
            "--backend terraform`, or the server with --provisioner-backends "
            "local,docker,terraform (see README.md there)."
        )
    if backend == "kubernetes":
        console.print(
            "Set compute.image to your registry's workspace image first. Its builds need a "
            "provisioner serving kubernetes: the server of deploy/kubernetes/base, or "
            "`stockade provisionerd start --backend kubernetes` (see README.md there)."
        )


@app.command("push")
def push(
    name: str,
    directory: DirOpt = Path("."),
    no_activate: Annotated[
        bool, typer.Option("--no-activate", help="upload without making it active")
    ] = False,
    message: Annotated[str, typer.Option("--message", "-m", help="what changed")] = "",
    org: PushOrgOpt = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Upload DIR as a new immutable version of template NAME."""
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.is_file():
        raise UserError(f"{manifest_path} not found; create one with `stockade templates init`")
    try:
        text = manifest_path.read_bytes()
        manifest = parse_manifest(text, expected_name=name)
        if manifest.backend == "terraform":
            # Its parameters are also its variables: check them before uploading.
            merge_terraform_parameters(
                manifest, read_directory_files(directory), manifest_text=text
            )
    except ManifestError as exc:
        prefix = f"{directory}/" if str(directory) not in ("", ".") else ""
        lines = [f"{prefix}{problem}" for problem in exc.problems]
        raise UserError("invalid manifest:\n" + "\n".join(lines)) from exc
    try:
        archive = build_archive(directory)
    except ArchiveError as exc:
        raise UserError(str(exc)) from exc
    with client() as api:
        version = api.push_template(
            name, archive, activate=not no_activate, message=message, org=org
        )
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
    org: Annotated[str | None, typer.Option("--org", help="only this organization's")] = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """List templates."""
    with client() as api:
        templates = api.list_templates(include_archived=include_archived, org=org).templates
    columns = COLUMNS
    if any(t.organization != DEFAULT_ORG for t in templates):
        columns = [COLUMNS[0], "organization", *COLUMNS[1:]]
    show(templates, output, columns)


@app.command("show")
def show_(name: str, org: TemplateOrgOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """Show one template."""
    with client() as api:
        show(api.get_template(name, org=org), output, SHOW_COLUMNS)


@app.command("versions")
def versions(name: str, org: TemplateOrgOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """List a template's versions, oldest first."""
    with client() as api:
        show(api.list_template_versions(name, org=org), output, VERSION_COLUMNS)


@app.command("pull")
def pull(
    name: str,
    directory: DirOpt,
    version: Annotated[int | None, typer.Option(help="version number (default: active)")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="allow a non-empty DIR (never overwrites files)")
    ] = False,
    org: TemplateOrgOpt = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Download a version (the active one by default) into DIR."""
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise UserError(f"{directory} is not empty; pass --force to write into it anyway")
    with client() as api:
        number = version
        if number is None:
            number = api.get_template(name, org=org).active_version
            if number is None:
                raise UserError(f"template {name} has no active version; pass --version")
        data = api.download_template_version(name, number, org=org)
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
def archive(
    name: str, yes: YesOpt = False, org: TemplateOrgOpt = None, output: OutputOpt = Format.TABLE
) -> None:
    """Archive a template: hidden from members, no new pushes or activations."""
    confirm(f"Archive template {name}?", yes)
    with client() as api:
        result = api.archive_template(name, org=org)
    if output is Format.JSON:
        print_json(result)
        return
    console.print(f"Archived {name}.")


# --- access control list -----------------------------------------------------------------

acl_app = typer.Typer(no_args_is_help=True)
app.add_typer(acl_app, name="acl", help="Show or change who may use or administer a template.")
ACL_ROLES = (*get_args(types.TemplateRole), "none")  # none removes an entry


class AclRow(BaseModel):
    """One ACL entry as a table row."""

    kind: str
    name: str
    role: str


def parse_acl_entries(
    values: list[str] | None, option: str
) -> dict[str, types.TemplateRole | None]:
    """``NAME=use|admin|none`` options to {name: role}; ``none`` (None) removes
    the entry. A bad entry is a usage error naming the option (click's: the
    entry point shows those as ``Error: Invalid value for ...``, exit code 2)."""
    entries: dict[str, types.TemplateRole | None] = {}
    for item in values or []:
        name, eq, role = item.partition("=")
        name, role = name.strip(), role.strip().lower()
        if not eq or not name or role not in ACL_ROLES:
            raise click.BadParameter(
                f"{item!r}: give NAME=ROLE, where ROLE is use, admin or none (none removes "
                "the entry)",
                param_hint=f"'{option}'",
            )
        if name in entries:
            raise click.BadParameter(f"{name!r} is given twice", param_hint=f"'{option}'")
        entries[name] = None if role == "none" else cast(types.TemplateRole, role)
    return entries


def _show_acl(acl: types.TemplateAcl, output: Format) -> None:
    if output is Format.JSON:
        print_json(acl)
        return
    rows = [AclRow(kind="group", name=g.name, role=g.role) for g in acl.groups] + [
        AclRow(kind="user", name=u.username, role=u.role) for u in acl.users
    ]
    console.print(f"Template {acl.template} of organization {acl.organization}:")
    if rows:
        show(rows, output, ["kind", "name", "role"])
    else:
        console.print(
            "no entries: only site owners, template-admins and the organization's admins may use it"
        )


@acl_app.command("show")
def acl_show(name: str, org: TemplateOrgOpt = None, output: OutputOpt = Format.TABLE) -> None:
    """Who may use (use) or administer (admin) template NAME, besides site owners,
    template-admins and its organization's admins."""
    with client() as api:
        _show_acl(api.template_acl(name, org=org), output)


@acl_app.command("set")
def acl_set(
    name: str,
    user: Annotated[
        list[str] | None,
        typer.Option(
            "--user",
            metavar="NAME=ROLE",
            help="a user's role: use, admin, or none to remove it (repeatable)",
        ),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option(
            "--group",
            metavar="NAME=ROLE",
            help="a group's role: use, admin, or none to remove it (repeatable); the "
            "'everyone' group holds every member",
        ),
    ] = None,
    org: TemplateOrgOpt = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Set or remove ACL entries of template NAME (its admins); the others stay."""
    users, groups = parse_acl_entries(user, "--user"), parse_acl_entries(group, "--group")
    if not users and not groups:
        raise UserError("nothing to change: give --user NAME=ROLE or --group NAME=ROLE")
    with client() as api:
        _show_acl(api.update_template_acl(name, users=users, groups=groups, org=org), output)
