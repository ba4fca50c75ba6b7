"""stockade groups ...: groups of an organization's members."""

from __future__ import annotations

from typing import Annotated

import typer

from stockade.cli.common import OutputOpt, UserError, YesOpt, client, confirm
from stockade.cli.orgs import DEFAULT_ORG, OrgOpt
from stockade.cli.output import Format, console, print_json, show

app = typer.Typer(no_args_is_help=True)
COLUMNS = ["name", "display_name", "source", "members", "organization"]

UsersArg = Annotated[list[str], typer.Argument(help="usernames", show_default=False)]


@app.command("list")
def list_(org: OrgOpt = DEFAULT_ORG, output: OutputOpt = Format.TABLE) -> None:
    """List an organization's groups ('everyone' holds every member)."""
    with client() as api:
        show(api.list_groups(org).groups, output, COLUMNS)


@app.command("show")
def show_(group: str, org: OrgOpt = DEFAULT_ORG, output: OutputOpt = Format.TABLE) -> None:
    """Show one group and its members."""
    with client() as api:
        show(api.get_group(org, group), output, ["id", *COLUMNS, "created_at", "updated_at"])


@app.command("create")
def create(
    group: str,
    member: Annotated[
        list[str] | None, typer.Option("--member", help="a member's username (repeatable)")
    ] = None,
    display_name: Annotated[str, typer.Option(help="a name for people")] = "",
    org: OrgOpt = DEFAULT_ORG,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Create a group (org-admins and user-admins); members must be in the organization."""
    with client() as api:
        created = api.create_group(org, group, display_name=display_name, members=member or [])
    if output is Format.JSON:
        print_json(created)
        return
    count = len(created.members)
    console.print(f"Created group {created.name} in {created.organization} ({count} member(s)).")


def _change(org: str, group: str, add: list[str], remove: list[str], output: Format) -> None:
    if not add and not remove:
        raise UserError("name at least one user")
    with client() as api:
        changed = api.update_group(org, group, add=add, remove=remove)
    if output is Format.JSON:
        print_json(changed)
        return
    members = ", ".join(changed.members) or "no members"
    console.print(f"Group {changed.name} in {changed.organization}: {members}.")


@app.command("add-members")
def add_members(
    group: str, users: UsersArg, org: OrgOpt = DEFAULT_ORG, output: OutputOpt = Format.TABLE
) -> None:
    """Add users (members of the organization) to GROUP."""
    _change(org, group, users, [], output)


@app.command("remove-members")
def remove_members(
    group: str, users: UsersArg, org: OrgOpt = DEFAULT_ORG, output: OutputOpt = Format.TABLE
) -> None:
    """Remove users from GROUP."""
    _change(org, group, [], users, output)


@app.command("delete")
def delete(group: str, org: OrgOpt = DEFAULT_ORG, yes: YesOpt = False) -> None:
    """Delete a group: templates it gave access to no longer reach its members through it."""
    confirm(f"Delete group {group} of organization {org}?", yes)
    with client() as api:
        api.delete_group(org, group)
    console.print(f"Deleted group {group} of {org}.")
