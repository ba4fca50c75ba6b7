"""Printing: Rich tables for people, ``--output json`` for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table
from rich.text import Text

# Data from the server (names, messages) is printed as plain text, never parsed
# as Rich markup: a display name like "[/x]" must not break the output.
console = Console(markup=False, highlight=False, emoji=False)
err_console = Console(stderr=True, markup=False, highlight=False, emoji=False)


class Format(StrEnum):
    TABLE = "table"
    JSON = "json"


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(_plain(value), indent=2, sort_keys=True) + "\n")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True) if value else "-"
    return str(value)


def print_table(rows: Sequence[BaseModel], columns: Sequence[str], title: str = "") -> None:
    table = Table(title=title or None, show_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column.upper().replace("_", " "))
    for row in rows:
        table.add_row(*(_cell(getattr(row, c)) for c in columns))
    console.print(table)


def show(value: BaseModel | Sequence[BaseModel], fmt: Format, columns: Sequence[str]) -> None:
    if fmt is Format.JSON:
        print_json(value)
    elif isinstance(value, BaseModel):
        for column in columns:
            label = f"{column.replace('_', ' ')}:"
            console.print(Text.assemble((label, "bold"), " ", _cell(getattr(value, column))))
    else:
        print_table(value, columns)


def fail(message: str) -> None:
    err_console.print(Text.assemble(("error:", "red"), " ", message))
