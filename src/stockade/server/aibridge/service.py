"""The AI bridge: governed access to the site's internal model servers.

Callers (users with their session or API token, workspaces with the key
their agent hands their sessions) speak the OpenAI or Anthropic API to the
bridge; the bridge checks who may use which model and how much, swaps the
caller's credential for the upstream's key, passes the answer through
(streams chunk by chunk), and records what was asked, which tools the model
called and how many tokens it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import Receive

from stockade.egress.guard import EgressDenied
from stockade.sdk import types
from stockade.server.aibridge.providers import (
    PROVIDERS,
    Observation,
    Provider,
    SSEDecoder,
    clip_prompt,
    storable,
)
from stockade.server.audit.service import append as append_audit
from stockade.server.auth import keys
from stockade.server.auth.ratelimit import SlidingWindow
from stockade.server.authz import Actor, Perm, can
from stockade.server.db import Database
from stockade.server.db.models import (
    AibridgeInterception,
    ApiKey,
    Group,
    Workspace,
    WorkspaceAgent,
    utcnow,
)
from stockade.server.errors import NotFound
from stockade.server.observability import get_logger
from stockade.server.orgs.access import standing
from stockade.server.secretbox import SecretBox
from stockade.server.settings import Settings, read_ca_bundle

log = get_logger("stockade.aibridge")

# A workspace's bridge key lives as long as its agent (revoked with it); this
# only bounds a key whose agent was never revoked.
WORKSPACE_KEY_LIFETIME = timedelta(days=365)
# Response headers of the upstream worth passing on to the client.
_PASSED_HEADERS = ("content-type", "retry-after", "openai-processing-ms")
_PASSED_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
# Endpoints that generate (and so count against the limits and get recorded).
MODEL_ENDPOINTS = frozenset({"chat.completions", "responses", "messages"})


class BridgeError(Exception):
    """A refusal or failure the caller gets in its provider's error format.

    ``message`` is for the caller, ``log_message`` for the server log,
    ``reason`` a short label for metrics and records."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        reason: str,
        log_message: str | None = None,
        headers: dict[str, str] | None = None,
        outcome: str = "refused",
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason
        self.log_message = log_message or message
        self.headers = headers or {}
        self.outcome = outcome


class ClientGone(Exception):
    """The caller disconnected before the answer was complete."""


@dataclass
class Upstream:
    """One configured model server."""

    provider: Provider
    base_url: str
    key: str | None
    models: list[str]  # shell patterns; empty: any
    client: httpx.AsyncClient

    def allows(self, model: str) -> bool:
        return not self.models or any(fnmatch.fnmatchcase(model, p) for p in self.models)


@dataclass
class Call:
    """One request through the bridge, filled in as it goes; becomes a record."""

    actor: Actor
    provider: str
    endpoint: str
    model: str
    streamed: bool
    prompt: str | None
    request_id: str | None
    ip: str | None = None
    user_agent: str | None = None
    started: float = field(default_factory=time.perf_counter)
    first_byte: float | None = None
    observation: Observation = field(default_factory=Observation)
    status: int = 200
    outcome: str = "completed"
    error: str | None = None

    def fail(self, error: BridgeError) -> None:
        self.status, self.outcome, self.error = error.status, error.outcome, error.message


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone (the request body was read before)."""
    while (await receive())["type"] != "http.disconnect":
        pass


T = TypeVar("T")


async def race_disconnect(work: Awaitable[T], receive: Receive) -> T:
    """``work``'s result, or ``ClientGone`` (with ``work`` cancelled) when the
    client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # cancelled from outside (the server stopping): pass it on
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientGone
    return task.result()


def _seconds_to_midnight(now: datetime) -> int:
    tomorrow = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return max(1, int((tomorrow - now).total_seconds()))


class AibridgeService:
    def __init__(self, db: Database, settings: Settings, audit_key: bytes) -> None:
        self.db = db
        self.settings = settings
        self.audit_key = audit_key
        self.secrets = SecretBox(audit_key)
        self.per_minute = SlidingWindow(settings.aibridge_requests_per_minute, 60)
        self.group_models: dict[str, list[str]] = (
            json.loads(settings.aibridge_group_models) if settings.aibridge_group_models else {}
        )
        verify: ssl.SSLContext | bool = True
        if settings.aibridge_ca_file is not None:
            verify = ssl.create_default_context()
            verify.load_verify_locations(cadata=read_ca_bundle(settings.aibridge_ca_file))
        self.upstreams: dict[str, Upstream] = {}
        for name, provider in PROVIDERS.items():
            base_url: str = getattr(settings, f"aibridge_{name}_base_url")
            if not base_url:
                continue
            key = getattr(settings, f"aibridge_{name}_key")
            models: str = getattr(settings, f"aibridge_{name}_models")
            self.upstreams[name] = Upstream(
                provider=provider,
                base_url=base_url,
                key=key.get_secret_value() if key is not None else None,
                models=[m for m in models.split(",") if m],
                client=httpx.AsyncClient(
                    timeout=httpx.Timeout(settings.aibridge_timeout_seconds, connect=10.0),
                    verify=verify,
                    # Never the environment's proxies: the bridge talks to the
                    # configured server and nothing else.
                    trust_env=False,
                    limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
                ),
            )
        self._writes: set[asyncio.Task[None]] = set()

    @property
    def enabled(self) -> bool:
        return bool(self.upstreams)

    async def close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        for upstream in self.upstreams.values():
            await upstream.client.aclose()

    # --- checks ------------------------------------------------------------------

    def upstream(self, provider: str) -> Upstream:
        upstream = self.upstreams.get(provider)
        if upstream is None:
            label = PROVIDERS[provider].label
            raise BridgeError(
                404,
                f"the {label} AI bridge is not configured on this server; an administrator "
                f"sets aibridge_{provider}_base_url to turn it on",
                reason="aibridge_not_configured",
            )
        return upstream

    async def _user_models(self, actor: Actor) -> list[str] | None:
        """The model patterns the actor's groups allow (None: no group policy)."""
        if not self.group_models:
            return None
        async with self.db.session() as session:
            mine = await standing(session, actor)
            names = (
                await session.execute(select(Group.name).where(Group.id.in_(mine.group_ids)))
            ).scalars()
            return [p for name in set(names) for p in self.group_models.get(name, [])]

    async def check_model(self, actor: Actor, upstream: Upstream, model: str) -> None:
        if not upstream.allows(model):
            raise BridgeError(
                403,
                f"the model {model!r} is not offered through this bridge; it offers "
                f"{', '.join(upstream.models)}",
                reason="aibridge_model_not_allowed",
            )
        patterns = await self._user_models(actor)
        if patterns is not None and not any(fnmatch.fnmatchcase(model, p) for p in patterns):
            raise BridgeError(
                403,
                f"none of your groups may use the model {model!r}; ask an administrator "
                "(aibridge_group_models)",
                reason="aibridge_model_not_allowed_for_group",
            )

    async def check_limits(self, actor: Actor) -> None:
        if self.settings.aibridge_requests_per_minute:
            wait = self.per_minute.retry_after(actor.user_id)
            if wait:
                raise BridgeError(
                    429,
                    f"you have sent {self.settings.aibridge_requests_per_minute} requests "
                    f"through the AI bridge in the last minute, the limit; retry in {wait} s",
                    reason="aibridge_rate_limited",
                    headers={"retry-after": str(wait)},
                )
            self.per_minute.hit(actor.user_id)
        daily = self.settings.aibridge_tokens_per_day
        if daily:
            now = utcnow()
            since = now.replace(hour=0, minute=0, second=0, microsecond=0)
            used = await self.tokens_used(actor.user_id, since)
            if used >= daily:
                wait = _seconds_to_midnight(now)
                raise BridgeError(
                    429,
                    f"you have used {used} of your {daily} AI bridge tokens for today (UTC); "
                    f"the allowance renews at midnight UTC, in {wait // 3600} h "
                    f"{wait % 3600 // 60} min",
                    reason="aibridge_token_budget",
                    headers={"retry-after": str(wait)},
                )

    async def tokens_used(self, user_id: str, since: datetime) -> int:
        total = func.coalesce(
            func.sum(AibridgeInterception.input_tokens + AibridgeInterception.output_tokens), 0
        )
        async with self.db.read() as conn:
            used = (
                await conn.execute(
                    select(total).where(
                        AibridgeInterception.user_id == user_id,
                        AibridgeInterception.created_at >= since,
                    )
                )
            ).scalar_one()
        return int(used)

    async def allowed_models(self, actor: Actor, upstream: Upstream) -> Callable[[str], bool]:
        """Whether the actor may use a model (for filtering model lists)."""
        patterns = await self._user_models(actor)
        return lambda model: (
            upstream.allows(model)
            and (patterns is None or any(fnmatch.fnmatchcase(model, p) for p in patterns))
        )

    # --- talking to the upstream ---------------------------------------------------

    def upstream_request(
        self, upstream: Upstream, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> httpx.Request:
        sent = {k: v for k, v in headers.items() if k in upstream.provider.forwarded_headers}
        # Uncompressed, so that a stream passes through as the bytes arrive.
        sent["accept-encoding"] = "identity"
        if upstream.key:
            sent.update(upstream.provider.auth_headers(upstream.key))
        url = upstream.provider.upstream_url(upstream.base_url, path)
        return upstream.client.build_request(method, url, headers=sent, content=body or None)

    async def send(self, upstream: Upstream, request: httpx.Request) -> httpx.Response:
        """The upstream's response (its body not read yet), or a BridgeError
        that says in plain words what went wrong."""
        host = urlsplit(upstream.base_url).netloc
        label = upstream.provider.label
        try:
            return await upstream.client.send(request, stream=True)
        except EgressDenied as exc:
            raise BridgeError(
                502,
                f"the server's egress policy refuses to reach the {label} model server; "
                "an administrator must allow it",
                reason="aibridge_egress_denied",
                log_message=f"egress to {host} refused: {exc}",
                outcome="failed",
            ) from exc
        except httpx.TimeoutException as exc:
            raise BridgeError(
                504,
                f"the {label} model server did not answer within "
                f"{self.settings.aibridge_timeout_seconds} s",
                reason="aibridge_upstream_timeout",
                log_message=f"{host}: {type(exc).__name__}",
                outcome="failed",
            ) from exc
        except httpx.HTTPError as exc:
            raise BridgeError(
                502,
                f"the {label} model server cannot be reached; ask an administrator to check it",
                reason="aibridge_upstream_unreachable",
                log_message=f"{host}: {type(exc).__name__}: {exc}",
                outcome="failed",
            ) from exc

    def upstream_error(self, upstream: Upstream, status: int, raw: bytes) -> tuple[int, bytes]:
        """What the caller gets for an upstream's error answer: its own error
        when it is in the provider's format, else one written for it. The
        upstream refusing the bridge's own key is the site's problem, not the
        caller's: that becomes a 502."""
        provider = upstream.provider
        label = provider.label
        if status in (401, 403):
            message = (
                f"the {label} model server refused the bridge's credentials; ask an "
                f"administrator to check aibridge_{provider.name}_key"
            )
            return 502, json.dumps(provider.error_body(502, message)).encode()
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        if provider.is_error_body(parsed):
            return status, raw
        snippet = raw[:300].decode("utf-8", errors="replace").strip()
        if isinstance(parsed, dict):  # vLLM and others: {"message": ...} or {"detail": ...}
            detail = parsed.get("message") or parsed.get("detail") or parsed.get("error")
            snippet = str(detail)[:300] if detail else snippet
        message = f"the {label} model server answered {status}" + (
            f": {snippet}" if snippet else ""
        )
        return status, json.dumps(provider.error_body(status, message)).encode()

    @staticmethod
    def passed_headers(response: httpx.Response) -> dict[str, str]:
        return {
            k: v
            for k, v in response.headers.items()
            if k in _PASSED_HEADERS or k.startswith(_PASSED_PREFIXES)
        }

    async def relay_stream(
        self, call: Call, upstream: Upstream, response: httpx.Response
    ) -> AsyncGenerator[bytes, None]:
        """The upstream's stream, chunk by chunk as it arrives, read on the way
        for usage and tool calls. A failure after the stream began ends it with
        an error event in the provider's format."""
        decoder = SSEDecoder()
        observer = upstream.provider.stream_observer(call.endpoint)
        try:
            async for chunk in response.aiter_raw():
                if call.first_byte is None:
                    call.first_byte = time.perf_counter()
                for name, data in decoder.feed(chunk):
                    if data == "[DONE]":
                        continue
                    try:
                        observer.event(name, json.loads(data))
                    except ValueError:
                        continue
                yield chunk
        except httpx.HTTPError as exc:
            call.outcome, call.status = "failed", 502
            call.error = f"the stream from the {upstream.provider.label} model server broke off"
            log.warning("aibridge_stream_failed", error=f"{type(exc).__name__}: {exc}")
            yield upstream.provider.stream_error_event(call.error)
        finally:
            call.observation = observer.finish()
            if call.observation.error and call.outcome == "completed":
                call.outcome, call.error = "upstream_error", call.observation.error

    # --- records ------------------------------------------------------------------

    async def record(self, call: Call) -> None:
        """Write the call's record, and its entry in the tamper-evident audit
        log (which names it, without the prompt), in one transaction. Never
        raises: a lost record is logged."""
        usage = call.observation.usage
        ended = time.perf_counter()
        try:
            async with self.db.transaction() as session:
                workspace_name = None
                if call.actor.workspace_id:
                    workspace_name = (
                        await session.execute(
                            select(Workspace.name).where(Workspace.id == call.actor.workspace_id)
                        )
                    ).scalar_one_or_none()
                row = AibridgeInterception(
                    user_id=call.actor.user_id,
                    username=call.actor.username,
                    workspace_id=call.actor.workspace_id or None,
                    workspace_name=workspace_name,
                    provider=call.provider,
                    endpoint=call.endpoint,
                    model=storable(call.model[:255]),
                    streamed=call.streamed,
                    prompt=clip_prompt(call.prompt),
                    tool_calls=call.observation.tool_calls,
                    input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens,
                    cache_read_tokens=usage.cache_read_tokens,
                    cache_write_tokens=usage.cache_write_tokens,
                    status=call.status,
                    outcome=call.outcome,
                    error=storable(call.error) if call.error else None,
                    latency_ms=round((ended - call.started) * 1000),
                    first_byte_ms=(
                        round((call.first_byte - call.started) * 1000)
                        if call.first_byte is not None
                        else None
                    ),
                    request_id=call.request_id,
                )
                session.add(row)
                await session.flush()
                await append_audit(
                    session,
                    key=self.audit_key,
                    action="aibridge.request",
                    status_code=call.status,
                    user_id=call.actor.user_id,
                    username=call.actor.username,
                    ip=call.ip,
                    user_agent=call.user_agent,
                    resource_type="aibridge_interception",
                    resource_id=row.id,
                    resource_name=storable(call.model[:255]),
                    details={
                        "provider": call.provider,
                        "endpoint": call.endpoint,
                        "workspace": workspace_name,
                        "outcome": call.outcome,
                        "input_tokens": usage.input_tokens,
                        "output_tokens": usage.output_tokens,
                        "tool_calls": [c["name"] for c in call.observation.tool_calls],
                    },
                    request_id=call.request_id,
                )
        except Exception:
            log.exception("aibridge_record_failed", provider=call.provider, model=call.model)
            return
        log.info(
            "aibridge_request",
            provider=call.provider,
            endpoint=call.endpoint,
            model=call.model,
            outcome=call.outcome,
            status=call.status,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
        )

    def record_later(self, call: Call) -> None:
        """Write the record in a task of its own: for a request being
        cancelled, whose own task may not await anything more."""
        task = asyncio.get_running_loop().create_task(self.record(call))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    def _visible(self, actor: Actor, query: Any) -> Any:
        if can(actor, Perm.AIBRIDGE_READ):
            return query
        return query.where(AibridgeInterception.user_id == actor.user_id)

    def _filtered(self, actor: Actor, filters: types.AibridgeFilter) -> Any:
        query = self._visible(actor, select(AibridgeInterception))
        if filters.user:
            query = query.where(AibridgeInterception.username == filters.user.lower())
        if filters.workspace:
            query = query.where(AibridgeInterception.workspace_name == filters.workspace)
        if filters.provider:
            query = query.where(AibridgeInterception.provider == filters.provider)
        if filters.model:
            query = query.where(AibridgeInterception.model == filters.model)
        if filters.since:
            query = query.where(AibridgeInterception.created_at >= filters.since)
        if filters.until:
            query = query.where(AibridgeInterception.created_at < filters.until)
        return query

    async def list_records(
        self, actor: Actor, filters: types.AibridgeFilter, *, limit: int, offset: int
    ) -> types.AibridgeInterceptionList:
        query = self._filtered(actor, filters)
        async with self.db.session() as session:
            count = (
                await session.execute(select(func.count()).select_from(query.subquery()))
            ).scalar_one()
            rows = (
                await session.execute(
                    query.order_by(AibridgeInterception.created_at.desc(), AibridgeInterception.id)
                    .limit(limit)
                    .offset(offset)
                )
            ).scalars()
            items = [_view(row) for row in rows]
        return types.AibridgeInterceptionList(items=items, count=count)

    async def get_record(self, actor: Actor, interception_id: str) -> types.AibridgeInterception:
        query = self._visible(
            actor, select(AibridgeInterception).where(AibridgeInterception.id == interception_id)
        )
        async with self.db.session() as session:
            row = (await session.execute(query)).scalar_one_or_none()
            if row is None:
                raise NotFound("AI bridge record not found", reason="aibridge_record_not_found")
            return _view(row)

    async def export_records(
        self, actor: Actor, filters: types.AibridgeFilter
    ) -> AsyncIterator[bytes]:
        """Every matching record, oldest first, one JSON document per line."""
        query = self._filtered(actor, filters).order_by(
            AibridgeInterception.created_at, AibridgeInterception.id
        )
        page, offset = 500, 0
        while True:
            async with self.db.session() as session:
                rows = list((await session.execute(query.limit(page).offset(offset))).scalars())
                lines = [_view(row).model_dump_json() + "\n" for row in rows]
            yield "".join(lines).encode()
            if len(rows) < page:
                return
            offset += page

    async def purge(self) -> None:
        days = self.settings.aibridge_retention_days
        if not days:
            return
        cutoff = utcnow() - timedelta(days=days)
        async with self.db.transaction() as session:
            result = await session.execute(
                delete(AibridgeInterception).where(AibridgeInterception.created_at < cutoff)
            )
        removed = getattr(result, "rowcount", 0) or 0
        if removed:
            log.info("aibridge_records_purged", count=removed, older_than_days=days)

    # --- workspaces ---------------------------------------------------------------

    async def session_env(self, session: AsyncSession, agent: WorkspaceAgent) -> dict[str, str]:
        """The variables a workspace's sessions get so that stock OpenAI and
        Anthropic clients (and the coding agents built on them) use the bridge:
        base URLs and a key good only for the bridge, made once per agent
        (inside the caller's transaction) and revoked with it."""
        if not self.enabled:
            return {}
        token = None
        if agent.encrypted_aibridge_token:
            token = self.secrets.decrypt(agent.encrypted_aibridge_token, context=agent.id)
            parts = keys.split(token)
            key = await session.get(ApiKey, parts[0]) if parts else None
            if key is None or key.expires_at <= utcnow():
                token = None
        if token is None:
            owner_id = (
                await session.execute(
                    select(Workspace.owner_id).where(Workspace.id == agent.workspace_id)
                )
            ).scalar_one()
            key_id, token, hashed = keys.generate()
            now = utcnow()
            session.add(
                ApiKey(
                    id=key_id,
                    hashed_secret=hashed,
                    user_id=owner_id,
                    login_type=keys.AIBRIDGE_LOGIN_TYPE,
                    lifetime_seconds=int(WORKSPACE_KEY_LIFETIME.total_seconds()),
                    created_at=now,
                    expires_at=now + WORKSPACE_KEY_LIFETIME,
                    workspace_id=agent.workspace_id,
                )
            )
            agent.encrypted_aibridge_token = self.secrets.encrypt(token, context=agent.id)
        base = (self.settings.agent_url or self.settings.access_url).rstrip("/")
        env: dict[str, str] = {}
        if "openai" in self.upstreams:
            env["OPENAI_BASE_URL"] = f"{base}/api/v2/aibridge/openai/v1"
            env["OPENAI_API_KEY"] = token
        if "anthropic" in self.upstreams:
            env["ANTHROPIC_BASE_URL"] = f"{base}/api/v2/aibridge/anthropic"
            env["ANTHROPIC_API_KEY"] = token
        return env


def _view(row: AibridgeInterception) -> types.AibridgeInterception:
    return types.AibridgeInterception(
        id=row.id,
        created_at=row.created_at,
        user_id=row.user_id,
        username=row.username,
        workspace_id=row.workspace_id,
        workspace_name=row.workspace_name,
        provider=row.provider,
        endpoint=row.endpoint,
        model=row.model,
        streamed=row.streamed,
        prompt=row.prompt,
        tool_calls=[types.AibridgeToolCall(**c) for c in row.tool_calls or []],
        input_tokens=row.input_tokens,
        output_tokens=row.output_tokens,
        cache_read_tokens=row.cache_read_tokens,
        cache_write_tokens=row.cache_write_tokens,
        status=row.status,
        outcome=row.outcome,
        error=row.error,
        latency_ms=row.latency_ms,
        first_byte_ms=row.first_byte_ms,
    )
