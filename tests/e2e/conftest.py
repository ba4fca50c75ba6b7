"""Fixtures for end-to-end tests in an isolated network (see isolation.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import require
from tests.e2e.isolation import IsolatedNetwork, isolated_network, missing_tools

# The Debian package of each tool the tests run.
PACKAGES = {"ip": "iproute2", "tcpdump": "tcpdump", "curl": "curl", "docker": "docker.io",
            "dockerd": "docker.io", "nsenter": "util-linux"}  # fmt: skip


def require_tools(*tools: str) -> None:
    """Fail in CI, skip elsewhere, when a tool is missing."""
    for tool in missing_tools(*tools):
        require(f"`{tool}`", False, f"apt-get install {PACKAGES[tool]}")


@pytest.fixture(scope="session")
def isolated() -> Iterator[IsolatedNetwork]:
    """stk-iso and stk-sink, for the whole session (deleted at its end)."""
    require("root", os.geteuid() == 0, "network namespaces need root: run the tests as root")
    require_tools("ip", "tcpdump", "curl")
    with isolated_network() as network:
        yield network
