"""A model server for tests and benchmarks: the OpenAI (chat completions,
responses, models) and Anthropic (messages, models) wire formats on
loopback, close enough that the official SDKs work against it unchanged.
Nothing real can serve a model here; this is the edge of our boundary.

What it answers is scripted by the last user message:

- ``echo: <text>``, word by word when streamed (the default);
- a call of the request's first tool with ``{"city": "Paris", "unit":
  "celsius"}`` when the text holds ``call a tool`` and tools were given;
- ``fail:<status>``: that error in the provider's format (429 with
  ``retry-after: 7``);
- ``slow:<n>``: n words 0.2 s apart; ``chunks:<n>``: n words at once.

Usage is deterministic: input tokens are the words of every message (and the
system prompt), output tokens the words generated (5 for a tool call); cached
input: OpenAI 2, Anthropic 3 read and 2 written. Each request is logged with
its outcome (``completed``, or ``cancelled`` when the client left first) at
``GET /_fake/requests``.

    python -m stockade.devtools.llm_upstream --port 0 --key KEY --models a,b
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ARGUMENTS = {"city": "Paris", "unit": "celsius"}
_OPENAI_ERRORS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found"}
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", "")) for p in content if isinstance(p, dict) and "text" in p
        )
    return ""


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    given = body.get("messages", body.get("input"))
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    return [m for m in given or [] if isinstance(m, dict)]


def _last_user(body: dict[str, Any]) -> str:
    for message in reversed(_messages(body)):
        if message.get("role") == "user":
            return _text(message.get("content"))
    return ""


def _input_tokens(body: dict[str, Any]) -> int:
    words = sum(len(_text(m.get("content")).split()) for m in _messages(body))
    for key in ("system", "instructions"):
        words += len(_text(body.get(key)).split())
    return words


class Script:
    """What to answer a request with."""

    def __init__(self, body: dict[str, Any]) -> None:
        # Echoed back: what cannot be encoded (a lone surrogate) becomes "?".
        text = _last_user(body).encode("utf-8", "replace").decode("utf-8")
        self.fail = int(m.group(1)) if (m := re.search(r"fail:(\d{3})", text)) else None
        self.delay = 0.0
        self.words = f"echo: {text}".split(" ")
        if m := re.search(r"slow:(\d+)", text):
            self.words, self.delay = [f"w{i} " for i in range(int(m.group(1)))], 0.2
        elif m := re.search(r"chunks:(\d+)", text):
            self.words = [f"w{i} " for i in range(int(m.group(1)))]
        else:
            self.words = [w + " " for w in self.words[:-1]] + self.words[-1:]
        tools = body.get("tools") or []
        self.tool: str | None = None
        if tools and "call a tool" in text:
            first = tools[0]
            self.tool = str(first.get("name") or first.get("function", {}).get("name"))
        self.input_tokens = _input_tokens(body)
        self.output_tokens = 5 if self.tool else len(self.words)

    @property
    def text(self) -> str:
        return "".join(self.words)


def _sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


class Upstream:
    def __init__(self, key: str, models: list[str]) -> None:
        self.key = key
        self.models = models
        self.log: list[dict[str, Any]] = []

    # --- plumbing ----------------------------------------------------------------------

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/responses", self.responses, methods=["POST"]),
                Route("/v1/messages", self.messages, methods=["POST"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/_fake/requests", self.requests, methods=["GET"]),
                Route("/_fake/reset", self.reset, methods=["POST"]),
            ]
        )

    async def requests(self, request: Request) -> Response:
        return JSONResponse(self.log)

    async def reset(self, request: Request) -> Response:
        self.log.clear()
        return Response(status_code=204)

    async def _begin(
        self, request: Request, anthropic: bool
    ) -> tuple[dict[str, Any], dict[str, Any] | Response]:
        """Log the request; its body, or the error response it gets."""
        raw = await request.body()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        entry = {
            "method": request.method,
            "path": request.url.path,
            "headers": {k.lower(): v for k, v in request.headers.items()},
            "body": body,
            "outcome": "open",
        }
        self.log.append(entry)
        if anthropic:
            authorized = request.headers.get("x-api-key") == self.key
        else:
            authorized = request.headers.get("authorization") == f"Bearer {self.key}"
        problem: tuple[int, str] | None = None
        if not authorized:
            problem = (401, "invalid API key")
        elif request.method == "POST" and not isinstance(body, dict):
            problem = (400, "the body must be a JSON object")
        elif request.method == "POST" and body.get("model") not in self.models:  # type: ignore[union-attr]
            problem = (404, f"model {body.get('model')!r} not found")  # type: ignore[union-attr]
        if problem is None and isinstance(body, dict):
            fail = Script(body).fail
            if fail:
                problem = (fail, f"upstream failed on purpose ({fail})")
        if problem is not None:
            entry["outcome"] = "completed"
            return entry, self._error(anthropic, *problem)
        return entry, body or {}

    def _error(self, anthropic: bool, status: int, message: str) -> Response:
        headers = {"retry-after": "7"} if status == 429 else None
        if anthropic:
            kind = _ANTHROPIC_ERRORS.get(status, "api_error")
            body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
        else:
            kind = _OPENAI_ERRORS.get(status, "server_error" if status >= 500 else "error")
            body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        return JSONResponse(body, status_code=status, headers=headers)

    async def _answer(
        self, request: Request, entry: dict[str, Any], script: Script, whole: dict[str, Any]
    ) -> Response:
        """A non-streamed answer after the script's delay, raced against the
        client leaving."""
        delay = script.delay * len(script.words)
        if delay:
            sleep = asyncio.ensure_future(asyncio.sleep(delay))
            left = asyncio.ensure_future(_disconnected(request))
            await asyncio.wait({sleep, left}, return_when=asyncio.FIRST_COMPLETED)
            for task in (sleep, left):
                task.cancel()
            if left.done() and not left.cancelled():
                entry["outcome"] = "cancelled"
                return Response(status_code=499)
        entry["outcome"] = "completed"
        return JSONResponse(whole)

    def _stream(self, entry: dict[str, Any], events: AsyncIterator[bytes]) -> Response:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for event in events:
                    yield event
                entry["outcome"] = "completed"
            except BaseException:
                entry["outcome"] = "cancelled"
                raise
            finally:
                if entry["outcome"] == "open":  # closed early by the server
                    entry["outcome"] = "cancelled"

        return StreamingResponse(body(), media_type="text/event-stream")

    async def list_models(self, request: Request) -> Response:
        anthropic = "anthropic-version" in request.headers
        entry, problem = await self._begin(request, anthropic)
        if isinstance(problem, Response):
            return problem
        entry["outcome"] = "completed"
        if anthropic:
            data = [
                {"type": "model", "id": m, "display_name": m, "created_at": "2026-01-01T00:00:00Z"}
                for m in self.models
            ]
            return JSONResponse(
                {"data": data, "has_more": False, "first_id": self.models[0],
                 "last_id": self.models[-1]}
            )  # fmt: skip
        listed = [
            {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models
        ]
        return JSONResponse({"object": "list", "data": listed})

    # --- OpenAI chat completions -----------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        entry, body = await self._begin(request, anthropic=False)
        if isinstance(body, Response):
            return body
        script = Script(body)
        ident, model, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", body["model"], int(time.time())
        usage = {
            "prompt_tokens": script.input_tokens,
            "completion_tokens": script.output_tokens,
            "total_tokens": script.input_tokens + script.output_tokens,
            "prompt_tokens_details": {"cached_tokens": 2},
        }
        call = {
            "id": "call_1",
            "type": "function",
            "function": {"name": script.tool, "arguments": json.dumps(ARGUMENTS)},
        }
        if not body.get("stream"):
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None if script.tool else script.text,
            }
            if script.tool:
                message["tool_calls"] = [call]
            whole = {
                "id": ident, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": message,
                             "finish_reason": "tool_calls" if script.tool else "stop"}],
                "usage": usage,
            }  # fmt: skip
            return await self._answer(request, entry, script, whole)

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return _sse({
                "id": ident, "object": "chat.completion.chunk", "created": created,
                "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            })  # fmt: skip

        async def events() -> AsyncIterator[bytes]:
            yield chunk({"role": "assistant", "content": ""})
            if script.tool:
                arguments = json.dumps(ARGUMENTS)
                yield chunk({"tool_calls": [{**call, "index": 0, "function": {
                    "name": script.tool, "arguments": ""}}]})  # fmt: skip
                for piece in (arguments[:10], arguments[10:20], arguments[20:]):
                    yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            else:
                for word in script.words:
                    await asyncio.sleep(script.delay)
                    yield chunk({"content": word})
            yield chunk({}, "tool_calls" if script.tool else "stop")
            if (body.get("stream_options") or {}).get("include_usage"):
                yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": [], "usage": usage})  # fmt: skip
            yield b"data: [DONE]\n\n"

        return self._stream(entry, events())

    # --- OpenAI responses ----------------------------------------------------------------

    async def responses(self, request: Request) -> Response:
        entry, body = await self._begin(request, anthropic=False)
        if isinstance(body, Response):
            return body
        script = Script(body)
        ident = f"resp_{uuid.uuid4().hex[:12]}"
        if script.tool:
            item: dict[str, Any] = {
                "type": "function_call", "id": "fc_1", "call_id": "call_1",
                "name": script.tool, "arguments": json.dumps(ARGUMENTS), "status": "completed",
            }  # fmt: skip
        else:
            item = {
                "type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": script.text, "annotations": []}],
            }  # fmt: skip

        def response(status: str, output: list[Any], usage: Any) -> dict[str, Any]:
            return {
                "id": ident, "object": "response", "created_at": int(time.time()),
                "status": status, "model": body["model"], "output": output,
                "parallel_tool_calls": True, "tool_choice": "auto", "tools": [],
                "usage": usage,
            }  # fmt: skip

        usage = {
            "input_tokens": script.input_tokens,
            "input_tokens_details": {"cached_tokens": 2},
            "output_tokens": script.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": script.input_tokens + script.output_tokens,
        }
        if not body.get("stream"):
            return await self._answer(request, entry, script, response("completed", [item], usage))

        async def events() -> AsyncIterator[bytes]:
            number = 0

            def event(kind: str, **fields: Any) -> bytes:
                nonlocal number
                number += 1
                return _sse({"type": kind, "sequence_number": number, **fields}, kind)

            yield event("response.created", response=response("in_progress", [], None))
            yield event("response.in_progress", response=response("in_progress", [], None))
            if script.tool:
                yield event("response.output_item.added", output_index=0,
                            item={**item, "arguments": "", "status": "in_progress"})  # fmt: skip
                arguments = item["arguments"]
                for piece in (arguments[:10], arguments[10:]):
                    yield event("response.function_call_arguments.delta", item_id="fc_1",
                                output_index=0, delta=piece)  # fmt: skip
                yield event("response.function_call_arguments.done", item_id="fc_1",
                            output_index=0, arguments=arguments)  # fmt: skip
            else:
                yield event("response.output_item.added", output_index=0,
                            item={**item, "content": [], "status": "in_progress"})  # fmt: skip
                part = {"type": "output_text", "text": "", "annotations": []}
                yield event("response.content_part.added", item_id="msg_1", output_index=0,
                            content_index=0, part=part)  # fmt: skip
                for word in script.words:
                    await asyncio.sleep(script.delay)
                    yield event("response.output_text.delta", item_id="msg_1", output_index=0,
                                content_index=0, delta=word, logprobs=[])  # fmt: skip
                yield event("response.output_text.done", item_id="msg_1", output_index=0,
                            content_index=0, text=script.text, logprobs=[])  # fmt: skip
                yield event("response.content_part.done", item_id="msg_1", output_index=0,
                            content_index=0, part={**part, "text": script.text})  # fmt: skip
            yield event("response.output_item.done", output_index=0, item=item)
            yield event("response.completed", response=response("completed", [item], usage))

        return self._stream(entry, events())

    # --- Anthropic messages -------------------------------------------------------------

    async def messages(self, request: Request) -> Response:
        entry, body = await self._begin(request, anthropic=True)
        if isinstance(body, Response):
            return body
        script = Script(body)
        ident = f"msg_{uuid.uuid4().hex[:12]}"
        block: dict[str, Any] = (
            {"type": "tool_use", "id": "toolu_1", "name": script.tool, "input": ARGUMENTS}
            if script.tool
            else {"type": "text", "text": script.text}
        )
        usage = {
            "input_tokens": script.input_tokens,
            "output_tokens": script.output_tokens,
            "cache_creation_input_tokens": 2,
            "cache_read_input_tokens": 3,
        }
        message = {
            "id": ident, "type": "message", "role": "assistant", "model": body["model"],
            "content": [block], "stop_reason": "tool_use" if script.tool else "end_turn",
            "stop_sequence": None, "usage": usage,
        }  # fmt: skip
        if not body.get("stream"):
            return await self._answer(request, entry, script, message)

        async def events() -> AsyncIterator[bytes]:
            start = {**message, "content": [], "stop_reason": None,
                     "usage": {**usage, "output_tokens": 1}}  # fmt: skip
            yield _sse({"type": "message_start", "message": start}, "message_start")
            yield _sse({"type": "ping"}, "ping")
            if script.tool:
                empty = {**block, "input": {}}
                yield _sse({"type": "content_block_start", "index": 0, "content_block": empty},
                           "content_block_start")  # fmt: skip
                arguments = json.dumps(ARGUMENTS)
                for piece in (arguments[:10], arguments[10:]):
                    delta = {"type": "input_json_delta", "partial_json": piece}
                    yield _sse({"type": "content_block_delta", "index": 0, "delta": delta},
                               "content_block_delta")  # fmt: skip
            else:
                empty = {"type": "text", "text": ""}
                yield _sse({"type": "content_block_start", "index": 0, "content_block": empty},
                           "content_block_start")  # fmt: skip
                for word in script.words:
                    await asyncio.sleep(script.delay)
                    delta = {"type": "text_delta", "text": word}
                    yield _sse({"type": "content_block_delta", "index": 0, "delta": delta},
                               "content_block_delta")  # fmt: skip
            yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
            ending = {"stop_reason": message["stop_reason"], "stop_sequence": None}
            usage_delta = {"output_tokens": script.output_tokens}
            yield _sse(
                {"type": "message_delta", "delta": ending, "usage": usage_delta}, "message_delta"
            )
            yield _sse({"type": "message_stop"}, "message_stop")

        return self._stream(entry, events())


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


class FakeLLM:
    """The model server in a subprocess on a free loopback port, for a
    ``with`` block: ``url`` (no /v1), ``requests()`` (the log), ``reset()``."""

    def __init__(self, *, key: str, models: list[str]) -> None:
        self.key = key
        self.models = models
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> FakeLLM:
        command = [sys.executable, "-m", "stockade.devtools.llm_upstream", "--port", "0",
                   "--key", self.key, "--models", ",".join(self.models)]  # fmt: skip
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line.startswith("listening on "):
            self._process.kill()
            raise RuntimeError(f"the fake model server did not start: {line!r}")
        self.url = line.split()[-1]
        return self

    def __exit__(self, *exc: object) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()

    def requests(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/_fake/requests", timeout=10, trust_env=False)
        answer.raise_for_status()
        log: list[dict[str, Any]] = answer.json()
        return log

    def reset(self) -> None:
        httpx.post(f"{self.url}/_fake/reset", timeout=10, trust_env=False).raise_for_status()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake OpenAI/Anthropic model server")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", required=True)
    parser.add_argument("--models", default="test-model")
    args = parser.parse_args()
    upstream = Upstream(args.key, [m for m in args.models.split(",") if m])
    listener = socket.socket()
    listener.bind(("127.0.0.1", args.port))
    config = uvicorn.Config(upstream.app(), log_level="warning", lifespan="off")
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]}", flush=True)
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main()
