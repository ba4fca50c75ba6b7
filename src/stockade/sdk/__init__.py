"""The typed Python client for the Stockade API, used by the CLI, the tests
and scripts.

``stockade.sdk.types`` (the API's models) is shared with the server, which
must not pay for importing the HTTP client: the client loads on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stockade.sdk.client import ApiError, Client, ConnectionFailed

__all__ = ["ApiError", "Client", "ConnectionFailed"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from stockade.sdk import client

        return getattr(client, name)
    raise AttributeError(f"module 'stockade.sdk' has no attribute {name!r}")
