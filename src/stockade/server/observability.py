"""Structured logs (JSON lines with a request id) and Prometheus metrics."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import stockade

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}  # fmt: skip


def get_logger(name: str) -> Any:
    """A structlog logger that names its source in the ``logger`` field."""
    return structlog.get_logger(logger_name=name)


def _name_field(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    # "logger" cannot be an initial value (structlog's own parameter name), so
    # it is bound as "logger_name" and renamed here to match the stdlib lines.
    if "logger_name" in event:
        event["logger"] = event.pop("logger_name")
    return event


def configure_logging(level: str = "info", json_lines: bool = True) -> None:
    """One format for everything on stderr. Our own logs go straight from
    structlog to the stream (the access log runs on every request, and the
    standard library's handler machinery costs several times more); the
    standard library's (uvicorn, SQLAlchemy, Alembic) pass through a
    ProcessorFormatter with the same renderer. ``request_id`` comes from
    contextvars bound per request."""
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
    )
    timestamper = structlog.processors.TimeStamper(fmt="iso", utc=True)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _name_field,
            timestamper,
            structlog.processors.format_exc_info,
            renderer,
        ],
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            timestamper,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs requests
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


class Metrics:
    """The server's metrics, on a registry of its own (several apps may live in
    one test process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "stockade_http_requests_total",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "stockade_http_request_duration_seconds",
            "HTTP request latency by method and route template.",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.errors = Counter(
            "stockade_api_errors_total",
            "API errors by reason.",
            ["reason"],
            registry=self.registry,
        )
        self.db_pool_size = Gauge(
            "stockade_db_pool_size", "Database connection pool size.", registry=self.registry
        )
        self.db_pool_checked_out = Gauge(
            "stockade_db_pool_checked_out",
            "Database connections in use.",
            registry=self.registry,
        )
        self.build_info = Gauge(
            "stockade_build_info",
            "Build information (always 1).",
            ["version", "python"],
            registry=self.registry,
        )
        self.build_info.labels(stockade.__version__, ".".join(map(str, sys.version_info[:3]))).set(
            1
        )
