"""``stockade server``: flags generated from ``Settings`` so the help text has
one source."""

from __future__ import annotations

import os
import types as pytypes
import typing
from pathlib import Path
from typing import Any

import click
from pydantic import ValidationError

from stockade.server.settings import Settings


def _option(name: str, annotation: Any, help_text: str, default: Any) -> click.Option:
    flag = "--" + name.replace("_", "-")
    env = f"STOCKADE_{name.upper()}"
    args = typing.get_args(annotation)
    base = next((a for a in args if a is not type(None)), annotation) if args else annotation
    shown = "" if default in (None, "") or callable(default) else f" [default: {default}]"
    help_line = f"{help_text}{shown} [env: {env}]"
    if base is bool:
        return click.Option([f"{flag}/--no-{flag[2:]}", name], default=None, help=help_line)
    click_type: Any = {int: click.INT, Path: click.Path(path_type=Path)}.get(base, click.STRING)
    return click.Option([flag, name], type=click_type, default=None, help=help_line)


def _serve(config: str | None, **flags: Any) -> None:
    if config:
        if not Path(config).is_file():
            raise click.UsageError(f"config file {config} does not exist")
        os.environ["STOCKADE_CONFIG"] = config
    try:
        settings = Settings(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise click.UsageError(f"invalid settings: {problems}") from exc
    from stockade.server.run import serve  # heavy imports only when serving

    serve(settings)


def server_command() -> click.Command:
    params: list[click.Parameter] = [
        click.Option(
            ["--config", "config"],
            type=click.Path(),
            default=None,
            help="TOML file with settings (keys as the flag names with underscores) "
            "[env: STOCKADE_CONFIG]",
        )
    ]
    for name, field in Settings.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, pytypes.UnionType):
            annotation = typing.Union[annotation.__args__]  # noqa: UP007
        default = field.default if field.default_factory is None else field.default_factory
        params.append(_option(name, annotation, field.description or "", default))
    return click.Command(
        "server",
        callback=_serve,
        params=params,
        help="Run the control plane: API, dashboard and provisioners, on one port.",
    )
