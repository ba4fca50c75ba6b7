"""stockade audit ..."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from stockade.cli.common import OutputOpt, client, query_filters
from stockade.cli.output import Format, console, fail, print_json, print_table

app = typer.Typer(no_args_is_help=True)

ActorOpt = Annotated[str | None, typer.Option(help="username or user id")]
ActionOpt = Annotated[str | None, typer.Option(help="e.g. user.create, user.login")]
TypeOpt = Annotated[str | None, typer.Option("--resource-type", help="e.g. user, api_key")]
IdOpt = Annotated[str | None, typer.Option("--resource-id")]
SinceOpt = Annotated[
    datetime | None, typer.Option(help="from this time (ISO 8601; your local time if no zone)")
]
UntilOpt = Annotated[datetime | None, typer.Option(help="before this time")]


@app.command("list")
def list_(
    actor: ActorOpt = None,
    action: ActionOpt = None,
    resource_type: TypeOpt = None,
    resource_id: IdOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: Annotated[int, typer.Option(help="page size (max 1000)")] = 50,
    offset: Annotated[int, typer.Option(help="entries to skip")] = 0,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Audit entries, newest first."""
    filters = query_filters(
        actor=actor, action=action, resource_type=resource_type,
        resource_id=resource_id, since=since, until=until,
    )  # fmt: skip
    with client() as api:
        page = api.list_audit(limit=limit, offset=offset, **filters)
    if output is Format.JSON:
        print_json(page.entries)
        return
    print_table(
        page.entries,
        ["seq", "time", "username", "action", "resource_type", "resource_name", "status_code",
         "ip"],
    )  # fmt: skip
    console.print(f"{len(page.entries)} of {page.count} entries", style="dim")


@app.command("verify")
def verify(output: OutputOpt = Format.TABLE) -> None:
    """Recompute the hash chain; exit 1 and name the first bad entry if it broke."""
    with client() as api:
        result = api.verify_audit()
    if output is Format.JSON:
        print_json(result)
    elif result.ok:
        console.print(f"ok: {result.checked} entries verified, chain intact.")
    else:
        fail(
            f"audit log tampered: {result.problem} "
            f"(entry seq {result.first_bad_seq}, id {result.first_bad_id or '-'}; "
            f"{result.checked} entries before it verified)"
        )
    if not result.ok:
        raise typer.Exit(1)


@app.command("export")
def export(
    actor: ActorOpt = None,
    action: ActionOpt = None,
    resource_type: TypeOpt = None,
    resource_id: IdOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    out: Annotated[
        Path | None, typer.Option("--file", "-f", help="write here instead of stdout")
    ] = None,
) -> None:
    """Export entries as JSON lines (oldest first), for a SIEM."""
    filters = query_filters(
        actor=actor, action=action, resource_type=resource_type,
        resource_id=resource_id, since=since, until=until,
    )  # fmt: skip
    sink = out.open("w") if out else sys.stdout
    count = 0
    try:
        with client() as api:
            for entry in api.export_audit(**filters):
                sink.write(json.dumps(entry.model_dump(mode="json"), sort_keys=True) + "\n")
                count += 1
    finally:
        if out:
            sink.close()
    if out:
        console.print(f"Exported {count} entries to {out}.")
