"""The AI bridge's records on both databases: text no database can hold as
sent (NUL, a lone surrogate) is stored readable, and the daily token
allowance is summed from the records (tests/server/test_aibridge.py covers
the bridge itself, on SQLite)."""

from __future__ import annotations

import time

import httpx

from stockade.devtools.llm_upstream import FakeLLM
from stockade.sdk import Client
from tests.conftest import OWNER_PASSWORD, ServerFactory
from tests.server.test_aibridge import MODELS, UPSTREAM_KEY, bridge_env


def test_odd_prompts_are_stored_and_the_allowance_is_summed(start_server: ServerFactory) -> None:
    with FakeLLM(key=UPSTREAM_KEY, models=MODELS) as fake:
        server = start_server(env=bridge_env(fake, STOCKADE_AIBRIDGE_TOKENS_PER_DAY="10"))
        with Client(server.url) as owner:
            owner.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
            owner.login("owner", OWNER_PASSWORD)
            url = f"{server.url}/api/v2/aibridge/openai/v1/chat/completions"
            headers = {"authorization": f"Bearer {owner.token}", "content-type": "application/json"}
            # JSON escapes: a NUL and a lone surrogate, which PostgreSQL and
            # UTF-8 refuse, in the prompt and the model name.
            body = (
                '{"model": "llama-3", "messages": [{"role": "user", '
                '"content": "one two three four five six seven \\u0000 \\ud800 end"}]}'
            )
            answer = httpx.post(url, content=body, headers=headers, timeout=30)
            assert answer.status_code == 200, answer.text
            odd_model = '{"model": "\\u0000x", "messages": []}'
            refused = httpx.post(url, content=odd_model, headers=headers, timeout=30)
            assert refused.status_code == 403, refused.text
            records = []
            for _ in range(200):  # records are written after the answer
                records = owner.list_aibridge().items
                if len(records) == 2:
                    break
                time.sleep(0.05)
            assert len(records) == 2, records
            by_outcome = {r.outcome: r for r in records}
            prompt = by_outcome["completed"].prompt or ""
            assert prompt.startswith("one two") and prompt.endswith("end")
            assert "\x00" not in prompt and "\ufffd" in prompt
            assert by_outcome["refused"].model == "\ufffdx"
            # The first call used more than 10 tokens: the allowance is spent.
            again = httpx.post(url, content=body, headers=headers, timeout=30)
            assert again.status_code == 429, again.text
            assert "of your 10 AI bridge tokens for today" in again.json()["error"]["message"]
            assert owner.verify_audit().ok
