"""What a template's Terraform configuration declares, read without running
the CLI: the names of its root module's variables, so that a build passes
values for those only (Terraform warns about values for undeclared
variables given in a file)."""

from __future__ import annotations

import json
from pathlib import Path

import hcl2
from lark.exceptions import LarkError


class ConfigError(ValueError):
    """A ``.tf`` or ``.tf.json`` file of the root module cannot be read."""


def declared_variables(directory: Path) -> set[str]:
    """The variables declared in the root module (the ``*.tf`` and
    ``*.tf.json`` files directly in ``directory``; modules have their own)."""
    names: set[str] = set()
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            continue
        if path.name.endswith(".tf.json"):
            try:
                data = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{path.name}: not valid JSON ({exc})") from exc
            blocks = data.get("variable", {}) if isinstance(data, dict) else {}
            if isinstance(blocks, dict):
                names.update(blocks)
            continue
        if not path.name.endswith(".tf"):
            continue
        try:
            parsed = hcl2.loads(path.read_text())
        except (LarkError, UnicodeDecodeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"{path.name}: not valid HCL ({first})") from exc
        for block in parsed.get("variable", []):
            names.update(name.strip('"') for name in block)
    return names
