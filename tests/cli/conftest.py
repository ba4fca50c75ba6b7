"""CLI tests run against a server on SQLite only: the CLI sees the API, not
the database, and every API behaviour is tested on both databases under
tests/server (this halves the slowest part of the suite: CLI subprocesses).
The PostgreSQL variants are deselected, not skipped: they are not tests."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep: list[pytest.Item] = []
    dropped: list[pytest.Item] = []
    for item in items:
        callspec = getattr(item, "callspec", None)
        in_cli = HERE in Path(str(item.path)).parents
        if in_cli and callspec is not None and callspec.params.get("backend") == "postgres":
            dropped.append(item)
        else:
            keep.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = keep
