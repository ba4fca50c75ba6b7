"""The Terraform or OpenTofu CLI, as the terraform backend runs it.

* ``detect(binary)`` finds the CLI and reads its version (``terraform
  version``), refusing versions older than :data:`TERRAFORM_MINIMUM` /
  :data:`OPENTOFU_MINIMUM` (``terraform_data``, which the starter templates
  use, came in Terraform 1.4; OpenTofu forked from 1.6).
* ``cli_config(mirror_dir)`` is the CLI configuration every build runs with:
  providers come only from the offline mirror (``filesystem_mirror`` and no
  ``direct`` block), and the update check ("checkpoint") is off.
* ``run(...)`` runs one command in a build's working directory with a clean
  environment (the server's own environment holds its secrets), turns the
  ``-json`` machine-readable UI into build log lines, and on cancellation
  interrupts the CLI (SIGINT, so that it writes its state) before killing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

TERRAFORM_MINIMUM = "1.4.0"
OPENTOFU_MINIMUM = "1.6.0"
# Given time to stop after SIGINT (it finishes the current resource and
# writes its state) before it is killed.
INTERRUPT_GRACE_SECONDS = 30.0
# How long the output is still read once the CLI has exited.
OUTPUT_DRAIN_SECONDS = 2.0
# Passed from the provisioner's environment to the CLI and so to the
# template's local-exec commands; nothing else is (the server's environment
# may hold its database URL or OIDC secret).
PASSED_ENVIRONMENT = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CERT_PATH",
    "DOCKER_TLS_VERIFY",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)

Flavor = Literal["terraform", "opentofu"]
_VERSION_LINE = re.compile(r"^(Terraform|OpenTofu) v(\d+\.\d+\.\d+)(\S*)", re.MULTILINE)


class CliError(Exception):
    """The CLI is missing, unusable or too old; ``reason`` is a metrics label."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason


@dataclass(frozen=True)
class CliVersion:
    """Which CLI runs the builds: its flavor, version and resolved path."""

    flavor: Flavor
    version: str
    path: str

    @property
    def label(self) -> str:
        name = "Terraform" if self.flavor == "terraform" else "OpenTofu"
        return f"{name} v{self.version} ({self.path})"


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def parse_version(output: str, path: str) -> CliVersion:
    """The CLI's flavor and version from what ``version`` printed; a
    ``CliError`` when it is neither Terraform nor OpenTofu, or too old."""
    match = _VERSION_LINE.search(output)
    if match is None:
        first = output.strip().splitlines()[0] if output.strip() else "nothing"
        raise CliError(
            f"{path} is not Terraform or OpenTofu: `version` printed {first[:200]!r}",
            reason="terraform_unknown_cli",
        )
    flavor: Flavor = "terraform" if match.group(1) == "Terraform" else "opentofu"
    version = match.group(2) + match.group(3)
    minimum = TERRAFORM_MINIMUM if flavor == "terraform" else OPENTOFU_MINIMUM
    if _version_tuple(match.group(2)) < _version_tuple(minimum):
        raise CliError(
            f"{match.group(1)} v{version} at {path} is too old: terraform templates need "
            f"{match.group(1)} {minimum} or newer",
            reason="terraform_too_old",
        )
    return CliVersion(flavor, version, path)


def base_environment(config_file: Path) -> dict[str, str]:
    """The environment of every CLI run: the passed-through variables, the
    build's CLI configuration, no prompts, no update check."""
    env = {name: os.environ[name] for name in PASSED_ENVIRONMENT if name in os.environ}
    env.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    env.update(
        {
            "TF_CLI_CONFIG_FILE": str(config_file),
            "TF_IN_AUTOMATION": "1",
            "TF_INPUT": "0",
            # The update and security-bulletin check calls out to the internet.
            "CHECKPOINT_DISABLE": "1",
        }
    )
    return env


async def detect(binary: str) -> CliVersion:
    """Find ``binary`` (a command on $PATH or a path) and check its version."""
    path = shutil.which(binary)
    if path is None:
        raise CliError(
            f"the Terraform CLI {binary!r} is not installed on this provisioner (set the "
            "server's --terraform-binary, or provisionerd's, to terraform, tofu or a path)",
            reason="terraform_missing",
        )
    env = {name: os.environ[name] for name in ("PATH", "HOME") if name in os.environ}
    env["CHECKPOINT_DISABLE"] = "1"
    env["TF_CLI_CONFIG_FILE"] = os.devnull
    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            "version",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        async with asyncio.timeout(30):
            out, _ = await proc.communicate()
    except (OSError, TimeoutError) as exc:
        raise CliError(
            f"{path} did not answer `version` ({exc or type(exc).__name__})",
            reason="terraform_unusable",
        ) from exc
    return parse_version(out.decode(errors="replace"), path)


def _hcl_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid HCL string literal


def cli_config(mirror_dir: Path) -> str:
    """The CLI configuration of a build: providers only from ``mirror_dir``
    (no ``direct`` block, so a missing provider fails instead of being
    downloaded) and no checkpoint (update check) calls."""
    return (
        "# Written by Stockade for one build; see docs/terraform.md.\n"
        "disable_checkpoint = true\n"
        "provider_installation {\n"
        "  filesystem_mirror {\n"
        f"    path = {_hcl_string(str(mirror_dir))}\n"
        '    include = ["*/*/*"]\n'
        "  }\n"
        "}\n"
    )


@dataclass
class RunResult:
    """What one CLI command did: its exit code, the error diagnostics it
    reported (summary, detail, resource address), the resources whose apply
    failed, and its plain (non-JSON) output lines."""

    returncode: int
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    failed_resources: list[str] = field(default_factory=list)
    plain: list[str] = field(default_factory=list)


LogLine = Callable[[str, Literal["info", "warn", "error"]], Awaitable[None]]


async def _report(message: dict[str, Any], result: RunResult, log: LogLine) -> None:
    """One line of the machine-readable UI into the build log."""
    kind = message.get("type")
    text = str(message.get("@message", ""))
    hook = message.get("hook") or {}
    if kind in ("version", "outputs"):
        return
    if kind == "diagnostic":
        diag = message.get("diagnostic") or {}
        severity = diag.get("severity", "error")
        if severity == "error":
            result.diagnostics.append(diag)
        where = f" ({diag['address']})" if diag.get("address") else ""
        detail = str(diag.get("detail") or "").strip()
        line = f"{'Error' if severity == 'error' else 'Warning'}{where}: {diag.get('summary', '')}"
        await log(line, "error" if severity == "error" else "warn")
        for extra in detail.splitlines():
            if extra.strip():
                await log(f"  {extra}", "error" if severity == "error" else "warn")
        return
    if kind == "apply_errored":
        address = (hook.get("resource") or {}).get("addr")
        if address:
            result.failed_resources.append(str(address))
        await log(text, "error")
        return
    if kind == "provision_progress":
        # A local-exec's own output: "<addr>: (local-exec): <line>".
        await log(text, "info")
        return
    if text:
        level = message.get("@level")
        await log(text, "error" if level == "error" else "warn" if level == "warn" else "info")


async def run(
    cli: CliVersion,
    args: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log: LogLine,
    skip: frozenset[str] = frozenset(),
) -> RunResult:
    """Run ``cli`` with ``args`` in ``cwd``; every output line is logged (JSON
    UI messages as their text, but those whose type is in ``skip``).
    Cancellation interrupts the CLI and waits up to
    :data:`INTERRUPT_GRACE_SECONDS` for it to write its state, then kills its
    process group, and re-raises."""
    # Popen, not the event loop's subprocesses: uvloop leaves some of its own
    # descriptors open in the child (close_fds is not honoured), among them
    # pipes; the workspace processes a local-exec leaves running would hold
    # them, and the CLI's output would never end. Popen closes every other
    # descriptor, and the pipe is made close-on-exec here.
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        proc = await asyncio.to_thread(
            subprocess.Popen,
            [cli.path, *args],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            close_fds=True,
            # Its own process group: an interrupt or kill reaches the providers
            # and local-exec commands it started too.
            start_new_session=True,
        )
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        os.close(write_fd)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1024 * 1024, loop=loop)
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(read_fd, "rb", 0)
    )
    try:
        return await _consume(proc, reader, log, skip)
    finally:
        transport.close()


async def _consume(
    proc: subprocess.Popen[bytes],
    reader: asyncio.StreamReader,
    log: LogLine,
    skip: frozenset[str],
) -> RunResult:
    result = RunResult(returncode=-1)
    try:
        result.returncode = await _follow(proc, reader, log, skip, result)
    except asyncio.CancelledError:
        await _interrupt(proc, reader, log, skip, result)
        raise
    return result


async def _exited(proc: subprocess.Popen[bytes]) -> int:
    """The exit code, once the process has ended: waited for on the event
    loop through a pidfd, not in a thread (a CLI runs for minutes, and the
    default thread pool is small and shared)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # not Linux 5.3+: a thread it is
        return await asyncio.to_thread(proc.wait)
    loop = asyncio.get_running_loop()
    ended: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        if not ended.done():
            ended.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ended
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return proc.wait()


async def _follow(
    proc: subprocess.Popen[bytes],
    reader: asyncio.StreamReader,
    log: LogLine,
    skip: frozenset[str],
    result: RunResult,
) -> int:
    """Log the output until the CLI exits, then what is left of it (for at
    most a moment: a process the CLI left behind may hold the pipe open)."""
    reading = asyncio.ensure_future(_read_all(reader, log, skip, result))
    try:
        code = await _exited(proc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(reading), OUTPUT_DRAIN_SECONDS)
        return code
    finally:
        reading.cancel()


async def _read_all(
    reader: asyncio.StreamReader, log: LogLine, skip: frozenset[str], result: RunResult
) -> None:
    """Log every line until the output ends."""
    while True:
        try:
            raw = await reader.readline()
        except ValueError:  # a line over the limit: skip its rest
            continue
        if not raw:
            return
        line = raw.decode(errors="replace").rstrip("\r\n")
        message: Any = None
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                message = json.loads(line)
        if isinstance(message, dict) and "@message" in message:
            if message.get("type") not in skip:
                await _report(message, result, log)
        elif line.strip():
            result.plain.append(line)
            await log(line, "info")


async def _interrupt(
    proc: subprocess.Popen[bytes],
    reader: asyncio.StreamReader,
    log: LogLine,
    skip: frozenset[str],
    result: RunResult,
) -> None:
    """SIGINT to the CLI's group (it stops after the current step and saves
    its state; what it says meanwhile is logged), then SIGKILL to the group
    if it has not ended in time."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(INTERRUPT_GRACE_SECONDS):
                await _follow(proc, reader, log, skip, result)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    result.returncode = await _exited(proc)
