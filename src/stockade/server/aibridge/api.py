"""The AI bridge's endpoints: the OpenAI- and Anthropic-compatible APIs that
callers point their stock clients at, and the records of what went through.

Errors on the provider routes come in the provider's own format (the app's
error handlers ask ``error_body``), so the official SDKs raise their usual
typed exceptions with our message."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.types import Receive, Scope, Send

from stockade.sdk import types
from stockade.server.aibridge.providers import PROVIDERS
from stockade.server.aibridge.service import (
    MODEL_ENDPOINTS,
    AibridgeService,
    BridgeError,
    Call,
    ClientGone,
    Upstream,
    race_disconnect,
)
from stockade.server.authz import Actor, current_actor, signed_in
from stockade.server.deps import ActorDep, Limit, Offset, ServicesDep
from stockade.server.errors import InvalidInput
from stockade.server.middleware import AIBRIDGE_PREFIX
from stockade.server.observability import get_logger

log = get_logger("stockade.aibridge")

router = APIRouter(prefix="/api/v2/aibridge", dependencies=[signed_in()])

# Status for a call whose client went away (nginx's convention; never sent).
CLIENT_CLOSED = 499


def error_body(path: str, status: int, message: str, reason: str) -> dict[str, Any] | None:
    """The error body a provider route answers with (None: not one)."""
    rest = path.removeprefix(AIBRIDGE_PREFIX)
    provider = PROVIDERS.get(rest.partition("/")[0]) if rest != path else None
    return provider.error_body(status, message, reason) if provider is not None else None


def _bridge(request: Request) -> AibridgeService:
    bridge: AibridgeService = request.app.state.services.aibridge
    return bridge


def _error(request: Request, call: Call | None, provider: str, exc: BridgeError) -> Response:
    request.app.state.services.metrics.errors.labels(exc.reason).inc()
    level = log.warning if exc.status >= 500 else log.info
    level("aibridge_refused", reason=exc.reason, status=exc.status, detail=exc.log_message)
    if call is not None:
        call.fail(exc)
    body = PROVIDERS[provider].error_body(exc.status, exc.message, exc.reason)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers)


async def _request_body(request: Request) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its JSON, checked as far as the bridge needs."""
    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BridgeError(
            400,
            "the request body must be a JSON object (Content-Type: application/json)",
            reason="invalid_input",
        )
    model = body.get("model")
    if not isinstance(model, str) or not model.strip() or len(model) > 255:
        raise BridgeError(
            400,
            "the request needs a model: a name of at most 255 characters",
            reason="invalid_input",
        )
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BridgeError(400, "stream must be true or false", reason="invalid_input")
    return raw, body


class RelayResponse(Response):
    """A streamed answer passed on chunk by chunk. A client that goes away
    cancels the upstream request at once (not at the next chunk); the record
    is written whatever happens."""

    def __init__(
        self, bridge: AibridgeService, call: Call, upstream: Upstream, upstream_response: Any
    ) -> None:
        # Not Response.__init__, which would set an empty body and with it
        # Content-Length: 0; a stream has no length.
        self.status_code = upstream_response.status_code
        self.background = None
        self.bridge, self.call, self.upstream = bridge, call, upstream
        self.upstream_response = upstream_response
        headers = bridge.passed_headers(upstream_response)
        headers.setdefault("content-type", "text/event-stream")
        # Reverse proxies in front of Stockade must not buffer the stream.
        headers.update({"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        call = self.call
        chunks = self.bridge.relay_stream(call, self.upstream, self.upstream_response)
        stopping = False

        async def pump() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": self.status_code,
                    "headers": self.raw_headers,
                }
            )
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})

        try:
            await race_disconnect(pump(), receive)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):  # OSError: a send after the client left
            _cancelled(call)
        except asyncio.CancelledError:  # the server is stopping
            stopping = True
            _cancelled(call, "the server stopped before the answer was complete")
            raise
        finally:
            await chunks.aclose()
            await self.upstream_response.aclose()
            # Once the caller has the whole answer: the record adds no latency.
            if stopping:
                self.bridge.record_later(call)  # this task may not await any more
            else:
                await self.bridge.record(call)


def _cancelled(
    call: Call, why: str = "the client disconnected before the answer was complete"
) -> None:
    call.outcome, call.status, call.error = "cancelled", CLIENT_CLOSED, why


async def _proxy(request: Request, provider: str, path: str) -> Response:
    bridge = _bridge(request)
    actor: Actor = current_actor(request)
    endpoint = PROVIDERS[provider].endpoints[path]
    call: Call | None = None
    upstream: Upstream | None = None
    try:
        upstream = bridge.upstream(provider)
        if request.method == "GET":
            return await _models(request, bridge, actor, upstream, path)
        raw, body = await _request_body(request)
        model = body["model"]
        call = Call(
            actor=actor,
            provider=provider,
            endpoint=endpoint,
            model=model,
            streamed=body.get("stream") is True,
            prompt=upstream.provider.prompt(endpoint, body),
            request_id=getattr(request.state, "request_id", None),
            ip=request.client.host if request.client else None,
            user_agent=(request.headers.get("user-agent") or "")[:256] or None,
        )
        await bridge.check_model(actor, upstream, model)
        # count_tokens is not recorded, but it carries a whole prompt to the
        # model server: it counts against the limits like a generation.
        await bridge.check_limits(actor)
        prepared = upstream.provider.prepare(endpoint, body)
        content = raw if prepared is body else json.dumps(prepared).encode()
        outgoing = bridge.upstream_request(
            upstream, "POST", path, {k.lower(): v for k, v in request.headers.items()}, content
        )
        response = await race_disconnect(bridge.send(upstream, outgoing), request.receive)
    except BridgeError as exc:
        answer = _error(request, call, provider, exc)
        if call is not None and endpoint in MODEL_ENDPOINTS:
            answer.background = BackgroundTask(bridge.record, call)
        return answer
    except ClientGone:
        return await _gone(bridge, call)
    assert call is not None and upstream is not None
    if call.streamed and response.status_code < 400:
        return RelayResponse(bridge, call, upstream, response)  # first byte: first chunk
    call.first_byte = time.perf_counter()  # the upstream's status line and headers
    try:
        raw_answer = await race_disconnect(response.aread(), request.receive)
    except ClientGone:
        return await _gone(bridge, call)
    finally:
        await response.aclose()
    status = response.status_code
    if status >= 400:
        status, raw_answer = bridge.upstream_error(upstream, status, raw_answer)
        call.status, call.outcome = status, "upstream_error"
        call.error = _message_of(raw_answer)
    else:
        with contextlib.suppress(ValueError):
            call.observation = upstream.provider.observe(endpoint, json.loads(raw_answer))
    headers = bridge.passed_headers(response)
    # Recorded once the caller has the answer: the record adds no latency.
    record = BackgroundTask(bridge.record, call) if endpoint in MODEL_ENDPOINTS else None
    return Response(raw_answer, status_code=status, headers=headers, background=record)


async def _gone(bridge: AibridgeService, call: Call | None) -> Response:
    if call is not None:
        _cancelled(call)
        if call.endpoint in MODEL_ENDPOINTS:
            await bridge.record(call)
    return Response(status_code=CLIENT_CLOSED)


def _message_of(raw: bytes) -> str | None:
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message)[:2000] if message else None


async def _models(
    request: Request, bridge: AibridgeService, actor: Actor, upstream: Upstream, path: str
) -> Response:
    """The upstream's model list, less the models this caller may not use."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    response = await race_disconnect(
        bridge.send(upstream, bridge.upstream_request(upstream, "GET", path, headers, b"")),
        request.receive,
    )
    try:
        raw = await response.aread()
    finally:
        await response.aclose()
    if response.status_code >= 400:
        status, raw = bridge.upstream_error(upstream, response.status_code, raw)
        return Response(raw, status_code=status, media_type="application/json")
    try:
        listing = json.loads(raw)
    except ValueError:
        listing = None
    if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
        raise BridgeError(
            502,
            f"the {upstream.provider.label} model server's model list could not be read",
            reason="aibridge_bad_model_list",
            outcome="failed",
        )
    allowed = await bridge.allowed_models(actor, upstream)
    listing["data"] = [
        m for m in listing["data"] if isinstance(m, dict) and allowed(str(m.get("id", "")))
    ]
    return JSONResponse(listing)


# --- the provider routes --------------------------------------------------------------


@router.post("/openai/v1/chat/completions", tags=["aibridge"])
async def openai_chat_completions(request: Request) -> Response:
    """OpenAI-compatible chat completions, streamed (SSE) or not."""
    return await _proxy(request, "openai", "v1/chat/completions")


@router.post("/openai/v1/responses", tags=["aibridge"])
async def openai_responses(request: Request) -> Response:
    """OpenAI-compatible Responses API, streamed (SSE) or not."""
    return await _proxy(request, "openai", "v1/responses")


@router.get("/openai/v1/models", tags=["aibridge"])
async def openai_models(request: Request) -> Response:
    """The models the caller may use through the OpenAI-compatible bridge."""
    return await _proxy(request, "openai", "v1/models")


@router.post("/anthropic/v1/messages", tags=["aibridge"])
async def anthropic_messages(request: Request) -> Response:
    """Anthropic-compatible Messages API, streamed (SSE) or not."""
    return await _proxy(request, "anthropic", "v1/messages")


@router.post("/anthropic/v1/messages/count_tokens", tags=["aibridge"])
async def anthropic_count_tokens(request: Request) -> Response:
    """Anthropic-compatible token counting (passed through, not recorded)."""
    return await _proxy(request, "anthropic", "v1/messages/count_tokens")


@router.get("/anthropic/v1/models", tags=["aibridge"])
async def anthropic_models(request: Request) -> Response:
    """The models the caller may use through the Anthropic-compatible bridge."""
    return await _proxy(request, "anthropic", "v1/models")


# --- the records ------------------------------------------------------------------------


async def aibridge_filter(
    user: Annotated[str | None, Query(max_length=64, description="username")] = None,
    workspace: Annotated[str | None, Query(max_length=64, description="workspace name")] = None,
    provider: Annotated[Literal["openai", "anthropic"] | None, Query()] = None,
    model: Annotated[str | None, Query(max_length=255)] = None,
    since: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601 time, exclusive")] = None,
) -> types.AibridgeFilter:
    for name, value in (("since", since), ("until", until)):
        if value is not None and value.tzinfo is None:
            raise InvalidInput(f"{name} needs a time zone, e.g. 2026-01-31T12:00:00Z")
    try:
        since, until = (v.astimezone(UTC) if v else None for v in (since, until))
    except OverflowError as exc:
        raise InvalidInput("since/until is outside the range of dates records can hold") from exc
    if since and until and since >= until:
        raise InvalidInput("since must be earlier than until")
    return types.AibridgeFilter(user, workspace, provider, model, since, until)


FilterDep = Annotated[types.AibridgeFilter, Depends(aibridge_filter)]


@router.get("/interceptions", tags=["aibridge"])
async def list_interceptions(
    flt: FilterDep, actor: ActorDep, services: ServicesDep, limit: Limit = 100, offset: Offset = 0
) -> types.AibridgeInterceptionList:
    """Requests through the bridge, newest first: everyone's for owners and
    auditors, one's own for everybody else."""
    return await services.aibridge.list_records(actor, flt, limit=limit, offset=offset)


@router.get("/interceptions/export", tags=["aibridge"], response_class=StreamingResponse)
async def export_interceptions(
    flt: FilterDep, actor: ActorDep, services: ServicesDep
) -> StreamingResponse:
    """The same records as JSON lines, oldest first, for a SIEM."""
    pages = services.aibridge.export_records(actor, flt)
    # The first page is read before answering, so that a failing query is an
    # error response and not a 200 that breaks off.
    first = await anext(pages, b"")

    async def lines() -> AsyncIterator[bytes]:
        yield first
        async for page in pages:
            yield page

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@router.get("/interceptions/{interception_id}", tags=["aibridge"])
async def get_interception(
    interception_id: Annotated[str, Path(max_length=36)], actor: ActorDep, services: ServicesDep
) -> types.AibridgeInterception:
    """One record (someone else's is not found unless you may read everyone's)."""
    return await services.aibridge.get_record(actor, interception_id)
