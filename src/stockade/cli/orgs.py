"""stockade orgs ...: organizations and their members."""

from __future__ import annotations

from typing import Annotated, cast, get_args

import typer

from stockade.cli.common import OutputOpt, UserError, YesOpt, client, confirm
from stockade.cli.output import Format, console, print_json, show
from stockade.sdk.types import OrgRoleName

app = typer.Typer(no_args_is_help=True)
# Every user belongs to it; commands that take --org default to it.
DEFAULT_ORG = "default"
ORG_ROLES: tuple[str, ...] = get_args(OrgRoleName)
COLUMNS = ["name", "display_name", "description", "is_default", "created_at"]
MEMBER_COLUMNS = ["username", "roles", "implicit"]

OrgOpt = Annotated[
    str, typer.Option("--org", help="the organization (default: the default organization)")
]


def org_roles(values: list[str]) -> list[OrgRoleName]:
    """Check org role names here, so a typo names the valid ones."""
    bad = [v for v in values if v not in ORG_ROLES]
    if bad:
        raise UserError(
            f"unknown organization role(s) {', '.join(bad)}; roles are: {', '.join(ORG_ROLES)}"
        )
    return [cast(OrgRoleName, v) for v in values]


@app.command("list")
def list_(output: OutputOpt = Format.TABLE) -> None:
    """List the organizations you are a member of (site admins: all)."""
    with client() as api:
        show(api.list_organizations().organizations, output, COLUMNS)


@app.command("show")
def show_(org: str, output: OutputOpt = Format.TABLE) -> None:
    """Show one organization."""
    with client() as api:
        show(api.get_organization(org), output, ["id", *COLUMNS, "updated_at"])


@app.command("create")
def create(
    name: str,
    display_name: Annotated[str, typer.Option(help="a name for people")] = "",
    description: Annotated[str, typer.Option(help="what it is for")] = "",
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create an organization (site owners). Add its members with add-member."""
    with client() as api:
        org = api.create_organization(name, display_name=display_name, description=description)
    if output is Format.JSON:
        print_json(org)
        return
    console.print(f"Created organization {org.name}. Add members with:")
    console.print(f"  stockade orgs add-member {org.name} USER [--role org-admin]")


@app.command("delete")
def delete(org: str, yes: YesOpt = False) -> None:
    """Delete an empty organization (no templates, no workspaces; site owners)."""
    confirm(f"Delete organization {org}? Its groups and memberships go with it.", yes)
    with client() as api:
        api.delete_organization(org)
    console.print(f"Deleted organization {org}.")


@app.command("members")
def members(org: str, output: OutputOpt = Format.TABLE) -> None:
    """List an organization's members and their org roles."""
    with client() as api:
        page = api.list_members(org)
    show(page.members, output, MEMBER_COLUMNS)
    if output is Format.TABLE:
        console.print(f"{page.count} member(s)", style="dim")


@app.command("add-member")
def add_member(
    org: str,
    user: str,
    role: Annotated[
        list[str] | None,
        typer.Option(
            "--role",
            help=f"repeatable: {', '.join(ORG_ROLES)}; replaces the roles they hold there",
        ),
    ] = None,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Add USER to ORG, or set their roles there (org-admins and user-admins)."""
    roles = org_roles(role or [])
    with client() as api:
        member = api.set_member(org, user, roles)
    show(member, output, MEMBER_COLUMNS)


@app.command("remove-member")
def remove_member(org: str, user: str) -> None:
    """Remove USER from ORG, with their groups and template access there
    (their workspaces stay). In the default organization: only their org roles."""
    with client() as api:
        api.remove_member(org, user)
    console.print(f"Removed {user} from {org}.")
