"""stockade egress ..."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from pydantic import BaseModel

from stockade.cli.common import OutputOpt, client
from stockade.cli.output import Format, console, fail, print_json, print_table
from stockade.sdk import types

app = typer.Typer(no_args_is_help=True)

COLUMNS = ["decision", "source", "kind", "destination", "count", "last_seen", "why"]


class _Row(BaseModel):
    """One destination, narrow enough for a terminal (--output json has all)."""

    decision: str
    source: str
    kind: str
    destination: str
    count: int
    last_seen: datetime
    why: str

    @classmethod
    def of(cls, d: types.EgressDestination) -> _Row:
        return cls(
            decision="allowed" if d.allowed else "DENIED",
            source=f"agent {d.workspace}" if d.workspace else d.component,
            kind=d.kind,
            destination=f"{d.destination}:{d.port}" if d.port else d.destination,
            count=d.count,
            last_seen=d.last_seen,
            why=d.reason + ("" if d.internal or not d.allowed else " (external)"),
        )


@app.command("report")
def report(
    strict: Annotated[
        bool,
        typer.Option(
            help="also fail when a destination was allowed only because egress_allow "
            "names it (every allowed destination must be loopback, private or Stockade's own)"
        ),
    ] = False,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Every outbound connection and name lookup of the server, its build
    workers, provisioner daemons and workspace agents, allowed or denied.
    Exits 1 when anything was denied (or, with --strict, allowed as external),
    so it can gate an accreditation check."""
    with client() as api:
        result = api.egress_report()
    failed = result.denied > 0 or (strict and result.external_allowed > 0)
    if output is Format.JSON:
        print_json(result)
    else:
        if result.destinations:
            print_table([_Row.of(d) for d in result.destinations], COLUMNS)
        console.print("Allow-list: " + ", ".join(result.allow_list))
        if result.denied:
            fail(f"{result.denied} outbound attempts were denied (the DENIED rows).")
        else:
            console.print("No outbound attempt was denied.")
        if result.external_allowed:
            message = (
                f"{result.external_allowed} allowed destinations are not internal: "
                "allowed only because egress_allow names them (external)."
            )
            fail(message) if strict else console.print(message)
        else:
            console.print(
                "Every allowed destination is internal (loopback, a private network or "
                "Stockade's own address)."
            )
    if failed:
        raise typer.Exit(1)
