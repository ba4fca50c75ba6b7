"""``stockade aibridge``: the records of real calls through a real server's
bridge (to the loopback model server of the bridge's own tests), as an
owner and as a member; and the one-line set-up for a local coding agent."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import openai

from stockade.devtools.llm_upstream import FakeLLM
from stockade.sdk import Client
from tests.cli.test_cli import Run, _login_owner, cli  # noqa: F401  (fixture)
from tests.conftest import PASSWORD, ServerFactory
from tests.server.test_aibridge import MODELS, UPSTREAM_KEY, WEATHER_TOOL, bridge_env


def test_list_show_export_and_env(
    cli: Run,  # noqa: F811
    start_server: ServerFactory,
    tmp_path: Path,
) -> None:
    with FakeLLM(key=UPSTREAM_KEY, models=MODELS) as fake:
        server = start_server(env=bridge_env(fake))
        _login_owner(cli, server)
        cli("users", "create", "dev", "--email", "dev@example.com", "--password", PASSWORD)
        with Client(server.url) as dev:
            dev.login("dev", PASSWORD)
            token = dev.create_token("agent").token
        # The owner's line of the set-up, eval'ed as a shell would.
        lines = cli("aibridge", "env", "--with-token").stdout.splitlines()
        env = dict(shlex.split(line.removeprefix("export "))[0].split("=", 1) for line in lines)
        assert env["OPENAI_BASE_URL"] == f"{server.url}/api/v2/aibridge/openai/v1"
        assert env["ANTHROPIC_BASE_URL"] == f"{server.url}/api/v2/aibridge/anthropic"
        assert env["OPENAI_API_KEY"] == env["ANTHROPIC_API_KEY"] != ""
        assert "API_KEY" not in cli("aibridge", "env").stdout
        for key, text in ((env["OPENAI_API_KEY"], "the owner asks"), (token, "call a tool, dev")):
            with openai.OpenAI(
                base_url=env["OPENAI_BASE_URL"], api_key=key, max_retries=0
            ) as client:
                client.chat.completions.create(
                    model="llama-3",
                    messages=[{"role": "user", "content": text}],
                    tools=[WEATHER_TOOL],
                )

    table = cli("aibridge", "list").stdout
    assert "the owner asks" in table and "call a tool, dev" in table and "2 of 2" in table
    mine = json.loads(cli("aibridge", "list", "-o", "json", token=token).stdout)
    assert [r["username"] for r in mine] == ["dev"]
    shown = cli("aibridge", "show", mine[0]["id"][:8]).stdout
    assert "call a tool, dev" in shown and "tool call get_weather" in shown
    assert '"city": "Paris"' in shown and "openai chat.completions" in shown

    out = tmp_path / "bridge.jsonl"
    cli("aibridge", "export", "--user", "dev", "--file", str(out))
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["username"], r["tool_calls"][0]["name"]) for r in exported] == [
        ("dev", "get_weather")
    ]
    refused = cli("aibridge", "list", "--since", "yesterday", ok=False)
    assert refused.returncode != 0 and "since" in (refused.stderr + refused.stdout)
