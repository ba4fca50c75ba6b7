"""stockade provisioner-keys ... and stockade provisionerd start."""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Annotated

import typer

from stockade.cli.common import OutputOpt, UserError, YesOpt, client, confirm
from stockade.cli.output import Format, console, print_json, show

keys_app = typer.Typer(no_args_is_help=True)
daemon_app = typer.Typer(no_args_is_help=True)
KEY_COLUMNS = ["name", "id", "created_at", "last_used_at"]


@keys_app.command("list")
def list_(output: OutputOpt = Format.TABLE) -> None:
    """List provisioner keys (owners)."""
    with client() as api:
        show(api.list_provisioner_keys(), output, KEY_COLUMNS)


@keys_app.command("create")
def create(name: str, output: OutputOpt = Format.TABLE) -> None:
    """Create a key for `stockade provisionerd start`; the secret is shown once."""
    with client() as api:
        created = api.create_provisioner_key(name)
        url = api.url
    if output is Format.JSON:
        print_json(created)
        return
    console.print(f"Created provisioner key {created.name}. It is shown only this once:")
    console.print(created.key, soft_wrap=True)
    # In the environment, not on the command line: /proc/*/cmdline is world-readable.
    console.print("Run a provisioner daemon with it (keep the key out of command lines):")
    console.print(
        f"  STOCKADE_PROVISIONER_KEY={created.key} stockade provisionerd start --url {url}",
        soft_wrap=True,
    )


@keys_app.command("delete")
def delete(name: str, yes: YesOpt = False) -> None:
    """Delete a key: daemons using it are refused from their next call."""
    confirm(f"Delete provisioner key {name}? Daemons using it stop working.", yes)
    with client() as api:
        api.delete_provisioner_key(name)
    console.print(f"Deleted provisioner key {name}.")


def _default_data_dir() -> Path:
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "stockade-provisionerd"


@daemon_app.command("start")
def start(
    url: Annotated[
        str | None,
        typer.Option(envvar="STOCKADE_URL", help="the server's URL", show_default=False),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            envvar="STOCKADE_PROVISIONER_KEY",
            help="a provisioner key (stockade provisioner-keys create NAME)",
            show_default=False,
        ),
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            "--backend", help="repeatable: local, docker, terraform, kubernetes (default: all)"
        ),
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="builds run at the same time")] = 1,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="workspace homes and the template cache "
            "(default: ~/.local/share/stockade-provisionerd)",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(help="shown as the builds' worker (default: HOST:PID)", show_default=False),
    ] = None,
    local_allow_unsandboxed: Annotated[
        bool,
        typer.Option(
            "--local-allow-unsandboxed",
            help="run local workspaces as plain processes when bubblewrap is missing",
        ),
    ] = False,
    docker_host: Annotated[
        str, typer.Option(help="Docker Engine API URL (default: $DOCKER_HOST or the socket)")
    ] = "",
    docker_network: Annotated[
        str, typer.Option(help="network workspace containers join (default: per deployment)")
    ] = "",
    terraform_binary: Annotated[
        str, typer.Option(help="the Terraform or OpenTofu CLI: terraform, tofu or a path")
    ] = "terraform",
    terraform_mirror_dir: Annotated[
        Path | None,
        typer.Option(
            help="provider mirror for terraform builds (default: DATA_DIR/terraform-mirror; "
            "fill it with `stockade terraform mirror import`)",
            show_default=False,
        ),
    ] = None,
    kubernetes_config: Annotated[
        str,
        typer.Option(
            help="kubeconfig for kubernetes workspaces (default: in-cluster, else ~/.kube/config)"
        ),
    ] = "",
    kubernetes_namespace: Annotated[
        str, typer.Option(help="namespace of kubernetes workspaces")
    ] = "stockade-workspaces",
    verbose_logs: Annotated[
        bool, typer.Option("--debug", help="log tracebacks of worker errors")
    ] = False,
) -> None:
    """Run builds for a Stockade server on this host until SIGTERM or Ctrl-C."""
    from stockade.provisioner.backends import NAMES
    from stockade.provisioner.daemon import (
        DaemonConfig,
        KeyRefusedError,
        configure_logging,
        serve,
    )

    if not url:
        raise UserError("give the server URL: --url URL (or set STOCKADE_URL)")
    if not url.startswith(("http://", "https://")):
        raise UserError(f"--url must start with http:// or https://, got {url!r}")
    if not key:
        raise UserError(
            "give a provisioner key: --key KEY (or set STOCKADE_PROVISIONER_KEY); an owner "
            "creates one with `stockade provisioner-keys create NAME`"
        )
    backends = list(dict.fromkeys(backend or NAMES))
    unknown = [b for b in backends if b not in NAMES]
    if unknown:
        raise UserError(
            f"unknown backend(s) {', '.join(unknown)}; backends are: {', '.join(NAMES)}"
        )
    config = DaemonConfig(
        url=url.rstrip("/"),
        key=key,
        data_dir=(data_dir or _default_data_dir()).expanduser().absolute(),
        backends=backends,
        workers=workers,
        name=name or "",
        allow_unsandboxed=local_allow_unsandboxed,
        docker_host=docker_host,
        docker_network=docker_network,
        terraform_binary=terraform_binary,
        terraform_mirror_dir=terraform_mirror_dir.expanduser().absolute()
        if terraform_mirror_dir
        else None,
        kubernetes_config=kubernetes_config,
        kubernetes_namespace=kubernetes_namespace,
    )
    configure_logging(logging.DEBUG if verbose_logs else logging.INFO)
    try:
        asyncio.run(serve(config))
    except KeyRefusedError as exc:
        raise UserError(str(exc)) from None
