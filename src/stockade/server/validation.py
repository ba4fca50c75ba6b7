"""Turn pydantic's validation errors into one sentence a person can act on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stockade.sdk.types import USERNAME_HELP

# What a field must look like, for errors where pydantic would print a regex.
_FIELD_HINTS = {
    "username": f"username must be {USERNAME_HELP}",
    "email": "email must be an address like name@example.com",
    "name": "name must start with a letter or digit and use only letters, digits, '.', '_', '-'",
}


def _location(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body",)]
    return ".".join(parts) or "body"


def describe_validation_errors(
    errors: Sequence[Any],
) -> tuple[str, list[dict[str, Any]]]:
    detail: list[dict[str, Any]] = []
    sentences: list[str] = []
    for err in errors:
        where = _location(err.get("loc", ()))
        kind = err.get("type", "")
        field = where.rsplit(".", 1)[-1]
        if kind == "json_invalid":
            text = "the request body is not valid JSON"
        elif where == "body" and kind in ("model_attributes_type", "dict_type", "model_type"):
            text = "the request body must be a JSON object sent with Content-Type: application/json"
        elif kind == "missing":
            text = f"{where} is required"
        elif kind == "extra_forbidden":
            text = f"{where} is not a known field"
        elif kind == "string_pattern_mismatch" and field in _FIELD_HINTS:
            text = _FIELD_HINTS[field]
        else:
            text = f"{where}: {err.get('msg', 'invalid value')}"
        sentences.append(text)
        detail.append({"field": where, "message": text, "type": kind})
    return "invalid request: " + "; ".join(sentences), detail
