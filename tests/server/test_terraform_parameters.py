"""A terraform template's parameters come from its Terraform variables: the
server reads the pushed archive's top-level .tf files, stores the merged
manifest, validates workspace values against it, and answers a bad .tf file
with a 400 naming file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from stockade.sdk import ApiError, Client
from stockade.sdk.templates import build_archive
from tests.conftest import unique

# Parsing happens before anything reaches the database; the push and read
# paths are covered on both databases by test_templates.py.
SQLITE_ONLY = "the .tf files are read before the database is involved"

MANIFEST = """\
name: {name}
backend: terraform
"""

MAIN_TF = """\
variable "stockade_workspace_id" { type = string }
variable "stockade_start_count" { type = number }

variable "cpu" {
  description = "CPU cores."
  type        = number
  default     = 2
  validation {
    condition     = var.cpu >= 1 && var.cpu <= 8
    error_message = "1 to 8 cores."
  }
}

variable "region" {
  type = string
  validation {
    condition     = contains(["eu", "us"], var.region)
    error_message = "eu or us."
  }
}

resource "terraform_data" "workspace" {
  count = var.stockade_start_count
  input = "${var.stockade_workspace_id} ${var.cpu} ${var.region}"
}
"""

EXTRA_TF = """\
variable "dotfiles" {
  type    = list(string)
  default = []
}
"""


def write(directory: Path, name: str, main_tf: str = MAIN_TF) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "stockade.yaml").write_text(MANIFEST.format(name=name))
    (directory / "main.tf").write_text(main_tf)
    (directory / "z_extra.tf").write_text(EXTRA_TF)
    # A module's variables are its own, not the template's.
    (directory / "modules" / "net").mkdir(parents=True, exist_ok=True)
    (directory / "modules" / "net" / "variables.tf").write_text('variable "subnet" {}\n')
    return directory


def test_pushed_terraform_template_has_its_variables_as_parameters(
    owner: Client, tmp_path: Path
) -> None:
    name = unique("tfp")
    version = owner.push_template(name, build_archive(write(tmp_path / "tpl", name)))
    [stored] = owner.list_template_versions(name)
    assert stored.manifest == version.manifest
    assert stored.manifest["parameters"] == [
        {
            "name": "cpu",
            "type": "number",
            "display_name": "Cpu",
            "description": "CPU cores.",
            "default": 2,
            "options": None,
            "validation": {"regex": None, "min": 1, "max": 8},
            "required": False,
            "mutable": False,
        },
        {
            "name": "region",
            "type": "string",
            "display_name": "Region",
            "description": "",
            "default": None,
            "options": ["eu", "us"],
            "validation": None,
            "required": True,
            "mutable": False,
        },
        {
            "name": "dotfiles",
            "type": "list(string)",
            "display_name": "Dotfiles",
            "description": "",
            "default": [],
            "options": None,
            "validation": None,
            "required": False,
            "mutable": False,
        },
    ]
    # Values are checked against them before any build is queued.
    with pytest.raises(ApiError) as refused:
        owner.create_workspace(unique("ws"), name, {"cpu": 16, "region": "eu"})
    assert refused.value.status == 400
    assert "cpu" in refused.value.message and "maximum 8" in refused.value.message
    with pytest.raises(ApiError) as missing:
        owner.create_workspace(unique("ws"), name, {"region": "mars"})
    assert missing.value.status == 400 and "region" in missing.value.message


def test_a_bad_tf_file_is_a_400_naming_file_and_line(owner: Client, tmp_path: Path) -> None:
    name = unique("tfbad")
    bad = MAIN_TF.replace("type        = number", "type        = map(string)")
    with pytest.raises(ApiError) as exc:
        owner.push_template(name, build_archive(write(tmp_path / "tpl", name, bad)))
    assert exc.value.status == 400 and exc.value.reason == "invalid_manifest"
    expected = (
        'main.tf:6: variable "cpu": type map(string) is not supported as a parameter '
        "(use string, number, bool or list(string))"
    )
    assert expected in exc.value.message, exc.value.message
    assert exc.value.detail[0]["file"] == "main.tf" and exc.value.detail[0]["line"] == 6

    unparsable = write(tmp_path / "tpl2", name)
    (unparsable / "z_extra.tf").write_text('variable "dotfiles" {\n  type = list(string)\n')
    with pytest.raises(ApiError) as exc:
        owner.push_template(name, build_archive(unparsable))
    assert exc.value.status == 400
    assert "z_extra.tf:3: not valid HCL: unexpected end of file" in exc.value.message
    with pytest.raises(ApiError) as gone:
        owner.get_template(name)
    assert gone.value.status == 404
