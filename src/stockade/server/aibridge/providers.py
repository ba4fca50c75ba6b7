"""The wire formats the AI bridge speaks: one ``Provider`` per API family.

A provider knows, for each of its endpoints, how to find the model and the
last user prompt in a request, the usage and the tool calls in a response
(whole, or as server-sent events arriving in pieces), and how that family
writes an error. It does no I/O: the service moves the bytes, the provider
only reads them, so a new family (Gemini, say) is one more subclass.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

# A prompt is kept whole up to this size; longer ones are cut (and say so).
MAX_PROMPT_CHARS = 32_000
# Tool-call arguments kept per call.
MAX_ARGUMENT_CHARS = 8_000
MAX_TOOL_CALLS = 64


@dataclass
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0


@dataclass
class Observation:
    """What the bridge learned from one response."""

    usage: Usage = field(default_factory=Usage)
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    error: str | None = None  # an error the upstream reported inside a 200 stream

    def add_tool_call(self, name: Any, arguments: Any) -> None:
        if len(self.tool_calls) >= MAX_TOOL_CALLS:
            return
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, separators=(",", ":"))
        self.tool_calls.append(
            {
                "name": storable(str(name or "")[:255]),
                "arguments": storable(arguments[:MAX_ARGUMENT_CHARS]),
            }
        )


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text_of(content: Any, part_types: tuple[str, ...]) -> str | None:
    """The text of a message's content: a string, or the text parts of a list."""
    if isinstance(content, str):
        return content
    texts = [
        part["text"]
        for part in _list(content)
        if isinstance(part, dict) and part.get("type") in part_types
        and isinstance(part.get("text"), str)
    ]  # fmt: skip
    return "\n".join(texts) if texts else None


def _last_user_text(messages: Any, part_types: tuple[str, ...]) -> str | None:
    for message in reversed(_list(messages)):
        if isinstance(message, dict) and message.get("role") == "user":
            return _text_of(message.get("content"), part_types)
    return None


def storable(text: str) -> str:
    """Text any database can hold: PostgreSQL refuses NUL, and a JSON body
    may carry lone surrogates (escaped) that no encoder accepts."""
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def clip_prompt(text: str | None) -> str | None:
    if text is None:
        return None
    if len(text) > MAX_PROMPT_CHARS:
        text = text[:MAX_PROMPT_CHARS] + f"\n[... {len(text) - MAX_PROMPT_CHARS} more characters]"
    return storable(text)


class SSEDecoder:
    """Server-sent events from bytes that arrive in arbitrary pieces: yields
    ``(event, data)`` for each complete event (``event`` is "" when the
    stream names none). Comments and other fields are ignored."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> Iterator[tuple[str, str]]:
        self._buffer += chunk
        while True:
            cut, size = _event_end(self._buffer)
            if cut < 0:
                return
            raw, self._buffer = self._buffer[:cut], self._buffer[cut + size :]
            event, data = "", []
            for line in raw.decode("utf-8", errors="replace").splitlines():
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
            if data:
                yield event, "\n".join(data)


def _event_end(buffer: bytes) -> tuple[int, int]:
    """Where the first event ends (a blank line) and the separator's size."""
    found = [(buffer.find(sep), len(sep)) for sep in (b"\n\n", b"\r\n\r\n", b"\r\r")]
    found = [f for f in found if f[0] >= 0]
    return min(found) if found else (-1, 0)


class StreamObserver(ABC):
    """Reads one streamed response's events as they pass."""

    def __init__(self) -> None:
        self.observation = Observation()

    @abstractmethod
    def event(self, name: str, data: Any) -> None:
        """One event; ``data`` is its parsed JSON."""

    def finish(self) -> Observation:
        """What the whole stream showed (called once, at its end)."""
        return self.observation


class Provider(ABC):
    """One API family the bridge proxies.

    ``name`` is the path segment (``/api/v2/aibridge/<name>/...``) and the
    settings' prefix (``aibridge_<name>_base_url``). ``endpoints`` maps the
    path after the prefix (``v1/messages``) to the endpoint's short name,
    which records and limits use. The methods take parsed JSON; none of them
    raises on a malformed document: what cannot be read is left out.
    """

    name: ClassVar[str]
    label: ClassVar[str]  # for people: "OpenAI-compatible"
    endpoints: ClassVar[dict[str, str]]
    # Request headers of the client passed on to the upstream (lower case).
    forwarded_headers: ClassVar[tuple[str, ...]] = ("content-type", "accept")

    @abstractmethod
    def upstream_url(self, base_url: str, path: str) -> str:
        """The upstream's URL for ``path`` (``v1/...``)."""

    @abstractmethod
    def auth_headers(self, key: str) -> dict[str, str]:
        """The headers that carry the upstream key."""

    @abstractmethod
    def error_body(self, status: int, message: str, reason: str = "") -> dict[str, Any]:
        """An error in this family's format (with ``reason``, our short label,
        where the format has a place for one)."""

    @abstractmethod
    def is_error_body(self, body: Any) -> bool:
        """Whether an upstream's error body is already in this format."""

    @abstractmethod
    def stream_error_event(self, message: str) -> bytes:
        """An error event to end a stream that already began."""

    @abstractmethod
    def prompt(self, endpoint: str, body: dict[str, Any]) -> str | None:
        """The last user prompt of a request."""

    def prepare(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """The request as sent upstream (by default unchanged)."""
        return body

    @abstractmethod
    def observe(self, endpoint: str, body: Any) -> Observation:
        """Usage and tool calls of a whole (non-streamed) response."""

    @abstractmethod
    def stream_observer(self, endpoint: str) -> StreamObserver:
        """A reader for a streamed response of ``endpoint``."""


# --- OpenAI ---------------------------------------------------------------------


def _openai_error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")


def _openai_usage(usage: Any) -> Usage:
    usage = _dict(usage)
    # chat.completions names them prompt/completion, responses input/output.
    details = _dict(usage.get("prompt_tokens_details") or usage.get("input_tokens_details"))
    return Usage(
        input_tokens=_int(usage.get("prompt_tokens", usage.get("input_tokens"))),
        output_tokens=_int(usage.get("completion_tokens", usage.get("output_tokens"))),
        cache_read_tokens=_int(details.get("cached_tokens")),
    )


def _observe_response_object(response: Any, observation: Observation) -> None:
    """A ``response`` object of the Responses API (whole, or in response.completed)."""
    response = _dict(response)
    if "usage" in response:
        observation.usage = _openai_usage(response.get("usage"))
    for item in _list(response.get("output")):
        item = _dict(item)
        if item.get("type") == "function_call":
            observation.add_tool_call(item.get("name"), item.get("arguments", ""))
        elif item.get("type") == "custom_tool_call":
            observation.add_tool_call(item.get("name"), item.get("input", ""))
    error = _dict(response.get("error"))
    if error.get("message"):
        observation.error = str(error["message"])


class _ChatStream(StreamObserver):
    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[int, list[str]] = {}  # index -> [name, arguments]

    def event(self, name: str, data: Any) -> None:
        data = _dict(data)
        if data.get("usage"):
            self.observation.usage = _openai_usage(data["usage"])
        if data.get("error"):
            self.observation.error = str(_dict(data["error"]).get("message") or data["error"])
        for choice in _list(data.get("choices")):
            for call in _list(_dict(_dict(choice).get("delta")).get("tool_calls")):
                call = _dict(call)
                index = _int(call.get("index"))
                function = _dict(call.get("function"))
                entry = self._calls.setdefault(index, ["", ""])
                if isinstance(function.get("name"), str):
                    entry[0] = entry[0] or function["name"]
                if isinstance(function.get("arguments"), str):
                    entry[1] += function["arguments"]

    def finish(self) -> Observation:
        for index in sorted(self._calls):
            self.observation.add_tool_call(*self._calls[index])
        self._calls.clear()
        return self.observation


class _ResponsesStream(StreamObserver):
    def event(self, name: str, data: Any) -> None:
        data = _dict(data)
        kind = data.get("type") or name
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            _observe_response_object(data.get("response"), self.observation)
        elif kind == "error":
            self.observation.error = str(data.get("message") or "the model server failed")


class OpenAI(Provider):
    name = "openai"
    label = "OpenAI-compatible"
    endpoints: ClassVar[dict[str, str]] = {
        "v1/chat/completions": "chat.completions",
        "v1/responses": "responses",
        "v1/models": "models",
    }
    forwarded_headers = ("content-type", "accept", "openai-beta")

    def upstream_url(self, base_url: str, path: str) -> str:
        # The base URL carries /v1 already (the convention of OPENAI_BASE_URL).
        return f"{base_url}/{path.removeprefix('v1/')}"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"authorization": f"Bearer {key}"}

    def error_body(self, status: int, message: str, reason: str = "") -> dict[str, Any]:
        return {
            "error": {
                "message": message,
                "type": _openai_error_type(status),
                "param": None,
                "code": reason or None,
            }
        }

    def is_error_body(self, body: Any) -> bool:
        return isinstance(_dict(body).get("error"), dict) and "message" in body["error"]

    def stream_error_event(self, message: str) -> bytes:
        return b"data: " + json.dumps(self.error_body(502, message)).encode() + b"\n\n"

    def prompt(self, endpoint: str, body: dict[str, Any]) -> str | None:
        if endpoint == "responses":
            given = body.get("input")
            if isinstance(given, str):
                return given
            for item in reversed(_list(given)):
                item = _dict(item)
                if item.get("role") == "user" and item.get("type", "message") == "message":
                    return _text_of(item.get("content"), ("input_text", "text"))
            return None
        return _last_user_text(body.get("messages"), ("text",))

    def prepare(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        if endpoint == "chat.completions" and body.get("stream") is True:
            # A streamed chat completion reports usage only when asked: the
            # bridge asks, so that every streamed call is counted. The extra
            # last chunk (no choices) is part of the documented format.
            options = _dict(body.get("stream_options"))
            if options.get("include_usage") is not True:
                return {**body, "stream_options": {**options, "include_usage": True}}
        return body

    def observe(self, endpoint: str, body: Any) -> Observation:
        observation = Observation()
        body = _dict(body)
        if endpoint == "responses":
            _observe_response_object(body, observation)
            return observation
        observation.usage = _openai_usage(body.get("usage"))
        for choice in _list(body.get("choices")):
            for call in _list(_dict(_dict(choice).get("message")).get("tool_calls")):
                function = _dict(_dict(call).get("function"))
                observation.add_tool_call(function.get("name"), function.get("arguments", ""))
        return observation

    def stream_observer(self, endpoint: str) -> StreamObserver:
        return _ResponsesStream() if endpoint == "responses" else _ChatStream()


# --- Anthropic ------------------------------------------------------------------


def _anthropic_error_type(status: int) -> str:
    return {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "not_found_error",
        413: "request_too_large",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error" if status >= 500 else "invalid_request_error")


def _anthropic_usage(usage: Any, into: Usage) -> None:
    """Fill ``into`` from a usage block; a stream sends its fields in two
    events (message_start, then message_delta), so only what is present is set."""
    usage = _dict(usage)
    for source, target in (
        ("input_tokens", "input_tokens"),
        ("output_tokens", "output_tokens"),
        ("cache_read_input_tokens", "cache_read_tokens"),
        ("cache_creation_input_tokens", "cache_write_tokens"),
    ):
        if usage.get(source) is not None:
            setattr(into, target, _int(usage[source]))


class _MessagesStream(StreamObserver):
    def __init__(self) -> None:
        super().__init__()
        self._calls: dict[int, list[str]] = {}  # content block index -> [name, json]

    def event(self, name: str, data: Any) -> None:
        data = _dict(data)
        kind = data.get("type") or name
        usage = self.observation.usage
        if kind == "message_start":
            _anthropic_usage(_dict(data.get("message")).get("usage"), usage)
        elif kind == "message_delta":
            _anthropic_usage(data.get("usage"), usage)
        elif kind == "content_block_start":
            block = _dict(data.get("content_block"))
            if block.get("type") in ("tool_use", "server_tool_use"):
                given = block.get("input")
                self._calls[_int(data.get("index"))] = [
                    str(block.get("name") or ""),
                    json.dumps(given) if given else "",
                ]
        elif kind == "content_block_delta":
            delta = _dict(data.get("delta"))
            call = self._calls.get(_int(data.get("index")))
            if call is not None and delta.get("type") == "input_json_delta":
                call[1] += str(delta.get("partial_json") or "")
        elif kind == "error":
            self.observation.error = str(_dict(data.get("error")).get("message") or "error")

    def finish(self) -> Observation:
        for index in sorted(self._calls):
            name, arguments = self._calls[index]
            self.observation.add_tool_call(name, arguments or "{}")
        self._calls.clear()
        return self.observation


class Anthropic(Provider):
    name = "anthropic"
    label = "Anthropic-compatible"
    endpoints: ClassVar[dict[str, str]] = {
        "v1/messages": "messages",
        "v1/messages/count_tokens": "count_tokens",
        "v1/models": "models",
    }
    forwarded_headers = ("content-type", "accept", "anthropic-version", "anthropic-beta")

    def upstream_url(self, base_url: str, path: str) -> str:
        return f"{base_url}/{path}"

    def auth_headers(self, key: str) -> dict[str, str]:
        return {"x-api-key": key}

    def error_body(self, status: int, message: str, reason: str = "") -> dict[str, Any]:
        return {
            "type": "error",
            "error": {"type": _anthropic_error_type(status), "message": message},
        }

    def is_error_body(self, body: Any) -> bool:
        body = _dict(body)
        return body.get("type") == "error" and "message" in _dict(body.get("error"))

    def stream_error_event(self, message: str) -> bytes:
        data = json.dumps(self.error_body(502, message)).encode()
        return b"event: error\ndata: " + data + b"\n\n"

    def prompt(self, endpoint: str, body: dict[str, Any]) -> str | None:
        return _last_user_text(body.get("messages"), ("text",))

    def observe(self, endpoint: str, body: Any) -> Observation:
        observation = Observation()
        body = _dict(body)
        _anthropic_usage(body.get("usage"), observation.usage)
        for block in _list(body.get("content")):
            block = _dict(block)
            if block.get("type") in ("tool_use", "server_tool_use"):
                observation.add_tool_call(block.get("name"), block.get("input", {}))
        return observation

    def stream_observer(self, endpoint: str) -> StreamObserver:
        return _MessagesStream()


PROVIDERS: dict[str, Provider] = {p.name: p for p in (OpenAI(), Anthropic())}
