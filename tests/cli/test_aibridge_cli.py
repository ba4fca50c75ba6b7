"""``stockade aibridge`` against a real server: records (written into its
database, as the bridge writes them at the end of a call; the calls
themselves are tests/server/test_aibridge.py's) listed, shown and exported
as an owner and as a member; the one-line set-up for a local coding agent."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from stockade.sdk import Client
from tests.cli.test_cli import Run, _login_owner, cli  # noqa: F401  (fixture)
from tests.conftest import PASSWORD, ServerFactory, run_sql

WEATHER = '[{"name":"get_weather","arguments":"{\\"city\\":\\"Paris\\"}"}]'
# The record every filter at once picks (dev, openai, qwen-coder, workspace
# dev-ws, 5 Nov); each other "miss" row differs from it in one field only, so
# a filter the CLI failed to pass on would let that row through.
TARGET = ("dev", "openai", "qwen-coder", "dev-ws", "2026-11-05 12:00:00", "the target")
ROWS = [
    ("admin", "openai", "llama-3", None, "2026-11-20 09:00:00", "the owner asks", "[]"),
    ("dev", "anthropic", "claude-x", "dev-ws", "2026-11-21 09:00:00", "call a tool, dev", WEATHER),
    (*TARGET, "[]"),
    ("admin", *TARGET[1:5], "miss: user", "[]"),
    (*TARGET[:1], "anthropic", *TARGET[2:5], "miss: provider", "[]"),
    (*TARGET[:2], "llama-3", *TARGET[3:5], "miss: model", "[]"),
    (*TARGET[:3], None, TARGET[4], "miss: workspace", "[]"),
    (*TARGET[:4], "2026-10-20 12:00:00", "miss: since", "[]"),
    (*TARGET[:4], "2026-11-15 12:00:00", "miss: until", "[]"),
]
FILTERS = ["--user", "dev", "--provider", "openai", "--model", "qwen-coder",
           "--workspace", "dev-ws", "--since", "2026-11-01T00:00:00Z",
           "--until", "2026-11-10T00:00:00+00:00"]  # fmt: skip


def _sql(value: str | None) -> str:
    return "NULL" if value is None else "'" + value.replace("'", "''") + "'"


def test_list_show_export_and_env(
    cli: Run,  # noqa: F811
    start_server: ServerFactory,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    server = start_server()
    _login_owner(cli, server)
    owner_token = json.loads((cli.config_dir / "session.json").read_text())["token"]  # type: ignore[attr-defined]
    with Client(server.url, owner_token) as owner:
        owner.create_user("dev", "dev@example.com", PASSWORD)
    with Client(server.url) as dev:
        dev.login("dev", PASSWORD)
        dev_token = dev.token
    assert dev_token
    for n, (user, provider, model, workspace, at, prompt, tools) in enumerate(ROWS):
        endpoint = "messages" if provider == "anthropic" else "chat.completions"
        run_sql(server, request, f"""
            INSERT INTO aibridge_interceptions (id, created_at, user_id, username,
              workspace_id, workspace_name, provider, endpoint, model, streamed, prompt,
              tool_calls, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
              status, outcome, error, latency_ms, first_byte_ms, request_id)
            SELECT '{n:08d}-0000-4000-8000-000000000000', '{at}.000000', id, username,
              NULL, {_sql(workspace)}, '{provider}', '{endpoint}', '{model}', 0,
              {_sql(prompt)}, '{tools}', 1200, 34, 1000, 0, 200, 'completed', NULL, 850, 400,
              NULL
            FROM users WHERE username = '{user}'""")  # fmt: skip

    # The owner sees everyone's; a member only their own.
    table = cli("aibridge", "list").stdout
    assert "the owner asks" in table and "call a tool, dev" in table
    assert "1200/34" in table and f"{len(ROWS)} of {len(ROWS)} requests" in table
    mine = json.loads(cli("aibridge", "list", "-o", "json", token=dev_token).stdout)
    assert {r["username"] for r in mine} == {"dev"}
    assert len(mine) == sum(row[0] == "dev" for row in ROWS)

    # Every filter reaches the server (list and export alike).
    picked = json.loads(cli("aibridge", "list", *FILTERS, "-o", "json").stdout)
    assert [r["prompt"] for r in picked] == ["the target"]
    out = tmp_path / "bridge.jsonl"
    cli("aibridge", "export", *FILTERS, "--file", str(out))
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["username"], r["prompt"]) for r in exported] == [("dev", "the target")]

    # The member's own record by the short id the table shows.
    tool_record = next(r for r in mine if r["tool_calls"])
    shown = cli("aibridge", "show", tool_record["id"][:8], token=dev_token).stdout
    assert "call a tool, dev" in shown and "tool call get_weather" in shown
    assert '{"city":"Paris"}' in shown and "anthropic messages, model claude-x" in shown
    assert "1200 in, 34 out, 1000 cache read" in shown and "850 ms" in shown

    # The set-up line, read as a shell reads it.
    env = dict(
        shlex.split(line.removeprefix("export "))[0].split("=", 1)
        for line in cli("aibridge", "env", "--with-token").stdout.splitlines()
    )
    assert env == {
        "OPENAI_BASE_URL": f"{server.url}/api/v2/aibridge/openai/v1",
        "ANTHROPIC_BASE_URL": f"{server.url}/api/v2/aibridge/anthropic",
        "OPENAI_API_KEY": owner_token,
        "ANTHROPIC_API_KEY": owner_token,
    }
    assert "API_KEY" not in cli("aibridge", "env").stdout

    refused = cli("aibridge", "list", "--since", "yesterday", ok=False)
    assert refused.returncode != 0 and "--since" in refused.stderr
