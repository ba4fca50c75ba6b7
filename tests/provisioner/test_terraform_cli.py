"""Finding and checking the Terraform or OpenTofu CLI, the CLI configuration
each build runs with, and the environment the CLI gets. OpenTofu cannot be
installed on these machines: its path is covered by version detection
against a stand-in that answers ``version`` as OpenTofu does."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from stockade.provisioner.terraform import cli as tfcli
from tests.conftest import require


def real_terraform() -> str:
    path = shutil.which("terraform")
    require("the Terraform CLI", path is not None, "install Terraform 1.4+")
    assert path is not None
    return path


def stand_in(directory: Path, name: str, output: str) -> Path:
    """An executable that prints ``output`` for ``version``."""
    path = directory / name
    path.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@pytest.mark.parametrize(
    ("output", "flavor", "version"),
    [
        ("Terraform v1.11.4\non linux_amd64\n", "terraform", "1.11.4"),
        ("Terraform v1.4.0\non linux_amd64\n", "terraform", "1.4.0"),
        ("Terraform v1.12.0-beta2\non linux_amd64\n", "terraform", "1.12.0-beta2"),
        ("OpenTofu v1.8.3\non linux_amd64\n", "opentofu", "1.8.3"),
        ("OpenTofu v1.6.0\non linux_arm64\n", "opentofu", "1.6.0"),
    ],
)
def test_versions_are_read_for_both_clis(output: str, flavor: str, version: str) -> None:
    found = tfcli.parse_version(output, "/opt/bin/x")
    assert (found.flavor, found.version, found.path) == (flavor, version, "/opt/bin/x")
    name = "Terraform" if flavor == "terraform" else "OpenTofu"
    assert found.label == f"{name} v{version} (/opt/bin/x)"


@pytest.mark.parametrize(
    ("output", "reason", "words"),
    [
        ("Terraform v1.3.9\non linux_amd64\n", "terraform_too_old", "Terraform 1.4.0 or newer"),
        ("OpenTofu v1.5.7\n", "terraform_too_old", "OpenTofu 1.6.0 or newer"),
        ("Pulumi v3.100.0\n", "terraform_unknown_cli", "is not Terraform or OpenTofu"),
        ("", "terraform_unknown_cli", "printed 'nothing'"),
    ],
)
def test_old_or_foreign_clis_are_refused_with_a_reason(
    output: str, reason: str, words: str
) -> None:
    with pytest.raises(tfcli.CliError) as caught:
        tfcli.parse_version(output, "/opt/bin/x")
    assert caught.value.reason == reason
    assert words in caught.value.message


def test_the_installed_terraform_is_detected() -> None:
    path = real_terraform()
    found = asyncio.run(tfcli.detect("terraform"))
    printed = subprocess.run(
        [path, "version"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CHECKPOINT_DISABLE": "1"},
    ).stdout
    assert found.flavor == "terraform"
    assert f"Terraform v{found.version}" in printed
    assert found.path == path


def test_opentofu_is_detected_by_name_or_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tofu = stand_in(tmp_path, "tofu", "OpenTofu v1.8.3\non linux_amd64")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    by_name = asyncio.run(tfcli.detect("tofu"))
    by_path = asyncio.run(tfcli.detect(str(tofu)))
    assert by_name == by_path == tfcli.CliVersion("opentofu", "1.8.3", str(tofu))


def test_a_missing_or_too_old_cli_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(tfcli.CliError) as missing:
        asyncio.run(tfcli.detect(str(tmp_path / "nowhere" / "terraform")))
    assert missing.value.reason == "terraform_missing"
    assert "--terraform-binary" in missing.value.message
    old = stand_in(tmp_path, "terraform", "Terraform v0.13.7")
    with pytest.raises(tfcli.CliError) as too_old:
        asyncio.run(tfcli.detect(str(old)))
    assert too_old.value.reason == "terraform_too_old"


def test_the_cli_configuration_allows_only_the_mirror(tmp_path: Path) -> None:
    """A real `terraform init` with the generated configuration looks for a
    provider in the mirror and nowhere else (no registry, so nothing leaves
    the machine), and says where it looked."""
    path = real_terraform()
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    config = tmp_path / "cli.tfrc"
    config.write_text(tfcli.cli_config(mirror))
    work = tmp_path / "work"
    work.mkdir()
    (work / "main.tf").write_text(
        'terraform {\n  required_providers {\n    random = { source = "hashicorp/random" }\n'
        "  }\n}\n"
    )
    done = subprocess.run(
        [path, "init", "-input=false", "-no-color"],
        cwd=work,
        env=tfcli.base_environment(config),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    output = " ".join((done.stdout + done.stderr).split())
    assert "provider registry.terraform.io/hashicorp/random was not found" in output
    assert str(mirror) in output
    assert "registry.terraform.io/.well-known" not in output


def test_the_cli_environment_carries_nothing_of_the_servers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("STOCKADE_POSTGRES_URL", "postgresql://u:secret@db/stockade")
    monkeypatch.setenv("STOCKADE_OIDC_CLIENT_SECRET", "hush")
    monkeypatch.setenv("TF_VAR_leftover", "x")
    env = tfcli.base_environment(tmp_path / "cli.tfrc")
    assert not any(name.startswith(("STOCKADE_", "TF_VAR_")) for name in env)
    assert env["CHECKPOINT_DISABLE"] == "1"
    assert env["TF_CLI_CONFIG_FILE"] == str(tmp_path / "cli.tfrc")
    assert env["TF_IN_AUTOMATION"] == "1"


def test_a_canceled_run_interrupts_the_cli_and_its_commands(tmp_path: Path) -> None:
    """SIGINT reaches the CLI's process group; what it started is gone."""
    sleeper = tmp_path / "fake-cli"
    marker = tmp_path / "children"
    # Python, not sh: like Terraform (Go), it handles SIGINT even when it was
    # started with SIGINT ignored (as pytest-xdist's workers start processes),
    # which a shell cannot.
    sleeper.write_text(
        f"#!{sys.executable}\n"
        "import os, signal, subprocess, sys, time\n"
        "child = subprocess.Popen(['sleep', '300'], stdout=subprocess.DEVNULL,\n"
        "                         stderr=subprocess.DEVNULL, start_new_session=False)\n"
        f"open({str(marker)!r}, 'w').write(str(child.pid))\n"
        "def stop(*_):\n"
        # os.write: the signal may come while print('started') still flushes.
        "    os.write(1, b'interrupted\\n')\n"
        "    sys.exit(130)\n"
        "signal.signal(signal.SIGINT, stop)\n"
        "print('started', flush=True)\n"
        "while True:\n"
        "    time.sleep(0.1)\n"
    )
    sleeper.chmod(0o755)
    lines: list[str] = []
    started = asyncio.Event()

    async def log(line: str, _level: str) -> None:
        lines.append(line)
        if line == "started":
            started.set()

    async def scenario() -> None:
        cli = tfcli.CliVersion("terraform", "1.11.4", str(sleeper))
        task = asyncio.create_task(
            tfcli.run(cli, [], cwd=tmp_path, env={"PATH": os.environ["PATH"]}, log=log)
        )
        await asyncio.wait_for(started.wait(), 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert "interrupted" in lines, "\n".join(lines)
    # Killed with the group (a zombie until init reaps it: not running).
    stat_file = Path(f"/proc/{int(marker.read_text())}/stat")
    assert not stat_file.exists() or stat_file.read_text().split(") ")[1][0] in "ZX"
