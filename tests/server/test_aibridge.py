"""The AI bridge through a real server, with the official ``openai`` and
``anthropic`` SDKs as its clients and a model server on loopback that speaks
each provider's wire format (``stockade.devtools.llm_upstream``: nothing real can
serve a model here). Streaming and not, tool calls, usage, errors in each
provider's format, a client that leaves, the records and who sees them, the
limits, and a workspace's session reaching the model with no configuration."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from stockade.devtools.llm_upstream import FakeLLM
from stockade.devtools.server import ServerProcess
from stockade.sdk import Client, types
from tests.agents import agent_workspace
from tests.conftest import (
    OWNER_PASSWORD,
    PASSWORD,
    RELAXED_LIMITS,
    ServerFactory,
    run_sql,
    unique,
)

SQLITE_ONLY = "the bridge's records are plain inserts and one SUM, covered by the CLI tests too"

UPSTREAM_KEY = "upstream-secret-key"
MODELS = ["llama-3", "qwen-coder", "secret-model", "claude-x"]
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
            "required": ["city"],
        },
    },
}
STOCKADE = str(Path(sys.executable).with_name("stockade"))


@dataclass
class Bridge:
    server: ServerProcess
    fake: FakeLLM
    owner: Client
    member: Client
    member_name: str
    member_token: str
    auditor: Client
    seen: set[str] = field(default_factory=set)  # records last_record returned

    def openai(self, token: str | None = None) -> openai.OpenAI:
        client: openai.OpenAI = sdk_client(self.server.url, "openai", token or self.member_token)
        return client

    def anthropic(self, token: str | None = None) -> anthropic.Anthropic:
        client: anthropic.Anthropic = sdk_client(
            self.server.url, "anthropic", token or self.member_token
        )
        return client

    def last_record(
        self, client: Client | None = None, *, prompt: str | None = None, **filters: Any
    ) -> types.AibridgeInterception:
        """The newest record not returned before (with ``prompt``, if given),
        once written: records are written after the caller has its answer,
        so the test's next request may come first."""
        client = client or self.member
        deadline = time.monotonic() + 10
        while True:
            for item in client.list_aibridge(limit=20, **filters).items:
                if item.id not in self.seen and prompt in (None, item.prompt):
                    self.seen.add(item.id)
                    return item
            assert time.monotonic() < deadline, f"no new AI bridge record ({prompt}, {filters})"
            time.sleep(0.05)


_sdk_clients: dict[tuple[str, str, str], Any] = {}


def sdk_client(url: str, provider: str, token: str) -> Any:
    """The official SDK's client for the bridge at ``url``, one per token
    (each holds a connection pool; the module closes them at its end)."""
    key = (url, provider, token)
    if key not in _sdk_clients:
        if provider == "openai":
            _sdk_clients[key] = openai.OpenAI(
                base_url=f"{url}/api/v2/aibridge/openai/v1", api_key=token, max_retries=0
            )
        else:
            _sdk_clients[key] = anthropic.Anthropic(
                base_url=f"{url}/api/v2/aibridge/anthropic", api_key=token, max_retries=0
            )
    return _sdk_clients[key]


@pytest.fixture(scope="module", autouse=True)
def _close_sdk_clients() -> Iterator[None]:
    yield
    for client in _sdk_clients.values():
        client.close()
    _sdk_clients.clear()


def start_fake() -> FakeLLM:
    return FakeLLM(key=UPSTREAM_KEY, models=MODELS)


def bridge_env(fake: FakeLLM, **extra: str) -> dict[str, str]:
    return {
        **RELAXED_LIMITS,
        "STOCKADE_AIBRIDGE_OPENAI_BASE_URL": f"{fake.url}/v1",
        "STOCKADE_AIBRIDGE_OPENAI_KEY": UPSTREAM_KEY,
        "STOCKADE_AIBRIDGE_OPENAI_MODELS": "llama-*,qwen-coder",
        "STOCKADE_AIBRIDGE_ANTHROPIC_BASE_URL": fake.url,
        "STOCKADE_AIBRIDGE_ANTHROPIC_KEY": UPSTREAM_KEY,
        **extra,
    }


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeLLM]:
    with start_fake() as upstream:
        yield upstream


@pytest.fixture(scope="module")
def bridge(
    backend: str, fake: FakeLLM, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bridge]:
    assert backend == "sqlite"
    server = ServerProcess(
        data_dir=tmp_path_factory.mktemp("aibridge"),
        # The workspace test plays the provisioner itself.
        env=bridge_env(fake, STOCKADE_PROVISIONER_WORKERS="0"),
    ).start()
    owner = Client(server.url)
    owner.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    owner.login("owner", OWNER_PASSWORD)
    clients = [owner]

    def user(*roles: types.RoleName) -> tuple[Client, str]:
        name = unique("user")
        owner.create_user(name, f"{name}@example.com", PASSWORD, roles=list(roles))
        client = Client(server.url)
        client.login(name, PASSWORD)
        clients.append(client)
        return client, name

    member, member_name = user()
    auditor, _ = user("auditor")
    token = member.create_token("coding-agent").token
    try:
        yield Bridge(server, fake, owner, member, member_name, token, auditor)
    finally:
        for client in clients:
            client.close()
        server.stop()


# --- OpenAI ------------------------------------------------------------------------


def test_openai_chat_completions_streamed_and_not_with_tool_calls(bridge: Bridge) -> None:
    client = bridge.openai()
    answer = client.chat.completions.create(
        model="llama-3",
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "please call a tool for the weather in Paris"},
        ],
        tools=[WEATHER_TOOL],
    )
    calls: Any = answer.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris", "unit": "celsius"}
    # The model server saw the bridge's key, never the caller's token.
    seen = bridge.fake.requests()[-1]
    assert seen["headers"]["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert bridge.member_token not in json.dumps(seen)

    record = bridge.last_record(prompt="please call a tool for the weather in Paris")
    assert (record.provider, record.endpoint, record.model) == (
        "openai",
        "chat.completions",
        "llama-3",
    )
    assert record.username == bridge.member_name and record.workspace_name is None
    assert record.prompt == "please call a tool for the weather in Paris"
    assert [(c.name, json.loads(c.arguments)) for c in record.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]
    assert answer.usage is not None
    assert (record.input_tokens, record.output_tokens, record.cache_read_tokens) == (
        answer.usage.prompt_tokens,
        answer.usage.completion_tokens,
        2,
    )
    assert (record.streamed, record.outcome, record.status) == (False, "completed", 200)

    # Streamed, without asking for usage: the bridge asks for it, so the
    # call is counted, and the client gets the extra usage chunk.
    chunks = list(
        client.chat.completions.create(
            model="llama-3",
            messages=[{"role": "user", "content": "hello there bridge"}],
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: hello there bridge"
    assert len([c for c in chunks if c.choices]) > 2  # it came in pieces
    assert bridge.fake.requests()[-1]["body"]["stream_options"] == {"include_usage": True}
    usage = chunks[-1].usage
    assert usage is not None
    record = bridge.last_record(prompt="hello there bridge")
    assert record.streamed and record.outcome == "completed"
    assert record.prompt == "hello there bridge" and record.tool_calls == []
    assert (record.input_tokens, record.output_tokens) == (
        usage.prompt_tokens,
        usage.completion_tokens,
    )
    assert record.first_byte_ms is not None and record.first_byte_ms <= record.latency_ms

    # Streamed tool calls: the arguments arrive in pieces, the record has them whole.
    stream = client.chat.completions.create(
        model="qwen-coder",
        messages=[{"role": "user", "content": "call a tool please"}],
        tools=[WEATHER_TOOL],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = [
        call.function.arguments or ""
        for chunk in stream
        for choice in chunk.choices
        for call in choice.delta.tool_calls or []
        if call.function is not None
    ]
    assert len([p for p in pieces if p]) > 1 and json.loads("".join(pieces))["city"] == "Paris"
    record = bridge.last_record(prompt="call a tool please")
    assert record.model == "qwen-coder" and record.streamed
    assert [c.name for c in record.tool_calls] == ["get_weather"]
    assert json.loads(record.tool_calls[0].arguments) == {"city": "Paris", "unit": "celsius"}


def test_openai_responses_streamed_and_not(bridge: Bridge) -> None:
    client = bridge.openai()
    tool: Any = {
        "type": "function",
        "name": "get_weather",
        "parameters": WEATHER_TOOL["function"]["parameters"],
    }
    answer = client.responses.create(model="llama-3", input="call a tool for Paris", tools=[tool])
    calls = [item for item in answer.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    record = bridge.last_record(prompt="call a tool for Paris")
    assert (record.endpoint, record.prompt) == ("responses", "call a tool for Paris")
    assert [c.name for c in record.tool_calls] == ["get_weather"]
    assert answer.usage is not None
    assert (record.input_tokens, record.output_tokens) == (
        answer.usage.input_tokens,
        answer.usage.output_tokens,
    )

    with client.responses.stream(
        model="llama-3",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "stream me words"}]}],
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == "echo: stream me words" and len(deltas) > 2
    record = bridge.last_record(prompt="stream me words")
    assert record.streamed and record.prompt == "stream me words"
    assert final.usage is not None
    assert record.output_tokens == final.usage.output_tokens > 0


def test_openai_models_are_the_ones_the_bridge_offers(bridge: Bridge) -> None:
    listed = sorted(m.id for m in bridge.openai().models.list())
    assert listed == ["llama-3", "qwen-coder"]  # not secret-model, not claude-x
    assert sorted(m.id for m in bridge.anthropic().models.list()) == sorted(MODELS)


# --- Anthropic ------------------------------------------------------------------------


def test_anthropic_messages_streamed_and_not_with_tool_use(bridge: Bridge) -> None:
    client = bridge.anthropic()  # sends the Stockade token as x-api-key
    tool: Any = {
        "name": "get_weather",
        "description": "The weather in a city",
        "input_schema": WEATHER_TOOL["function"]["parameters"],
    }
    message = client.messages.create(
        model="claude-x",
        max_tokens=100,
        system="You are terse.",
        messages=[{"role": "user", "content": "call a tool: the weather in Paris"}],
        tools=[tool],
    )
    uses = [b for b in message.content if b.type == "tool_use"]
    assert (
        uses
        and uses[0].name == "get_weather"
        and uses[0].input
        == {
            "city": "Paris",
            "unit": "celsius",
        }
    )
    seen = bridge.fake.requests()[-1]
    assert seen["headers"]["x-api-key"] == UPSTREAM_KEY
    assert seen["headers"]["anthropic-version"]  # the client's own header passed on
    record = bridge.last_record(prompt="call a tool: the weather in Paris")
    assert (record.provider, record.endpoint) == ("anthropic", "messages")
    assert record.prompt == "call a tool: the weather in Paris"
    assert [(c.name, json.loads(c.arguments)) for c in record.tool_calls] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"})
    ]
    usage = message.usage
    assert (
        record.input_tokens,
        record.output_tokens,
        record.cache_read_tokens,
        record.cache_write_tokens,
    ) == (
        usage.input_tokens,
        usage.output_tokens,
        usage.cache_read_input_tokens,
        usage.cache_creation_input_tokens,
    )
    assert record.cache_read_tokens == 3 and record.cache_write_tokens == 2

    with client.messages.stream(
        model="claude-x",
        max_tokens=100,
        messages=[
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "stream the reply please"}]},
        ],
        tools=[tool],
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "echo: stream the reply please"
    record = bridge.last_record(prompt="stream the reply please")
    assert record.streamed and record.prompt == "stream the reply please"
    assert (record.input_tokens, record.output_tokens, record.cache_read_tokens) == (
        final.usage.input_tokens,
        final.usage.output_tokens,
        3,
    )

    # A streamed tool call: input_json_delta pieces, recorded whole.
    with client.messages.stream(
        model="claude-x",
        max_tokens=100,
        messages=[{"role": "user", "content": "call a tool now"}],
        tools=[tool],
    ) as stream:
        final = stream.get_final_message()
    assert [b.name for b in final.content if b.type == "tool_use"] == ["get_weather"]
    record = bridge.last_record(prompt="call a tool now")
    assert json.loads(record.tool_calls[0].arguments) == {"city": "Paris", "unit": "celsius"}


# --- errors ---------------------------------------------------------------------------


def test_errors_come_back_in_each_providers_format(bridge: Bridge) -> None:
    client = bridge.openai()
    with pytest.raises(openai.InternalServerError) as server_error:
        client.chat.completions.create(
            model="llama-3", messages=[{"role": "user", "content": "fail:500"}]
        )
    assert "upstream failed on purpose (500)" in str(server_error.value)
    record = bridge.last_record(prompt="fail:500")
    assert (record.status, record.outcome) == (500, "upstream_error")
    assert "upstream failed on purpose" in (record.error or "")

    with pytest.raises(openai.InternalServerError):  # before any chunk: a plain error
        client.chat.completions.create(
            model="llama-3", messages=[{"role": "user", "content": "fail:500"}], stream=True
        )

    with pytest.raises(anthropic.RateLimitError) as limited:
        bridge.anthropic().messages.create(
            model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "fail:429"}]
        )
    assert limited.value.response.headers["retry-after"] == "7"
    assert "upstream failed on purpose (429)" in str(limited.value)

    # Refusals of the bridge itself, in the same formats and with our words.
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client.chat.completions.create(
            model="secret-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert "not offered through this bridge" in str(refused.value)
    assert refused.value.code == "aibridge_model_not_allowed"
    record = bridge.last_record(prompt="hi")
    assert (record.model, record.outcome, record.status) == ("secret-model", "refused", 403)

    with pytest.raises(openai.AuthenticationError):
        bridge.openai(token="not-a-token").models.list()
    with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
        bridge.anthropic(token="abcdefghij-" + "x" * 32).messages.create(
            model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    body: Any = unauthenticated.value.body
    assert body["error"]["type"] == "authentication_error"

    url = f"{bridge.server.url}/api/v2/aibridge/openai/v1/chat/completions"
    headers = {"authorization": f"Bearer {bridge.member_token}"}
    for body, words in (
        (b"{not json", "JSON object"),
        (b"[1, 2]", "JSON object"),
        (json.dumps({"messages": []}).encode(), "needs a model"),
        (json.dumps({"model": "llama-3", "stream": "yes"}).encode(), "stream must be"),
    ):
        answer = httpx.post(url, content=body, headers=headers, timeout=10)
        assert answer.status_code == 400, answer.text
        assert words in answer.json()["error"]["message"]


def test_a_client_that_leaves_cancels_the_upstream_request(bridge: Bridge) -> None:
    url = f"{bridge.server.url}/api/v2/aibridge/openai/v1/chat/completions"
    headers = {"authorization": f"Bearer {bridge.member_token}"}
    body = {"model": "llama-3", "messages": [{"role": "user", "content": "slow:30"}]}

    def upstream_outcome() -> str:
        deadline = time.monotonic() + 5
        while (outcome := bridge.fake.requests()[-1]["outcome"]) not in ("cancelled", "completed"):
            assert time.monotonic() < deadline, "the model server never saw the client leave"
            time.sleep(0.05)
        return str(outcome)

    with (
        httpx.Client(timeout=10) as http,
        http.stream("POST", url, json={**body, "stream": True}, headers=headers) as response,
    ):
        assert response.status_code == 200
        first = next(response.iter_raw())
        assert first.startswith(b"data: ")
    # The 30 chunks would take 6 s: the upstream request ends long before.
    assert upstream_outcome() == "cancelled"
    record = bridge.last_record(prompt="slow:30")
    assert (record.outcome, record.streamed) == ("cancelled", True)

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url, json=body, headers=headers, timeout=0.5)
    assert upstream_outcome() == "cancelled"
    assert bridge.last_record(prompt="slow:30").outcome == "cancelled"


# --- records --------------------------------------------------------------------------


def test_who_sees_which_records(bridge: Bridge) -> None:
    bridge.openai().chat.completions.create(
        model="llama-3", messages=[{"role": "user", "content": "the member's own question"}]
    )
    mine = bridge.last_record(prompt="the member's own question")
    other = Client(bridge.server.url)
    other_name = unique("user")
    bridge.owner.create_user(other_name, f"{other_name}@example.com", PASSWORD)
    other.login(other_name, PASSWORD)
    try:
        # Another member sees none of it, and a record of the member's is "not found".
        assert all(r.username == other_name for r in other.list_aibridge().items)
        assert other.list_aibridge(user=bridge.member_name).count == 0
        with pytest.raises(Exception) as missing:
            other.get_aibridge(mine.id)
        assert getattr(missing.value, "status", None) == 404
    finally:
        other.close()
    # Auditors and owners see everyone's, filter and export them.
    for reader in (bridge.auditor, bridge.owner):
        listed = reader.list_aibridge(user=bridge.member_name, provider="openai")
        assert mine.id in {r.id for r in listed.items}
        assert reader.get_aibridge(mine.id).prompt == "the member's own question"
    # Each call is also in the tamper-evident audit log, without its prompt.
    entries = bridge.auditor.list_audit(action="aibridge.request", limit=1000).entries
    entry = next(e for e in entries if e.resource_id == mine.id)
    assert (entry.username, entry.resource_name) == (bridge.member_name, "llama-3")
    assert entry.details["outcome"] == "completed" and entry.details["input_tokens"] > 0
    assert "question" not in json.dumps(entry.model_dump(mode="json"))
    assert bridge.auditor.verify_audit().ok
    exported = list(bridge.auditor.export_aibridge(user=bridge.member_name))
    assert exported and exported[-1].id == mine.id  # oldest first
    assert {r.username for r in exported} == {bridge.member_name}
    assert list(bridge.member.export_aibridge(model="no-such-model")) == []
    # The dashboard's page: the same rules, the prompt escaped.
    bridge.openai().chat.completions.create(
        model="llama-3", messages=[{"role": "user", "content": "<script>alert(1)</script>"}]
    )
    bridge.last_record(prompt="<script>alert(1)</script>")

    def page(client: Client, query: str = "") -> str:
        cookie = {"cookie": f"stockade_session={client.token}"}
        answer = httpx.get(f"{bridge.server.url}/aibridge{query}", headers=cookie, timeout=10)
        assert answer.status_code == 200, answer.text
        return answer.text

    seen_by_member = page(bridge.member)
    assert "the member&#39;s own question" in seen_by_member
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in seen_by_member
    assert "<script>alert" not in seen_by_member
    assert "Your requests through the AI bridge" in seen_by_member
    seen_by_auditor = page(bridge.auditor, f"?user={bridge.member_name}&model=llama-3")
    assert "the member&#39;s own question" in seen_by_auditor
    assert "Every request through the AI bridge" in seen_by_auditor
    with Client(bridge.server.url) as stranger:
        name = unique("user")
        bridge.owner.create_user(name, f"{name}@example.com", PASSWORD)
        stranger.login(name, PASSWORD)
        assert "own question" not in page(stranger)


def test_limits_group_models_bad_upstream_key_and_retention(
    fake: FakeLLM, start_server: ServerFactory, request: pytest.FixtureRequest
) -> None:
    server = start_server(
        env=bridge_env(
            fake,
            STOCKADE_AIBRIDGE_ANTHROPIC_KEY="the-wrong-key",
            STOCKADE_AIBRIDGE_REQUESTS_PER_MINUTE="3",
            STOCKADE_AIBRIDGE_TOKENS_PER_DAY="12",
            STOCKADE_AIBRIDGE_GROUP_MODELS=json.dumps(
                {"ml-team": ["llama-*"], "everyone": ["qwen-*", "claude-*"]}
            ),
        )
    )
    owner = Client(server.url)
    owner.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    owner.login("owner", OWNER_PASSWORD)
    names = [unique("user") for _ in range(2)]
    for name in names:
        owner.create_user(name, f"{name}@example.com", PASSWORD)
    tokens = []
    for name in names:
        with Client(server.url) as client:
            client.login(name, PASSWORD)
            tokens.append(client.create_token("t").token)

    def chat(token: str, model: str, text: str = "hi") -> Callable[[], Any]:
        client = sdk_client(server.url, "openai", token)
        return lambda: client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": text}]
        )

    # Group policy: every member may use qwen-*; llama-* only the ml-team.
    with pytest.raises(openai.PermissionDeniedError) as denied:
        chat(tokens[0], "llama-3")()
    assert "none of your groups may use the model 'llama-3'" in str(denied.value)
    listed = sdk_client(server.url, "openai", tokens[0]).models.list()
    assert [m.id for m in listed] == ["qwen-coder"]
    owner.create_group("default", "ml-team", members=[names[0]])
    chat(tokens[0], "llama-3")()
    # Requests per minute: that was the 1st of 3 (the refusal above came before
    # the limits); the 4th in the minute gets 429 with Retry-After.
    chat(tokens[0], "llama-3")()
    chat(tokens[0], "llama-3")()
    with pytest.raises(openai.RateLimitError) as limited:
        chat(tokens[0], "llama-3")()
    assert 0 < int(limited.value.response.headers["retry-after"]) <= 60
    assert "in the last minute" in str(limited.value)

    # Tokens per day: the first call uses more than 12; the next is refused until midnight UTC.
    chat(tokens[1], "qwen-coder", "a question of many many words to use up the allowance")()
    # The allowance counts recorded calls, and a call is recorded after its
    # answer: wait for the record, as a caller's next request usually does.
    deadline = time.monotonic() + 10
    while not owner.list_aibridge(limit=1, user=names[1]).items:
        assert time.monotonic() < deadline, "the first call was never recorded"
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError) as spent:
        chat(tokens[1], "qwen-coder")()
    assert "of your 12 AI bridge tokens for today" in str(spent.value)
    assert 0 < int(spent.value.response.headers["retry-after"]) <= 86400

    # The model server refusing the bridge's own key is the site's problem: 502.
    with pytest.raises(anthropic.InternalServerError) as bad_key:
        sdk_client(server.url, "anthropic", owner.token or "").messages.create(
            model="claude-x", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    assert bad_key.value.status_code == 502
    assert "refused the bridge's credentials" in str(bad_key.value)
    assert "the-wrong-key" not in str(bad_key.value.body)

    # Retention: a record older than 60 days is gone after the next purge (at start-up).
    run_sql(
        server,
        request,
        "UPDATE aibridge_interceptions SET created_at = '2020-01-01 00:00:00.000000' "
        f"WHERE username = '{names[1]}'",
    )
    before = owner.list_aibridge().count
    server.stop()
    server.start()
    owner.login("owner", OWNER_PASSWORD)
    after = owner.list_aibridge()
    assert after.count < before and names[1] not in {r.username for r in after.items}
    owner.close()


# --- workspaces -----------------------------------------------------------------------

WORKSPACE_SCRIPT = """
import json, os, anthropic, httpx, openai
tool = {"type": "function", "function": {"name": "run_tests", "parameters": {"type": "object",
        "properties": {"path": {"type": "string"}}}}}
chat = openai.OpenAI(max_retries=0).chat.completions.create(
    model="llama-3", tools=[tool],
    messages=[{"role": "user", "content": "call a tool to run the tests in the workspace"}])
call = chat.choices[0].message.tool_calls[0]
message = anthropic.Anthropic(max_retries=0).messages.create(
    model="claude-x", max_tokens=50, messages=[{"role": "user", "content": "hello from w"}])
site = os.environ["OPENAI_BASE_URL"].split("/api/v2/")[0]
key = {"authorization": "Bearer " + os.environ["OPENAI_API_KEY"]}
me = httpx.get(site + "/api/v2/users/me", headers=key)
records = httpx.get(site + "/api/v2/aibridge/interceptions/export", headers=key)
as_api_key = httpx.get(site + "/api/v2/aibridge/interceptions",
                       headers={"x-api-key": os.environ["ANTHROPIC_API_KEY"]})
print(json.dumps({"tool": call.function.name, "text": message.content[0].text,
                  "me": me.status_code, "key_is_bridge_only": "bridge" in me.text,
                  "records": [records.status_code, as_api_key.status_code]}))
"""


def test_a_coding_agent_in_a_workspace_reaches_the_model_and_the_auditor_sees_it(
    bridge: Bridge, tmp_path: Path
) -> None:
    template = "name: t\nbackend: local\n"
    with agent_workspace(bridge.server.url, bridge.owner, template, tmp_path / "home") as home:
        (home / "agent.py").write_text(WORKSPACE_SCRIPT)
        done = subprocess.run(
            [STOCKADE, "ssh", "w", "--", sys.executable, "agent.py"],
            env={
                "PATH": "/usr/bin:/bin",
                "HOME": str(tmp_path),
                "STOCKADE_URL": bridge.server.url,
                "STOCKADE_TOKEN": bridge.owner.token or "",
                "STOCKADE_CONFIG_DIR": str(tmp_path / "cfg"),
            },
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr + done.stdout
        said = json.loads(done.stdout.strip().splitlines()[-1])
    assert said["tool"] == "run_tests" and said["text"] == "echo: hello from w"
    # The key the workspace got is good for the bridge and nothing else.
    assert said["me"] == 401 and said["key_is_bridge_only"]
    # Not even the bridge's records: the workspace's owner here is a site
    # owner, who may read everyone's, but not through this key.
    assert said["records"] == [401, 401]

    records = bridge.auditor.list_aibridge(workspace="w").items
    by_provider = {r.provider: r for r in records}
    chat = by_provider["openai"]
    assert chat.username == "owner" and chat.workspace_name == "w"
    assert chat.prompt == "call a tool to run the tests in the workspace"
    assert [c.name for c in chat.tool_calls] == ["run_tests"]
    assert chat.input_tokens > 0 and chat.output_tokens > 0
    assert by_provider["anthropic"].prompt == "hello from w"
    assert by_provider["anthropic"].cache_read_tokens == 3


# --- settings -------------------------------------------------------------------------


def test_settings_name_the_model_servers_and_refuse_half_configurations(tmp_path: Path) -> None:
    from pydantic import ValidationError

    from stockade.egress.guard import REASON_OWN
    from stockade.server.settings import Settings

    settings = Settings(
        data_dir=tmp_path,
        aibridge_openai_base_url="http://vllm.corp.example:8000/v1/",
        aibridge_anthropic_base_url="https://litellm.corp.example",
        aibridge_openai_models=" llama-* , qwen-coder,llama-* ",
    )
    # The configured model servers are Stockade's own destinations: the
    # egress guard lets the bridge reach them, and nothing else.
    policy = settings.egress_policy
    assert policy.decide("vllm.corp.example") == REASON_OWN
    assert policy.decide("litellm.corp.example") == REASON_OWN
    assert policy.decide("api.openai.com") is None
    assert settings.aibridge_openai_base_url == "http://vllm.corp.example:8000/v1"
    assert settings.aibridge_openai_models == "llama-*,qwen-coder"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"aibridge_openai_base_url": "vllm:8000"}, "http:// or https:// URL"),
        ({"aibridge_openai_key": "k"}, "aibridge_openai_base_url is not"),
        ({"aibridge_group_models": '{"devs": "llama"}'}, "must be a list of model"),
        ({"aibridge_group_models": "[1]"}, "must be a JSON object"),
    ]
    for bad, words in cases:
        with pytest.raises(ValidationError) as refused:
            Settings(data_dir=tmp_path, **bad)
        assert words in str(refused.value), (bad, str(refused.value))
