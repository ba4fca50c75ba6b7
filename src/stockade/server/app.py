"""Assemble the control plane: services, routers, middleware, error handlers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import IntegrityError
from starlette.exceptions import HTTPException

import stockade
from stockade.sdk import types
from stockade.server.agents import api as agents_api
from stockade.server.aibridge import api as aibridge_api
from stockade.server.apps import api as apps_api
from stockade.server.audit import api as audit_api
from stockade.server.audit import service as audit_service
from stockade.server.auth import api as auth_api
from stockade.server.authz import check_routes
from stockade.server.connections import api as connections_api
from stockade.server.db import migrate
from stockade.server.egress import api as egress_api
from stockade.server.errors import StockadeError
from stockade.server.middleware import RequestMiddleware
from stockade.server.observability import get_logger
from stockade.server.oidc import api as oidc_api
from stockade.server.orgs import api as orgs_api
from stockade.server.provisioning import api as provisioning_api
from stockade.server.services import Services, build_services
from stockade.server.settings import Settings
from stockade.server.system import api as system_api
from stockade.server.templates import api as templates_api
from stockade.server.users import api as users_api
from stockade.server.validation import describe_validation_errors
from stockade.server.web import account as web_account
from stockade.server.web import admin as web_admin
from stockade.server.web import cli_auth as web_cli_auth
from stockade.server.web import templates_pages as web_templates
from stockade.server.web import terminal as web_terminal
from stockade.server.web import workspaces as web_workspaces
from stockade.server.web.core import (
    STATIC_DIR,
    STATIC_PREFIX,
    LoginRequired,
    error_page,
    login_redirect,
)
from stockade.server.workspaces import api as workspaces_api

log = get_logger("stockade.server")

# How often the counts of the process's egress guard go to the database.
EGRESS_FLUSH_SECONDS = 5.0


def _is_page(request: Request) -> bool:
    """Dashboard pages answer errors in HTML; the API (and anything under
    it, such as a missing route) in JSON."""
    path = request.url.path
    return not path.startswith("/api/") and not path.startswith(STATIC_PREFIX + "/")


def _error_response(
    request: Request, status: int, message: str, reason: str, **extra: Any
) -> Response:
    if _is_page(request):
        response = error_page(request, status, message, reason)
        response.headers.update(extra.get("headers") or {})
        return response
    # The AI bridge's provider routes answer in the provider's error format,
    # which the official clients read.
    provider_error = aibridge_api.error_body(request.url.path, status, message, reason)
    if provider_error is not None:
        return JSONResponse(provider_error, status_code=status, headers=extra.get("headers"))
    body = types.ApiError(
        message=message,
        reason=reason,
        detail=extra.pop("detail", None),
        request_id=getattr(request.state, "request_id", None),
    )
    return JSONResponse(
        body.model_dump(exclude_none=True), status_code=status, headers=extra.get("headers")
    )


def _install_error_handlers(app: FastAPI, services: Services) -> None:
    @app.exception_handler(StockadeError)
    async def _stockade_error(request: Request, exc: StockadeError) -> Response:
        services.metrics.errors.labels(exc.reason).inc()
        log.info("api_error", reason=exc.reason, status=exc.status_code, detail=exc.log_message)
        return _error_response(
            request, exc.status_code, exc.message, exc.reason,
            detail=exc.detail, headers=exc.headers,
        )  # fmt: skip

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        message, detail = describe_validation_errors(exc.errors())
        services.metrics.errors.labels("invalid_input").inc()
        return _error_response(request, 400, message, "invalid_input", detail=detail)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> Response:
        if isinstance(exc.__cause__, StockadeError):  # raised while FastAPI read the body
            return await _stockade_error(request, exc.__cause__)
        if _is_page(request) and exc.status_code == 404:
            return _error_response(request, 404, "There is no page at this address.", "http_404")
        messages = {
            404: f"no API route {request.url.path}; see /api/v2/openapi.json",
            405: f"{request.method} is not allowed on {request.url.path}",
            400: "the request body could not be read; send JSON with "
            "Content-Type: application/json",
        }
        message = messages.get(exc.status_code, str(exc.detail))
        return _error_response(
            request, exc.status_code, message, f"http_{exc.status_code}",
            headers=dict(exc.headers or {}),
        )  # fmt: skip

    @app.exception_handler(LoginRequired)
    async def _login_required(request: Request, exc: LoginRequired) -> Response:
        return login_redirect(exc)

    @app.exception_handler(IntegrityError)
    async def _integrity(request: Request, exc: IntegrityError) -> Response:
        # Checks in the services come first; this catches a race between two
        # requests, which the database settled.
        log.info("integrity_conflict", error=str(exc.orig))
        services.metrics.errors.labels("conflict").inc()
        return _error_response(
            request, 409, "this conflicts with a change made at the same time; retry", "conflict"
        )


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    services = services or build_services(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await migrate.upgrade(services.db)
        if settings.audit_retention_days:
            days = settings.audit_retention_days

            async def purge() -> None:
                await audit_service.purge(services.db, key=services.audit_key, older_than_days=days)

            services.background.every("audit_retention", 3600, purge)
        if settings.aibridge_retention_days:
            services.background.every("aibridge_retention", 3600, services.aibridge.purge)
        if services.relay is not None:
            services.relay.start()
        await services.replicas.register()
        if services.db.dialect == "postgresql":
            # The embedded database has one server by construction: nothing
            # to renew or drop there, and no write every few seconds.
            services.background.every(
                "replica_heartbeat", settings.replica_heartbeat_seconds, services.replicas.heartbeat
            )
        await services.provisioner.start()
        services.background.every(
            "build_reaper", max(1.0, settings.job_lease_seconds / 3), services.provisioner.reap
        )
        services.background.every(
            "reconciler", settings.reconcile_interval_seconds, services.provisioner.reconcile
        )
        services.background.every("egress_report", EGRESS_FLUSH_SECONDS, services.egress.flush)
        services.background.start()
        log.info(
            "server_ready",
            # GuardedLoop under `stockade server`: the egress guard sees its connects.
            loop=type(asyncio.get_running_loop()).__name__,
            access_url=settings.access_url,
            database=services.db.dialect,
            version=stockade.__version__,
        )
        try:
            yield
        finally:
            await services.background.stop()
            await services.provisioner.stop()
            try:
                await services.replicas.unregister()
            except Exception as exc:  # the others drop it after three heartbeats
                log.warning("replica_unregister_failed", error=str(exc))
            if services.relay is not None:
                await services.relay.stop()
            await services.oidc.close()
            await services.aibridge.close()
            try:
                await services.egress.flush()  # the last attempts counted
            except Exception as exc:  # a database gone at shutdown loses a few counts
                log.warning("egress_flush_failed", error=str(exc))
            await services.db.dispose()
            log.info("server_stopped")

    app = FastAPI(
        title="Stockade",
        version=stockade.__version__,
        description="Self-hosted, fully offline remote developer workspaces.",
        openapi_url="/api/v2/openapi.json",
        docs_url=None,  # the Swagger UI loads from a CDN: not in an air-gapped product
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.services = services
    # Routes are added as they are (each router carries its prefix and policy)
    # rather than through include_router, whose lazily merged routes would hide
    # them from the policy check below.
    for router in (
        oidc_api.router,  # before users_api: /users/authmethods is not /users/{user}
        users_api.router,
        auth_api.router,
        audit_api.router,
        system_api.router,
        egress_api.router,
        templates_api.router,
        orgs_api.router,
        workspaces_api.router,
        provisioning_api.router,
        agents_api.router,
        connections_api.router,
        apps_api.router,
        aibridge_api.router,
        web_account.router,
        web_workspaces.router,
        web_terminal.router,
        web_templates.router,
        web_admin.router,
        web_cli_auth.router,
    ):
        app.router.routes.extend(router.routes)
    app.mount(STATIC_PREFIX, StaticFiles(directory=STATIC_DIR), name="static")
    check_routes(app.routes)
    _install_error_handlers(app, services)
    app.add_middleware(RequestMiddleware, services=services)
    # Outermost: subdomain apps are chosen by Host before any API route.
    app.add_middleware(apps_api.AppProxyMiddleware, services=services)
    return app
