"""CLI tests run against a server on SQLite only: the CLI sees the API, not
the database, and every API behaviour is tested on both databases under
tests/server (this halves the slowest part of the suite: CLI subprocesses)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def backend() -> str:
    return "sqlite"
