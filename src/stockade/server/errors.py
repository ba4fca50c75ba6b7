"""Typed errors. Each carries what the user is told, what the log says, and a
short reason usable as a metrics label; the HTTP layer turns them into JSON."""

from __future__ import annotations

from typing import Any


class StockadeError(Exception):
    """Base of every error the API reports on purpose.

    ``message`` is shown to the user and must be actionable; ``log_message`` may
    hold detail that must not reach the client; ``reason`` is a low-cardinality
    label such as ``user_not_found``.
    """

    status_code = 400
    default_reason = "bad_request"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        log_message: str | None = None,
        detail: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.log_message = log_message or message
        self.detail = detail
        self.headers = headers or {}


class InvalidInput(StockadeError):
    status_code = 400
    default_reason = "invalid_input"


class Unauthenticated(StockadeError):
    status_code = 401
    default_reason = "unauthenticated"


class Forbidden(StockadeError):
    status_code = 403
    default_reason = "forbidden"


class NotFound(StockadeError):
    status_code = 404
    default_reason = "not_found"


class Conflict(StockadeError):
    status_code = 409
    default_reason = "conflict"


class PayloadTooLarge(StockadeError):
    status_code = 413
    default_reason = "payload_too_large"


class TooManyRequests(StockadeError):
    status_code = 429
    default_reason = "rate_limited"

    def __init__(self, message: str, *, retry_after: int, reason: str | None = None) -> None:
        super().__init__(message, reason=reason, headers={"Retry-After": str(retry_after)})
        self.retry_after = retry_after
