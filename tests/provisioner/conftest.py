"""Fixtures for backend tests: workspace specs and a progress recorder."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import pytest

from stockade.provisioner.backends.base import WorkspaceSpec
from stockade.sdk.templates import Manifest, resolve_compute

SpecFactory = Callable[..., WorkspaceSpec]


class RecordedProgress:
    """A ``Progress`` that keeps what it was told."""

    def __init__(self) -> None:
        self.stages: list[str] = []
        self.lines: list[tuple[str, str]] = []

    async def stage(self, name: str) -> None:
        self.stages.append(name)

    async def log(self, line: str, *, level: Literal["info", "warn", "error"] = "info") -> None:
        self.lines.append((level, line))

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


@pytest.fixture
def progress() -> RecordedProgress:
    return RecordedProgress()


@pytest.fixture
def make_spec(tmp_path: Path) -> SpecFactory:
    """A spec for a new workspace; keyword arguments override manifest fields
    (``backend``, ``compute``, ``agent``...) or spec fields (``workspace_id``...)."""
    deployment_id = uuid.uuid4().hex

    def factory(**overrides: Any) -> WorkspaceSpec:
        spec_fields = {f for f in WorkspaceSpec.__dataclass_fields__ if f != "manifest"}
        spec_overrides = {k: overrides.pop(k) for k in list(overrides) if k in spec_fields}
        manifest = Manifest.model_validate({"name": "test", "backend": "local", **overrides})
        parameters = spec_overrides.pop("parameters", {})
        files = tmp_path / "template"
        files.mkdir(exist_ok=True)
        fields: dict[str, Any] = {
            "workspace_id": str(uuid.uuid4()),
            "workspace_name": "ws",
            "owner_id": str(uuid.uuid4()),
            "owner_username": "alice",
            "deployment_id": deployment_id,
            "build_id": str(uuid.uuid4()),
            "build_number": 1,
            "template_name": manifest.name,
            "template_version": 1,
            "manifest": manifest,
            "parameters": parameters,
            "compute": resolve_compute(manifest.compute, parameters),
            "files_dir": files,
            "access_url": "http://127.0.0.1:7080",
            "env": {},
        }
        fields.update(spec_overrides)
        return WorkspaceSpec(**fields)

    return factory
