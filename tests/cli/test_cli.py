"""The ``stockade`` command as a user runs it: a real process, no terminal."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from stockade.devtools.server import ServerProcess
from tests.conftest import OWNER_PASSWORD, PASSWORD, ServerFactory, run_sql

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(tmp_path: Path) -> Run:
    config_dir = tmp_path / "config"

    def run(
        *args: str, token: str | None = None, ok: bool = True
    ) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
        env.update(STOCKADE_CONFIG_DIR=str(config_dir), COLUMNS="200")
        if token:
            env["STOCKADE_TOKEN"] = token
        result = subprocess.run(
            [sys.executable, "-m", "stockade", *args],
            capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        if ok:
            assert result.returncode == 0, f"{args}: {result.stderr}{result.stdout}"
        return result

    run.config_dir = config_dir  # type: ignore[attr-defined]
    return run


def _login_owner(cli: Run, server: ServerProcess) -> None:
    cli("login", server.url, "--first-user", "--username", "admin",
        "--email", "admin@example.com", "--password", OWNER_PASSWORD)  # fmt: skip


def test_the_first_five_minutes(
    cli: Run, start_server: ServerFactory, request: pytest.FixtureRequest
) -> None:
    """The issue's acceptance path, command by command."""
    server = start_server()
    _login_owner(cli, server)
    session_file = cli.config_dir / "session.json"  # type: ignore[attr-defined]
    assert stat.S_IMODE(session_file.stat().st_mode) == 0o600

    me = json.loads(cli("whoami", "--output", "json").stdout)
    assert me["username"] == "admin" and me["roles"] == ["owner"]

    cli("users", "create", "alice", "--email", "alice@example.com", "--password", PASSWORD)
    token = json.loads(cli("tokens", "create", "ci", "--user", "alice", "-o", "json").stdout)
    assert token["token"] and token["name"] == "ci"

    denied = cli("audit", "list", token=token["token"], ok=False)
    assert denied.returncode == 1
    assert denied.stderr.strip().startswith("error: you do not have permission")
    assert "Traceback" not in denied.stderr and len(denied.stderr.strip().splitlines()) == 1

    entries = json.loads(cli("audit", "list", "-o", "json").stdout)
    actions = [e["action"] for e in entries]
    for action in ("user.create_first", "user.login", "user.create", "token.create"):
        assert action in actions, actions
    assert cli("audit", "verify").stdout.startswith("ok:")

    victim = next(e for e in entries if e["action"] == "user.create")
    run_sql(server, request, f"UPDATE audit_log SET ip = '10.9.9.9' WHERE seq = {victim['seq']}")
    broken = cli("audit", "verify", ok=False)
    assert broken.returncode == 1
    assert f"entry {victim['seq']} was modified" in broken.stderr
    assert victim["id"] in broken.stderr


def test_user_and_token_commands(cli: Run, start_server: ServerFactory, tmp_path: Path) -> None:
    server = start_server()
    _login_owner(cli, server)
    cli("users", "create", "bob", "--email", "bob@example.com", "--password", PASSWORD,
        "--role", "auditor")  # fmt: skip
    # Names are data, not Rich markup.
    cli("users", "create", "carol", "--email", "carol@example.com", "--password", PASSWORD,
        "--name", "[/bold] [red]x")  # fmt: skip
    assert "[/bold] [red]x" in cli("users", "show", "carol").stdout
    assert "carol" in cli("users", "list").stdout
    cli("users", "delete", "carol", "--yes")
    users = json.loads(cli("users", "list", "-o", "json").stdout)
    assert [u["username"] for u in users] == ["admin", "bob"]
    assert "bob" in cli("users", "list", "--search", "bo").stdout

    refused = cli("users", "suspend", "bob", ok=False)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert (
        json.loads(cli("users", "suspend", "bob", "--yes", "-o", "json").stdout)["status"]
        == "suspended"
    )
    cli("users", "activate", "bob")
    roles = json.loads(cli("users", "roles", "bob", "--set", "user-admin", "-o", "json").stdout)
    assert roles["roles"] == ["user-admin"]
    bad_role = cli("users", "roles", "bob", "--set", "wizard", ok=False)
    assert "unknown role(s) wizard" in bad_role.stderr

    cli("tokens", "create", "deploy", "--lifetime", "2h")
    listed = json.loads(cli("tokens", "list", "-o", "json").stdout)
    assert [t["name"] for t in listed] == ["deploy"] and "token" not in listed[0]
    bad_duration = cli("tokens", "create", "x", "--lifetime", "forever", ok=False)
    assert "cannot read duration" in bad_duration.stderr
    cli("tokens", "revoke", "deploy", "--yes")
    assert json.loads(cli("tokens", "list", "-o", "json").stdout) == []

    out = tmp_path / "audit.jsonl"
    cli("audit", "export", "--file", str(out))
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert lines[0]["action"] == "user.create_first" and lines[-1]["action"] == "token.revoke"
    assert "2 entries" not in cli("audit", "list", "--action", "user.suspend").stdout

    cli("users", "delete", "bob", "--yes")
    missing = cli("users", "show", "bob", ok=False)
    assert missing.returncode == 1 and "not found" in missing.stderr

    # The saved session belongs to its server: pointing elsewhere sends nothing.
    elsewhere = subprocess.run(
        [sys.executable, "-m", "stockade", "whoami"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60,
        env={**os.environ, "STOCKADE_CONFIG_DIR": str(cli.config_dir),  # type: ignore[attr-defined]
             "STOCKADE_URL": "http://127.0.0.1:9"},
    )  # fmt: skip
    assert elsewhere.returncode == 1 and "not logged in to http://127.0.0.1:9" in elsewhere.stderr

    cli("logout")
    after = cli("whoami", ok=False)
    assert after.returncode == 1 and "not logged in" in after.stderr


def test_errors_are_one_line_and_tracebacks_only_with_verbose(cli: Run, tmp_path: Path) -> None:
    from stockade.devtools.ports import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    result = cli("login", dead, "--username", "x", "--password", "y", ok=False)
    assert result.returncode == 1 and result.stderr.startswith("error: cannot reach")
    assert "Traceback" not in result.stderr
    verbose = cli("--verbose", "login", dead, "--username", "x", "--password", "y", ok=False)
    assert "Traceback" in verbose.stderr
    prompt = cli("login", dead, ok=False)
    assert prompt.returncode == 1


def test_login_without_a_terminal_never_waits(cli: Run, start_server: ServerFactory) -> None:
    server = start_server()
    _login_owner(cli, server)
    cli("logout")
    result = cli("login", server.url, ok=False)
    assert result.returncode == 1 and "--username is required" in result.stderr
    wrong = cli("login", server.url, "--username", "admin", "--password", "nope-nope-1", ok=False)
    assert "incorrect username or password" in wrong.stderr
