"""stockade aibridge ..."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table
from rich.text import Text

from stockade.cli.audit import SinceOpt, UntilOpt
from stockade.cli.common import OutputOpt, UserError, client, query_filters
from stockade.cli.output import Format, console, print_json

if TYPE_CHECKING:
    pass

app = typer.Typer(no_args_is_help=True)

UserOpt = Annotated[str | None, typer.Option(help="username (others' need owner or auditor)")]
WorkspaceOpt = Annotated[str | None, typer.Option(help="workspace name")]
ProviderOpt = Annotated[str | None, typer.Option(help="openai or anthropic")]
ModelOpt = Annotated[str | None, typer.Option(help="model name")]


def _shorten(text: str | None, width: int = 60) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@app.command("list")
def list_(
    user: UserOpt = None,
    workspace: WorkspaceOpt = None,
    provider: ProviderOpt = None,
    model: ModelOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    limit: Annotated[int, typer.Option(help="page size (max 1000)")] = 50,
    offset: Annotated[int, typer.Option(help="records to skip")] = 0,
    output: OutputOpt = Format.TABLE,
) -> None:
    """Requests through the AI bridge, newest first (everyone's for owners, auditors)."""
    filters = query_filters(
        user=user, workspace=workspace, provider=provider, model=model, since=since, until=until
    )
    with client() as api:
        page = api.list_aibridge(limit=limit, offset=offset, **filters)
    if output is Format.JSON:
        print_json(page.items)
        return
    table = Table(show_edge=False, header_style="bold")
    for column in ("ID", "TIME", "USER", "WORKSPACE", "MODEL", "TOKENS IN/OUT", "TOOLS",
                   "OUTCOME", "MS", "PROMPT"):  # fmt: skip
        table.add_column(column)
    for item in page.items:
        outcome = item.outcome if item.status < 400 else f"{item.outcome} ({item.status})"
        table.add_row(
            item.id[:8],
            f"{item.created_at.astimezone():%Y-%m-%d %H:%M:%S}",
            item.username,
            item.workspace_name or "-",
            f"{item.provider}/{item.model}",
            f"{item.input_tokens}/{item.output_tokens}",
            str(len(item.tool_calls)),
            outcome,
            str(item.latency_ms),
            Text(_shorten(item.prompt)),
        )
    console.print(table)
    console.print(f"{len(page.items)} of {page.count} requests", style="dim")


@app.command("show")
def show(
    record_id: Annotated[str, typer.Argument(help="the record's id (see list --output json)")],
    output: OutputOpt = Format.TABLE,
) -> None:
    """One request: the whole prompt, each tool call with its arguments, tokens."""
    with client() as api:
        if len(record_id) < 36:  # the short id that list shows
            matches = [r for r in api.list_aibridge(limit=1000).items if r.id.startswith(record_id)]
            if len(matches) > 1:
                raise UserError(
                    f"{len(matches)} records have ids starting with {record_id!r}; "
                    "give more of the id"
                )
            if matches:
                record_id = matches[0].id
        item = api.get_aibridge(record_id)
    if output is Format.JSON:
        print_json(item)
        return
    where = f" in workspace {item.workspace_name}" if item.workspace_name else ""
    console.print(f"{item.id}  {item.created_at.astimezone():%Y-%m-%d %H:%M:%S}", style="bold")
    console.print(f"{item.username}{where} → {item.provider} {item.endpoint}, model {item.model}")
    console.print(
        f"{item.outcome}, HTTP {item.status}, {item.latency_ms} ms"
        + (
            f" (first bytes after {item.first_byte_ms} ms)"
            if item.first_byte_ms is not None
            else ""
        )
        + (", streamed" if item.streamed else "")
    )
    console.print(
        f"tokens: {item.input_tokens} in, {item.output_tokens} out, "
        f"{item.cache_read_tokens} cache read, {item.cache_write_tokens} cache write"
    )
    if item.error:
        console.print(f"error: {item.error}", style="red")
    console.print("prompt", style="bold")
    console.print(item.prompt or "(none)")
    for call in item.tool_calls:
        console.print(f"tool call {call.name}", style="bold")
        console.print(call.arguments)


@app.command("export")
def export(
    user: UserOpt = None,
    workspace: WorkspaceOpt = None,
    provider: ProviderOpt = None,
    model: ModelOpt = None,
    since: SinceOpt = None,
    until: UntilOpt = None,
    out: Annotated[
        Path | None, typer.Option("--file", "-f", help="write here instead of stdout")
    ] = None,
) -> None:
    """Export records as JSON lines (oldest first), for a SIEM."""
    filters = query_filters(
        user=user, workspace=workspace, provider=provider, model=model, since=since, until=until
    )
    sink = out.open("w") if out else sys.stdout
    count = 0
    try:
        with client() as api:
            for item in api.export_aibridge(**filters):
                sink.write(json.dumps(item.model_dump(mode="json"), sort_keys=True) + "\n")
                count += 1
    finally:
        if out:
            sink.close()
    if out:
        console.print(f"Exported {count} records to {out}.")


@app.command("env")
def env(
    with_token: Annotated[
        bool,
        typer.Option(help="also set the API keys to this login's token (it then acts as you)"),
    ] = False,
) -> None:
    """Shell lines that point OpenAI and Anthropic clients at this server's bridge.

    For a coding agent on your machine: eval "$(stockade aibridge env --with-token)".
    Workspaces get these variables from their agent already."""
    with client() as api:
        base = api.url.rstrip("/")
        token = api.token or ""
    lines = {
        "OPENAI_BASE_URL": f"{base}/api/v2/aibridge/openai/v1",
        "ANTHROPIC_BASE_URL": f"{base}/api/v2/aibridge/anthropic",
    }
    if with_token:
        lines |= {"OPENAI_API_KEY": token, "ANTHROPIC_API_KEY": token}
    for name, value in lines.items():
        typer.echo(f"export {name}={shlex.quote(value)}")
