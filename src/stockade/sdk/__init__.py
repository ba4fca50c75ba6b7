"""The typed Python client for the Stockade API, used by the CLI, the tests
and scripts."""

from stockade.sdk.client import ApiError, Client, ConnectionFailed

__all__ = ["ApiError", "Client", "ConnectionFailed"]
