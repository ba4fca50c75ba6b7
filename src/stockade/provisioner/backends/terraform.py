"""The terraform backend: a template's ``.tf`` files, run by the Terraform or
OpenTofu CLI, make the workspace.

Every build gets a clean working directory (``BUILDS/<build id>-<random>``,
removed at the end, because the plan file holds the variables' values): the
template's files, an override that keeps the state local, the state of the
workspace's previous build, and a CLI configuration that installs providers
only from the offline mirror. Then ``init``, ``plan`` (``-destroy`` for a
delete) and ``apply`` of that plan, with the machine-readable output (``-json``)
turned into the build's log and stages. The state afterwards, successful or
not, goes back to the server, which keeps it per workspace, encrypted at rest
(``SEALED_STATE_KEY``); a build holds the workspace's only running build slot
and its lease for its whole length, which is the state's lock.

What a template receives, as Terraform variables it may declare (undeclared
ones are ignored): see :func:`stockade_variables` and docs/terraform.md. The
template's compute runs ``var.stockade_agent_init_script`` to start the agent,
as on every other backend; ``var.stockade_start_count`` (1 on start, 0 on stop
and delete) is the ``count`` of what a stop removes, and what has no such
count (a home volume) persists until the workspace is deleted.

What comes back: the managed resources in the state (shown on the workspace)
and the outputs ``stockade_metadata`` (a map of strings shown with them) and
``stockade_apps`` (apps, as in ``stockade.yaml``, added to the template's).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import shlex
import shutil
import time
from pathlib import Path
from typing import Any, ClassVar, Literal

from stockade.agent.bundle import BOOTSTRAP_SCRIPT
from stockade.provisioner.backends.base import (
    AGENT_CA_ENV,
    SEALED_STATE_KEY,
    Backend,
    BackendError,
    BackendOptions,
    ComputeStatus,
    Orphan,
    Progress,
    WorkspaceSpec,
    agent_environment,
    token_fingerprint,
)
from stockade.provisioner.terraform import cli as tfcli
from stockade.provisioner.terraform.mirror import missing_provider_help
from stockade.sdk.templates import ManifestError, output_apps, read_directory_files
from stockade.sdk.terraform_variables import declared_variables

Transition = Literal["start", "stop", "delete"]

STATE_FILE = "terraform.tfstate"
PLAN_FILE = "stockade.tfplan"
VARS_FILE = "stockade.tfvars.json"
# What a template author's own terraform runs leave in the template directory
# (a pushed terraform.tfstate would become every new workspace's state).
LEFTOVERS = (
    "terraform.tfstate",
    "terraform.tfstate.backup",
    "terraform.tfstate.d",
    ".terraform",
    PLAN_FILE,
)
# Replaces any backend the template configures: the state lives in Stockade.
OVERRIDE_FILE = "zz_stockade_override.tf"
OVERRIDE = """\
# Written by Stockade: the state of a workspace is kept by Stockade's server.
terraform {
  backend "local" {
    path = "terraform.tfstate"
  }
}
"""
_FINDING = re.compile(
    r'Finding (?:latest version of )?(\S+?)(?: versions matching "([^"]*)")?\.\.\.'
)
_PROVIDER_NOT_FOUND = re.compile(
    r"(?:available versions for provider\s+|provider\s+)([\w.-]+(?:/[\w.-]+){1,2})[:\s]", re.S
)
# No build runs longer than this; a younger build directory may be running.
STALE_BUILD_SECONDS = 86400.0
_WORKSPACE_ID = re.compile(r"^[0-9a-f-]{8,64}$")


def stockade_variables(
    spec: WorkspaceSpec, transition: Transition, workspace_dir: Path
) -> dict[str, str | int]:
    """The values Stockade passes a template, by variable name."""
    start = transition == "start"
    return {
        "stockade_workspace_id": spec.workspace_id,
        "stockade_workspace_name": spec.workspace_name,
        "stockade_owner": spec.owner_username,
        "stockade_owner_id": spec.owner_id,
        "stockade_template": spec.template_name,
        "stockade_template_version": spec.template_version,
        "stockade_build_number": spec.build_number,
        "stockade_transition": transition,
        "stockade_start_count": 1 if start else 0,
        "stockade_access_url": spec.access_url,
        "stockade_deployment_id": spec.deployment_id,
        "stockade_workspace_dir": str(workspace_dir),
        # Changes with every start build's new token: the compute's
        # triggers_replace, so that it restarts with the token that works.
        "stockade_agent_fingerprint": token_fingerprint(spec.agent_token) if start else "",
        "stockade_agent_token": (spec.agent_token or "") if start else "",
        "stockade_agent_init_script": agent_init_script(spec) if start else "",
    }


def agent_init_script(spec: WorkspaceSpec) -> str:
    """A self-contained ``sh`` script that starts the workspace agent: the
    control plane's URL, the agent token (a secret), the CA when there is a
    private one, then the bootstrap every backend runs."""
    ca_path = '"${HOME:-/tmp}/.stockade-agent-ca.pem"' if spec.agent_ca else None
    env = agent_environment(spec, ca_path="CA" if spec.agent_ca else None)
    lines = ["#!/bin/sh", "# Written by Stockade: starts this workspace's agent."]
    for name, value in sorted(env.items()):
        if name == AGENT_CA_ENV:
            continue
        lines.append(f"{name}={shlex.quote(value)}; export {name}")
    if spec.agent_ca and ca_path:
        marker = "STOCKADE_CA_" + secrets.token_hex(4).upper()
        lines += [
            f"umask 022; cat > {ca_path} <<'{marker}'",
            spec.agent_ca.rstrip("\n"),
            marker,
            f"{AGENT_CA_ENV}={ca_path}; export {AGENT_CA_ENV}",
        ]
    return "\n".join(lines) + "\n" + BOOTSTRAP_SCRIPT


def _resources(tfstate: dict[str, Any]) -> list[dict[str, Any]]:
    """The managed resource instances a state holds, for the workspace page."""
    found = []
    for resource in tfstate.get("resources") or []:
        if resource.get("mode") != "managed":
            continue
        base = f"{resource.get('type')}.{resource.get('name')}"
        if resource.get("module"):
            base = f"{resource['module']}.{base}"
        for instance in resource.get("instances") or []:
            key = instance.get("index_key")
            address = base if key is None else f"{base}[{json.dumps(key)}]"
            found.append(
                {
                    "address": address,
                    "type": resource.get("type"),
                    "name": resource.get("name"),
                    "tainted": instance.get("status") == "tainted",
                }
            )
    return found


def _outputs(tfstate: dict[str, Any]) -> dict[str, Any]:
    """The outputs Stockade reads (``stockade_metadata``, ``stockade_apps``);
    sensitive ones are never read."""
    outputs = tfstate.get("outputs") or {}
    kept: dict[str, Any] = {}
    for name in ("stockade_metadata", "stockade_apps"):
        item = outputs.get(name)
        if isinstance(item, dict) and not item.get("sensitive"):
            kept[name] = item.get("value")
    return kept


class TerraformBackend(Backend):
    """Runs a template's ``.tf`` files with the Terraform or OpenTofu CLI; see
    the module docstring."""

    name: ClassVar[str] = "terraform"

    def __init__(self, options: BackendOptions) -> None:
        self.options = options
        root = options.workspaces_dir.parent / "terraform"
        self.builds_dir = root / "builds"
        self.workspaces_root = root / "workspaces"
        self.mirror_dir = options.terraform_mirror_dir or options.workspaces_dir.parent / (
            "terraform-mirror"
        )
        self._cli: tfcli.CliVersion | None = None
        self._swept = False

    async def cli(self) -> tfcli.CliVersion:
        """The CLI, found and checked once."""
        if self._cli is None:
            try:
                self._cli = await tfcli.detect(self.options.terraform_binary)
            except tfcli.CliError as exc:
                raise BackendError(exc.message, reason=exc.reason) from exc
        return self._cli

    # --- the contract -----------------------------------------------------------------

    async def start(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]:
        return await self._build(spec, state, progress, "start")

    async def stop(
        self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress
    ) -> dict[str, Any]:
        return await self._build(spec, state, progress, "stop")

    async def delete(self, spec: WorkspaceSpec, state: dict[str, Any], progress: Progress) -> None:
        new_state = await self._build(spec, state, progress, "delete")
        left = new_state.get("terraform", {}).get("resources") or []
        if left:
            raise BackendError(
                "terraform destroy left resources behind: "
                + ", ".join(r["address"] for r in left[:10]),
                reason="destroy_incomplete",
                state=new_state,
            )
        await asyncio.to_thread(shutil.rmtree, self._workspace_dir(spec.workspace_id), True)

    async def status(self, workspace_id: str, state: dict[str, Any]) -> ComputeStatus:
        """What the last build left (Terraform cannot tell whether arbitrary
        resources run; the agent's connection is the live signal)."""
        info = state.get("terraform") or {}
        if info.get("transition") == "start" and info.get("resources"):
            return ComputeStatus("running")
        if info.get("resources"):
            return ComputeStatus("stopped", "stopped by its last build")
        return ComputeStatus("missing")

    def _sweep_builds(self) -> list[Orphan]:
        """Remove build directories a killed provisioner left, once they are
        older than any build may run (a younger one may be another worker's)."""
        removed: list[Orphan] = []
        if self.builds_dir.is_dir():
            for path in self.builds_dir.iterdir():
                if time.time() - path.stat().st_mtime > STALE_BUILD_SECONDS:
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(Orphan("build-directory", str(path), ""))
        return removed

    async def reconcile(self, live: set[str]) -> list[Orphan]:
        """Remove the directories of workspaces that are gone and working
        directories that outlived their build (a worker killed mid-build).
        Terraform resources are removed by delete builds, never here: only
        the state knows them, and a deleted workspace's state is empty."""
        return await asyncio.to_thread(self._sweep, live)

    def _sweep(self, live: set[str]) -> list[Orphan]:
        removed: list[Orphan] = []
        now = time.time()
        grace = self.reconcile_grace_seconds
        if self.workspaces_root.is_dir():
            for path in self.workspaces_root.iterdir():
                if path.name in live or not _WORKSPACE_ID.match(path.name):
                    continue
                if now - path.stat().st_mtime < grace:
                    continue
                shutil.rmtree(path, ignore_errors=True)
                removed.append(Orphan("directory", str(path), path.name))
        return removed + self._sweep_builds()

    # --- one build --------------------------------------------------------------------

    def _workspace_dir(self, workspace_id: str) -> Path:
        if not _WORKSPACE_ID.match(workspace_id):
            raise BackendError(
                f"{workspace_id!r} is not a workspace id", reason="invalid_workspace_id"
            )
        return self.workspaces_root / workspace_id

    async def _build(
        self,
        spec: WorkspaceSpec,
        state: dict[str, Any],
        progress: Progress,
        transition: Transition,
    ) -> dict[str, Any]:
        cli = await self.cli()
        if not self._swept:
            # What a provisioner killed mid-build left (a daemon has no
            # reconciler): removed at its first build after a restart.
            self._swept = True
            await asyncio.to_thread(self._sweep_builds)
        masked = _Masked(progress, spec.agent_token)
        await masked.log(f"running {cli.label}; providers from the mirror {self.mirror_dir}")
        workspace_dir = self._workspace_dir(spec.workspace_id)
        build_dir = self.builds_dir / f"{spec.build_id}-{secrets.token_hex(4)}"
        workdir = build_dir / "template"
        try:
            values: dict[str, Any] = {
                **spec.parameters,
                **stockade_variables(spec, transition, workspace_dir),
            }
            ignored = await asyncio.to_thread(
                self._prepare, spec, state, build_dir, workdir, workspace_dir, values
            )
            if ignored:
                await masked.log(
                    f"ignored the template's own {', '.join(ignored)}: a workspace's state is "
                    "Stockade's (remove them from the template)",
                    level="warn",
                )
            env = tfcli.base_environment(build_dir / "cli.tfrc")
            return await self._run(
                cli, state, masked, transition, workdir, env, build_dir / VARS_FILE, spec
            )
        except BackendError as exc:
            # Terraform prints a failed local-exec command with its sensitive
            # values: the token must not reach the stored build error.
            raise BackendError(
                masked.mask(exc.message),
                reason=exc.reason,
                log_message=masked.mask(exc.log_message),
                state=exc.state,
            ) from exc
        finally:
            # The plan file and the state hold secrets in clear: never leave them.
            await asyncio.to_thread(shutil.rmtree, build_dir, True)

    def _prepare(
        self,
        spec: WorkspaceSpec,
        state: dict[str, Any],
        build_dir: Path,
        workdir: Path,
        workspace_dir: Path,
        values: dict[str, Any],
    ) -> list[str]:
        """Lay out the build's directory; returns the leftovers of a template
        author's own runs that were removed from the copy."""
        self.builds_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        build_dir.mkdir(mode=0o700)
        shutil.copytree(spec.files_dir, workdir, symlinks=True)
        ignored = []
        for name in LEFTOVERS:
            leftover = workdir / name
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover)
            elif leftover.exists() or leftover.is_symlink():
                leftover.unlink()
            else:
                continue
            ignored.append(name)
        try:
            declared = declared_variables(read_directory_files(workdir))
        except ManifestError as exc:
            raise BackendError(
                f"the template's Terraform files cannot be read: {exc}", reason="invalid_config"
            ) from exc
        # A file, not TF_VAR_ variables: the CLI's environment reaches every
        # local-exec command, and a template that prints it would put the
        # agent token in the build log. Only declared variables: Terraform
        # warns about values for the others.
        passed = {name: value for name, value in values.items() if name in declared}
        vars_path = build_dir / VARS_FILE
        vars_path.touch(mode=0o600)
        vars_path.write_text(json.dumps(passed))
        (workdir / OVERRIDE_FILE).write_text(OVERRIDE)
        (build_dir / "cli.tfrc").write_text(tfcli.cli_config(self.mirror_dir))
        tfstate = (state.get(SEALED_STATE_KEY) or {}).get("tfstate")
        if tfstate:
            state_path = workdir / STATE_FILE
            state_path.write_text(tfstate)
            state_path.chmod(0o600)
        workspace_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        return ignored

    async def _run(
        self,
        cli: tfcli.CliVersion,
        state: dict[str, Any],
        progress: Progress,
        transition: Transition,
        workdir: Path,
        env: dict[str, str],
        vars_file: Path,
        spec: WorkspaceSpec,
    ) -> dict[str, Any]:
        async def log(line: str, level: Literal["info", "warn", "error"]) -> None:
            await progress.log(line, level=level)

        await progress.stage("Terraform init")
        init = await tfcli.run(
            cli, ["init", "-input=false", "-no-color"], cwd=workdir, env=env, log=log
        )
        if init.returncode != 0:
            raise await asyncio.to_thread(self._init_error, init)
        await progress.stage("Terraform plan")
        plan_args = [
            "plan",
            "-json",
            "-input=false",
            f"-var-file={vars_file}",
            f"-out={PLAN_FILE}",
        ]
        if transition == "delete":
            plan_args.append("-destroy")
        plan = await tfcli.run(cli, plan_args, cwd=workdir, env=env, log=log)
        if plan.returncode != 0:
            raise BackendError(
                f"terraform plan failed: {_diagnostics_text(plan)}", reason="plan_failed"
            )
        await progress.stage("Terraform apply")
        started = time.monotonic()
        try:
            apply = await tfcli.run(
                cli,
                ["apply", "-json", "-input=false", "-auto-approve", PLAN_FILE],
                cwd=workdir,
                env=env,
                log=log,
                # The plan's changes, shown once already.
                skip=frozenset({"planned_change"}),
            )
        except asyncio.CancelledError:
            # Interrupted: what it made so far is in its state, which must
            # reach the server, or the next build would not know it.
            partial, warning = await asyncio.to_thread(_new_state, workdir, cli, transition, state)
            if warning:
                await progress.log(warning, level="warn")
            raise BackendError(
                "terraform apply was interrupted (the build was canceled or ran out of time); "
                "what it had made is kept and the next build continues from there",
                reason="interrupted",
                state=partial,
            ) from None
        new_state, warning = await asyncio.to_thread(_new_state, workdir, cli, transition, state)
        if warning:
            await progress.log(warning, level="warn")
        if apply.returncode != 0:
            where = f" at {', '.join(apply.failed_resources)}" if apply.failed_resources else ""
            raise BackendError(
                f"terraform apply failed{where}: {_diagnostics_text(apply)}",
                reason="apply_failed",
                state=new_state,
            )
        problem = _check_outputs(spec, new_state["terraform"]["outputs"])
        if problem:
            raise BackendError(
                f"the template's outputs are not usable: {problem}",
                reason="invalid_outputs",
                state=new_state,
            )
        count = len(new_state["terraform"]["resources"])
        await progress.log(
            f"terraform {transition}: {count} resource(s) in the state after "
            f"{time.monotonic() - started:.1f} s"
        )
        return new_state

    def _init_error(self, result: tfcli.RunResult) -> BackendError:
        text = "\n".join(result.plain)
        constraints = {m.group(1): m.group(2) for m in _FINDING.finditer(text)}
        if "Failed to query available provider packages" in text or (
            "Failed to install provider" in text
        ):
            found = _PROVIDER_NOT_FOUND.search(text.split("Error:", 1)[-1])
            source = found.group(1) if found else next(iter(constraints), "a provider")
            short = source.removeprefix("registry.terraform.io/")
            constraint = constraints.get(short) or constraints.get(source)
            return BackendError(
                missing_provider_help(short, constraint, self.mirror_dir),
                reason="provider_missing",
            )
        errors = [line for line in result.plain if line.startswith("Error:")]
        detail = "; ".join(errors) or (result.plain[-1] if result.plain else "no output")
        return BackendError(f"terraform init failed: {detail}", reason="init_failed")


class _Masked:
    """A ``Progress`` that masks the agent token in every line, and masks
    messages on request (Terraform prints a failed local-exec command with
    its sensitive values)."""

    def __init__(self, progress: Progress, token: str | None) -> None:
        self.progress = progress
        self.token = token

    def mask(self, text: str) -> str:
        return text.replace(self.token, "[agent token]") if self.token else text

    async def stage(self, name: str) -> None:
        await self.progress.stage(name)

    async def log(self, line: str, *, level: Literal["info", "warn", "error"] = "info") -> None:
        await self.progress.log(self.mask(line), level=level)


def _check_outputs(spec: WorkspaceSpec, outputs: dict[str, Any]) -> str | None:
    """Why the ``stockade_*`` outputs cannot be used (None: they can)."""
    metadata = outputs.get("stockade_metadata")
    if metadata is not None and (
        not isinstance(metadata, dict)
        or not all(isinstance(v, str | int | float | bool) for v in metadata.values())
    ):
        return "stockade_metadata must be a map of strings"
    try:
        output_apps(spec.manifest, outputs.get("stockade_apps"))
    except ValueError as exc:
        return str(exc)
    return None


def _diagnostics_text(result: tfcli.RunResult) -> str:
    """The CLI's error diagnostics in one message (first three)."""
    parts = []
    for diag in result.diagnostics[:3]:
        where = f"{diag['address']}: " if diag.get("address") else ""
        detail = " ".join(str(diag.get("detail") or "").split())
        summary = str(diag.get("summary") or "error")
        parts.append(f"{where}{summary}" + (f" ({detail[:500]})" if detail else ""))
    if not parts:
        tail = [line for line in result.plain if line.strip()][-3:]
        parts = tail or [f"exit status {result.returncode}"]
    return "; ".join(parts)


def _read_state(text: str) -> dict[str, Any] | None:
    """A Terraform state, or None when ``text`` is not a whole one."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) and "lineage" in data else None


def _new_state(
    workdir: Path, cli: tfcli.CliVersion, transition: Transition, old: dict[str, Any]
) -> tuple[dict[str, Any], str | None]:
    """The backend state to store after a run (the CLI's state file, sealed;
    what it holds, for the workspace page), and a warning when that file was
    unreadable: a CLI killed while writing it leaves it cut short, and
    storing that would make every later build of the workspace fail. Then
    the CLI's backup of the previous state, or the previous state, is kept."""
    old_text = (old.get(SEALED_STATE_KEY) or {}).get("tfstate") or ""
    text, warning = old_text, None
    written = workdir / STATE_FILE
    if written.is_file():
        fresh = written.read_text(errors="replace")
        backup = workdir / f"{STATE_FILE}.backup"
        if _read_state(fresh) is not None:
            text = fresh
        elif backup.is_file() and _read_state(backup.read_text(errors="replace")) is not None:
            text = backup.read_text(errors="replace")
            warning = "Terraform's state file was cut short; its previous state is kept"
        else:
            warning = "Terraform's state file was cut short; the state before this build is kept"
    tfstate = (_read_state(text) or {}) if text else {}
    state = {
        "terraform": {
            "cli": cli.label,
            "transition": transition,
            "serial": tfstate.get("serial"),
            "resources": _resources(tfstate),
            "outputs": _outputs(tfstate),
        },
        SEALED_STATE_KEY: {"tfstate": text} if text else {},
    }
    return state, warning
