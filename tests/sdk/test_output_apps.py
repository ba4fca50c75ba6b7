"""Apps from a Terraform template's ``stockade_apps`` output: checked as the
manifest's own, with the entry named; a stored manifest (every compute field
written out as null) is not mistaken for one with compute settings."""

from __future__ import annotations

import json
from typing import Any

import pytest

from stockade.sdk.templates import Manifest, output_apps, parse_manifest, workspace_apps

MANIFEST = parse_manifest("name: tf\nbackend: terraform\napps:\n  - slug: editor\n    port: 8080\n")


def test_apps_from_outputs_join_the_manifests() -> None:
    # Terraform objects carry unset attributes as null.
    value = [{"slug": "files", "port": 8000, "url": None, "share": "owner", "subdomain": False}]
    (app,) = output_apps(MANIFEST, value)
    assert (app.slug, app.port, app.subdomain) == ("files", 8000, False)
    state = {"terraform": {"outputs": {"stockade_apps": value}}}
    assert [a.slug for a in workspace_apps(MANIFEST, state)] == ["editor", "files"]
    assert output_apps(MANIFEST, None) == []


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"slug": "x"}, "stockade_apps must be a list"),
        (
            [{"slug": "x", "port": 1, "url": "http://127.0.0.1:2"}],
            "stockade_apps[0]: give exactly one of port or url",
        ),
        (
            [{"slug": "editor", "port": 9000}],
            "stockade_apps[0]: the app slug 'editor' is already taken",
        ),
        (
            [{"slug": "a", "port": 1}, {"slug": "a", "port": 2}],
            "stockade_apps[1]: the app slug 'a'",
        ),
        ([{"slug": "Bad Slug", "port": 1}], "stockade_apps[0].slug:"),
        ([{"slug": "a", "port": 70000}], "stockade_apps[0].port:"),
    ],
)
def test_a_bad_entry_is_named(value: Any, message: str) -> None:
    with pytest.raises(
        ValueError, match="^" + message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
    ):
        output_apps(MANIFEST, value)
    # The workspace keeps the template's apps when its outputs are unusable.
    state = {"terraform": {"outputs": {"stockade_apps": value}}}
    assert [a.slug for a in workspace_apps(MANIFEST, state)] == ["editor"]


def test_a_stored_terraform_manifest_validates_again() -> None:
    stored = MANIFEST.model_dump()
    assert stored["compute"] == {
        "image": None,
        "cpu": None,
        "memory": None,
        "home_size": None,
        "gpus": None,
    }
    # JSON is YAML: the stored form parses as a manifest (compute all null is
    # no compute), and apps are checked against it.
    again = parse_manifest(json.dumps(stored))
    assert again == Manifest.model_validate(stored)
    assert output_apps(again, [{"slug": "files", "port": 8000}])[0].slug == "files"
