"""Template parameters declared as Terraform variables: the variable to
parameter mapping, the validation conditions Stockade translates (and those
it leaves to Terraform), the merge with the manifest's own parameters, and
every error, read from real HCL with python-hcl2."""

from __future__ import annotations

import io
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from stockade.sdk.starters import write_starter
from stockade.sdk.templates import (
    ArchiveError,
    Manifest,
    ManifestError,
    Parameter,
    build_archive,
    check_value,
    parse_manifest,
    read_archive_files,
    read_directory_files,
)
from stockade.sdk.terraform_variables import merge_terraform_parameters, terraform_parameters

STOCKADE_VARIABLES = """\
variable "stockade_workspace_id" { type = string }
variable "stockade_start_count" { type = number }
variable "stockade_agent_init_script" {
  type      = string
  sensitive = true
}
"""


def params(main: str) -> list[Parameter]:
    return terraform_parameters({"main.tf": main.encode()})


def one(text: str) -> Parameter:
    [parameter] = terraform_parameters({"main.tf": text.encode()})
    return parameter


def problems(files: dict[str, str]) -> list[str]:
    with pytest.raises(ManifestError) as exc:
        terraform_parameters({name: text.encode() for name, text in files.items()})
    return [str(p) for p in exc.value.problems]


def error(text: str) -> str:
    [message] = problems({"main.tf": text})
    return message


# --- the mapping ---------------------------------------------------------------------------


def test_each_variable_but_stockades_own_is_a_parameter() -> None:
    main = (
        STOCKADE_VARIABLES
        + """
variable "cpu_cores" {
  description = "CPU cores for the workspace."
  type        = number
  default     = 2
  nullable    = false
}
variable "region" {
  type = string
}
variable "dotfiles" {
  description = <<-EOT
    Dotfiles to install,
    one repository a line.
  EOT
  type    = list(string)
  default = ["git@example.com:me/dots"]
}
variable "debug" {
  type      = bool
  default   = false
  sensitive = true
}
variable "nothing" {
  type    = string
  default = null
}
"""
    )
    found = params(main)
    assert [p.name for p in found] == ["cpu_cores", "region", "dotfiles", "debug", "nothing"]
    cpu, region, dotfiles, debug, nothing = found
    assert cpu.model_dump() == {
        "name": "cpu_cores",
        "type": "number",
        "display_name": "Cpu cores",
        "description": "CPU cores for the workspace.",
        "default": 2,
        "options": None,
        "validation": None,
        "required": False,
        "mutable": False,
    }
    assert (region.type, region.required, region.default) == ("string", True, None)
    assert region.display_name == "Region"
    assert dotfiles.type == "list(string)"
    assert dotfiles.default == ["git@example.com:me/dots"]
    assert dotfiles.description == "Dotfiles to install,\none repository a line."
    assert (debug.type, debug.default, debug.required) == ("bool", False, False)
    # default = null: Stockade must ask for a value.
    assert (nothing.required, nothing.default) == (True, None)


def test_the_type_comes_from_the_default_when_none_is_declared() -> None:
    found = params(
        """
variable "count_of" { default = 3 }
variable "ratio" { default = 0.5 }
variable "big" { default = 1e3 }
variable "on" { default = true }
variable "names" { default = ["a", "b"] }
variable "empty" { default = [] }
variable "text" { default = "hi" }
variable "bare" {}
"""
    )
    assert [(p.name, p.type, p.default) for p in found] == [
        ("count_of", "number", 3),
        ("ratio", "number", 0.5),
        ("big", "number", 1000),
        ("on", "bool", True),
        ("names", "list(string)", ["a", "b"]),
        ("empty", "list(string)", []),
        ("text", "string", "hi"),
        ("bare", "string", None),
    ]
    assert found[-1].required


def test_defaults_are_converted_as_terraform_converts_them() -> None:
    found = params(
        """
variable "n" {
  type    = number
  default = "2"
}
variable "s" {
  type    = string
  default = 8
}
variable "b" {
  type    = bool
  default = "true"
}
variable "l" {
  type    = list(string)
  default = ["x", 1, true]
}
variable "escaped" { default = "$${HOME} and %%{x} \\"quoted\\"\\n" }
"""
    )
    assert [p.default for p in found] == [
        2,
        "8",
        True,
        ["x", "1", "true"],
        '${HOME} and %{x} "quoted"\n',
    ]


def test_files_are_read_in_terraform_order_top_level_only() -> None:
    found = terraform_parameters(
        {
            "variables.tf": b'variable "b_second" { default = "b" }\n',
            "a.tf": b'variable "a_first" { default = "a" }\nvariable "a_then" { default = "c" }\n',
            # Modules have their own variables; other files are not Terraform's.
            "modules/net/variables.tf": b'variable "module_only" { default = "m" }\n',
            "README.md": b'variable "no" {}',
            "vars.tf.json": b'{"variable": {"from_json": {"type": "number", "default": 4}}}',
        }
    )
    assert [p.name for p in found] == ["a_first", "a_then", "b_second", "from_json"]
    assert found[-1].type == "number" and found[-1].default == 4


def test_json_variables_and_override_files() -> None:
    found = terraform_parameters(
        {
            "main.tf": b"""
variable "size" {
  type    = number
  default = 10
  validation {
    condition     = var.size <= 100
    error_message = "At most 100."
  }
}
""",
            "main.tf.json": b"""{
  "variable": {
    "zone": {
      "description": "Where.",
      "default": "b",
      "validation": {"condition": "${contains([\\"a\\", \\"b\\"], var.zone)}",
                     "error_message": "a or b"}
    }
  }
}""",
            # As in Terraform: an override file's attributes replace the
            # original's, its validation blocks all of the original's.
            "override.tf": b"""
variable "size" {
  default = 20
  validation {
    condition     = var.size >= 5
    error_message = "At least 5."
  }
}
""",
        }
    )
    size, zone = found
    assert (size.default, size.validation and size.validation.model_dump()) == (
        20,
        {"regex": None, "min": 5, "max": None},
    )
    assert (zone.description, zone.default, zone.options) == ("Where.", "b", ["a", "b"])


def test_the_starter_template_has_its_greeting_as_a_parameter(tmp_path: Path) -> None:
    write_starter(tmp_path, "terraform", "starter")
    files = read_directory_files(tmp_path)
    assert list(files) == ["main.tf"]
    [greeting] = terraform_parameters(files)
    assert greeting.name == "greeting" and greeting.default == "hello"
    assert check_value(greeting, "good day") is None
    assert "does not match" in (check_value(greeting, "Hi!") or "")


# --- validation conditions -----------------------------------------------------------------


def rules(condition: str, kind: str = "string") -> dict[str, Any]:
    """What Stockade checks for a variable X of ``kind`` with ``condition``."""
    parameter = one(
        f'variable "x" {{\n  type = {kind}\n  validation {{\n'
        f"    condition     = {condition}\n"
        '    error_message = "No."\n  }\n}\n'
    )
    return parameter.model_dump(include={"options", "validation"}, exclude_none=True)


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ("var.x >= 1 && var.x <= 8", {"min": 1, "max": 8}),
        ("var.x>=1&&var.x<=8", {"min": 1, "max": 8}),
        ("1 <= var.x", {"min": 1}),
        ("8 >= var.x", {"max": 8}),
        ("var.x >= -2.5", {"min": -2.5}),
        # Each part of an && is a check on its own; the others stay Terraform's.
        ("(var.x >= 1) && (var.x <= 8 && var.x != 3)", {"min": 1, "max": 8}),
        ("var.x >= 1 && floor(var.x) == var.x", {"min": 1}),
        # Strict bounds do not translate exactly; nor does anything under ||.
        ("var.x > 0", None),
        ("var.x < 10", None),
        ("var.x >= 1 || var.x == 0", None),
        # && binds tighter: 0 passes this one, so no minimum.
        ("var.x >= 1 && var.x <= 8 || var.x == 0", None),
        ("var.x >= 1 ? true : false", None),
        ("!(var.x < 1)", None),
        ("var.y >= 1", None),
    ],
)
def test_number_bounds(condition: str, expected: dict[str, float] | None) -> None:
    got = rules(condition, "number")
    assert got.get("validation") == expected


@pytest.mark.parametrize(
    ("condition", "matching", "failing"),
    [
        ('can(regex("^[a-z]+$", var.x))', ["abc"], ["Abc", "abc1", "", "abc\n"]),
        # Terraform's regex() searches: unanchored means "contains".
        ('can(regex("[0-9]", var.x))', ["1", "ab1c", "a\nb2"], ["abc", ""]),
        ('can(regex("^a|b$", var.x))', ["ax", "xb", "a"], ["xa", "bx"]),
        ('length(regexall("[0-9]", var.x)) > 0', ["x1"], ["x"]),
        ('length(regexall("[0-9]", var.x)) >= 1', ["x1"], ["x"]),
        # regex(...) == var.x: the match is the whole value.
        ('regex("[a-z]+", var.x) == var.x', ["abc"], ["abc1", "1abc"]),
        ('var.x == regex("[a-z]+", var.x)', ["abc"], ["abc1"]),
        # HCL escapes are decoded: \\d in HCL is \d in the regex.
        ('can(regex("^\\\\d{3}$", var.x))', ["123"], ["12", "abc"]),
        ('can(regex("^\\"[a-z]+\\"$", var.x))', ['"quoted"'], ["quoted"]),
        ('can(regex("(?i)^yes$", var.x))', ["YES", "yes"], ["no"]),
    ],
)
def test_regex_conditions(condition: str, matching: list[str], failing: list[str]) -> None:
    parameter = one(
        'variable "x" {\n  type = string\n  validation {\n'
        f"    condition     = {condition}\n"
        '    error_message = "No."\n  }\n}\n'
    )
    assert parameter.validation is not None and parameter.validation.regex is not None
    for value in matching:
        assert check_value(parameter, value) is None, (value, parameter.validation.regex)
    for value in failing:
        assert "does not match the regex" in (check_value(parameter, value) or ""), value


def test_an_anchored_regex_is_kept_as_written() -> None:
    assert rules('can(regex("^[a-z ]{1,40}$", var.x))') == {
        "validation": {"regex": "^[a-z ]{1,40}$"}
    }


@pytest.mark.parametrize(
    "condition",
    [
        # RE2 syntax Python reads differently or not at all.
        'can(regex("^[[:alpha:]]+$", var.x))',
        'can(regex("^\\\\pL+$", var.x))',
        'can(regex("^a\\\\z", var.x))',
        # A template, a variable other than this one, a function Stockade does not know.
        'can(regex("^${var.y}$", var.x))',
        'can(regex("^a$", var.y))',
        'can(regex("^a$", lower(var.x)))',
        "length(var.x) <= 10",
        'startswith(var.x, "a")',
        'can(regex("^a$", var.x)) || var.x == ""',
    ],
)
def test_conditions_left_to_terraform(condition: str) -> None:
    assert rules(condition) == {}


def test_regex_on_a_list_is_left_to_terraform() -> None:
    assert rules('can(regex("^a$", var.x))', "list(string)") == {}


@pytest.mark.parametrize(
    ("kind", "condition", "expected"),
    [
        ("string", 'contains(["eu", "us"], var.x)', ["eu", "us"]),
        ("string", 'contains([\n      "eu",\n      "us",\n    ], var.x)', ["eu", "us"]),
        ("number", "contains([1, 2.5, -3], var.x)", [1, 2.5, -3]),
        ("bool", "contains([true], var.x)", [True]),
        # Values not all of the variable's type, or not all literals: Terraform's.
        ("string", 'contains(["eu", 1], var.x)', None),
        ("number", 'contains(["1", "2"], var.x)', None),
        ("string", 'contains(["eu", var.y], var.x)', None),
        ("string", "contains(local.regions, var.x)", None),
        ("list(string)", 'contains(["a"], var.x)', None),
    ],
)
def test_contains_gives_options(kind: str, condition: str, expected: list[Any] | None) -> None:
    assert rules(condition, kind).get("options") == expected


def test_several_validation_blocks_combine() -> None:
    parameter = one(
        """
variable "x" {
  type    = number
  default = 4
  validation {
    condition     = var.x >= 1
    error_message = "At least 1."
  }
  validation {
    condition     = var.x >= 2 && var.x <= 16
    error_message = "2 to 16."
  }
  validation {
    condition     = contains([2, 4, 8, 16, 32], var.x)
    error_message = "A power of two."
  }
  validation {
    condition     = contains([4, 8, 64], var.x)
    error_message = "Allowed sizes."
  }
}
"""
    )
    assert parameter.validation is not None
    assert (parameter.validation.min, parameter.validation.max) == (2, 16)
    # Both lists must hold the value.
    assert parameter.options == [4, 8]


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("declared", "shown"),
    [
        ("map(string)", "map(string)"),
        ("object({ a = string })", "object({a=string})"),
        ("list(number)", "list(number)"),
        ("set(string)", "set(string)"),
        ("any", "any"),
        ("list", "list"),
    ],
)
def test_unsupported_types_name_file_line_and_variable(declared: str, shown: str) -> None:
    message = error(f'\n\nvariable "cpu" {{\n  description = "x"\n  type = {declared}\n}}\n')
    assert message == (
        f'main.tf:5: variable "cpu": type {shown} is not supported as a parameter '
        "(use string, number, bool or list(string))"
    )


def test_a_default_whose_type_is_unsupported() -> None:
    assert error('variable "tags" {\n  default = { a = "b" }\n}\n').startswith(
        'main.tf:1: variable "tags": its default {"a": "b"} is not a string, number, bool '
        "or list of strings"
    )
    assert "is not a string, number" in error('variable "mixed" { default = ["a", 1] }')


def test_defaults_must_fit_the_type_and_the_validation() -> None:
    assert error('variable "n" {\n  type = number\n  default = "lots"\n}\n') == (
        'main.tf:3: variable "n": default "lots" is not a number (type number)'
    )
    assert error('variable "b" {\n  type = bool\n  default = "yes"\n}\n') == (
        'main.tf:3: variable "b": default "yes" is not true or false (type bool)'
    )
    too_big = """
variable "cpu" {
  type    = number
  default = 16
  validation {
    condition     = var.cpu >= 1 && var.cpu <= 8
    error_message = "1 to 8."
  }
}
"""
    assert error(too_big) == 'main.tf:4: variable "cpu": default 16 is more than the maximum 8'
    not_an_option = """
variable "region" {
  default = "mars"
  validation {
    condition     = contains(["eu", "us"], var.region)
    error_message = "eu or us."
  }
}
"""
    assert error(not_an_option) == (
        "main.tf:3: variable \"region\": default 'mars' is not one of the options ('eu', 'us')"
    )
    mismatch = """
variable "name" {
  default = "Bob"
  validation {
    condition     = can(regex("^[a-z]+$", var.name))
    error_message = "Lowercase."
  }
}
"""
    assert error(mismatch) == (
        "main.tf:3: variable \"name\": default 'Bob' does not match the regex '^[a-z]+$'"
    )


def test_conditions_that_allow_nothing() -> None:
    impossible = """
variable "x" {
  type = number
  validation {
    condition     = var.x >= 10 && var.x <= 1
    error_message = "Never."
  }
}
"""
    assert error(impossible) == (
        'main.tf:4: variable "x": its validation conditions allow no value at all'
    )


def test_defaults_must_be_literal() -> None:
    assert error('variable "x" {\n  type = string\n  default = "${local.y}"\n}\n') == (
        'main.tf:3: variable "x": the default must be a literal value'
    )
    assert "must be a literal value" in error('variable "x" { default = 3 * 2 }')


def test_names_a_parameter_cannot_have() -> None:
    assert error('variable "Region" { default = "eu" }') == (
        'main.tf:1: variable "Region": a parameter\'s name must be a lowercase identifier '
        "of at most 64 characters (a letter, then lowercase letters, digits or '_'); "
        "rename the variable"
    )
    assert "lowercase identifier" in error('variable "my-region" { default = "eu" }')
    # Stockade's own variables are never parameters, whatever their type.
    assert params('variable "stockade_extra" { type = map(string) }') == []


def test_unparseable_hcl_names_the_file_and_the_parser_line() -> None:
    message = error('variable "x" {\n  type = string\n  default = \n}\n')
    assert re.fullmatch(r"main\.tf:3: not valid HCL: unexpected .* at column \d+", message), message
    assert error('variable "x" {\n  type = string\n') == (
        "main.tf:3: not valid HCL: unexpected end of file at column 1"
    )
    [message] = problems({"main.tf": "", "bad.tf": "resource {{{"})
    assert message.startswith("bad.tf:1: not valid HCL: unexpected")


def test_more_file_errors() -> None:
    with pytest.raises(ManifestError) as exc:
        terraform_parameters({"main.tf": b'variable "x" { default = "\xff" }'})
    assert str(exc.value) == "main.tf:1: not UTF-8 text (invalid start byte)"
    assert problems(
        {"a.tf": 'variable "x" { default = "a" }', "b.tf": '\n\nvariable "x" { default = "b" }'}
    ) == [
        'b.tf:3: variable "x": declared twice (first at a.tf:1); Terraform refuses '
        "duplicate variables"
    ]
    assert problems({"main_override.tf": 'variable "x" { default = "a" }'}) == [
        'main_override.tf:1: variable "x": an override file overrides a variable declared '
        "in another file; declare it there first"
    ]
    assert problems({"main.tf": 'variable "x" {\n  default = 1\n  default = 2\n}'}) == [
        'main.tf:3: variable "x": default is set twice (first at line 2); Terraform refuses that'
    ]
    assert problems({"main.tf": 'variable "x" "y" {}'}) == [
        "main.tf:1: a variable block takes one label: its name"
    ]
    assert problems({"vars.tf.json": '{"variable": '}) == [
        "vars.tf.json:1: not valid JSON: Expecting value: line 1 column 14 (char 13)"
    ]


def test_every_problem_is_reported_at_once() -> None:
    found = problems(
        {
            "main.tf": 'variable "a" { type = map(string) }\nvariable "b" { type = any }\n',
            "other.tf": "}",
        }
    )
    assert [m.split(":")[0] + ":" + m.split(":")[1] for m in found] == [
        "main.tf:1",
        "main.tf:2",
        "other.tf:1",
    ]


# --- the merge with the manifest -----------------------------------------------------------

VARIABLES = (
    STOCKADE_VARIABLES
    + """
variable "cpu" {
  description = "CPU cores."
  type        = number
  default     = 2
}
variable "region" {
  type    = string
  default = "eu"
}
"""
)
EXTRA = """
variable "image" {
  default = "debian:12"
}
"""


def manifest_text(parameters: str = "", backend: str = "terraform") -> str:
    return f"name: tf\nbackend: {backend}\n" + (f"parameters:\n{parameters}" if parameters else "")


def merge(text: str, files: dict[str, str]) -> Manifest:
    return merge_terraform_parameters(
        parse_manifest(text),
        {name: content.encode() for name, content in files.items()},
        manifest_text=text,
    )


def merge_problems(text: str, files: dict[str, str]) -> list[str]:
    with pytest.raises(ManifestError) as exc:
        merge(text, files)
    return [str(p) for p in exc.value.problems]


def test_variables_become_the_parameters_of_a_terraform_manifest() -> None:
    merged = merge(manifest_text(), {"main.tf": VARIABLES, "z.tf": EXTRA})
    assert [(p.name, p.type, p.default) for p in merged.parameters] == [
        ("cpu", "number", 2),
        ("region", "string", "eu"),
        ("image", "string", "debian:12"),
    ]
    # What the server stores reads back the same.
    stored = merged.model_dump(mode="json")
    assert Manifest.model_validate(stored) == merged


def test_a_manifest_parameter_takes_its_variable_over() -> None:
    text = manifest_text(
        "  - name: region\n"
        "    display_name: Data centre\n"
        "    type: string\n"
        "    default: us\n"
        "    options: [eu, us]\n"
        "    mutable: true\n"
    )
    merged = merge(text, {"main.tf": VARIABLES, "z.tf": EXTRA})
    # The manifest's own first, then the variables in file order.
    assert [p.name for p in merged.parameters] == ["region", "cpu", "image"]
    region = merged.parameters[0]
    assert (region.display_name, region.default, region.options, region.mutable) == (
        "Data centre",
        "us",
        ["eu", "us"],
        True,
    )
    assert not merged.parameters[1].mutable


def test_other_backends_are_left_alone() -> None:
    text = manifest_text("  - name: size\n    default: a\n", backend="local")
    manifest = parse_manifest(text)
    assert merge_terraform_parameters(manifest, {"main.tf": b"this is not HCL {"}) is manifest


def test_merge_errors_point_at_the_manifest() -> None:
    text = manifest_text(
        "  - name: cpu\n"
        "    type: string\n"
        "    default: '2'\n"
        "  - name: ghost\n"
        "    required: true\n"
        "  - name: stockade_workspace_id\n"
        "    required: true\n"
    )
    assert merge_problems(text, {"main.tf": VARIABLES}) == [
        'stockade.yaml:5: parameters[0].type: parameter "cpu" is string here but variable '
        '"cpu" (main.tf:10) is number; give both the same type',
        'stockade.yaml:7: parameters[1].name: declare variable "ghost" in a .tf file at '
        "the template's top level: Stockade passes parameters to Terraform as variables, "
        "and the value of an undeclared one would be lost",
        "stockade.yaml:9: parameters[2].name: 'stockade_workspace_id': names starting with "
        "stockade_ are the variables Stockade passes itself; rename the parameter and its "
        "variable",
    ]


def test_merge_reports_the_tf_files_problems_with_the_manifests() -> None:
    text = manifest_text("  - name: ghost\n    required: true\n")
    assert merge_problems(text, {"main.tf": 'variable "m" { type = map(string) }'}) == [
        'stockade.yaml:4: parameters[0].name: declare variable "ghost" in a .tf file at '
        "the template's top level: Stockade passes parameters to Terraform as variables, "
        "and the value of an undeclared one would be lost",
        'main.tf:1: variable "m": type map(string) is not supported as a parameter '
        "(use string, number, bool or list(string))",
    ]


# --- reading the files of a directory and of an archive ------------------------------------


def test_the_files_read_from_a_directory_and_from_its_archive(tmp_path: Path) -> None:
    (tmp_path / "stockade.yaml").write_text(manifest_text())
    (tmp_path / "main.tf").write_text(VARIABLES)
    (tmp_path / "extra.tf.json").write_text('{"variable": {"zone": {"default": "a"}}}')
    (tmp_path / "notes.txt").write_text("not terraform")
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "main.tf").write_text('variable "inner" {}')
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "common.tf").write_text(EXTRA)
    (tmp_path / "common.tf").symlink_to("shared/common.tf")
    expected = {
        "common.tf": EXTRA.encode(),
        "extra.tf.json": b'{"variable": {"zone": {"default": "a"}}}',
        "main.tf": VARIABLES.encode(),
    }
    assert read_directory_files(tmp_path) == expected
    assert read_archive_files(build_archive(tmp_path)) == expected
    names = [p.name for p in terraform_parameters(expected)]
    assert names == ["image", "zone", "cpu", "region"]


def test_a_dangling_link_in_an_archive() -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("main.tf")
        info.type = tarfile.SYMTYPE
        info.linkname = "missing.tf"
        tar.addfile(info)
    with pytest.raises(ArchiveError, match=re.escape("the link 'main.tf' points to no file")):
        read_archive_files(buffer.getvalue())


def test_modules_from_elsewhere_are_refused_and_vendored_ones_accepted() -> None:
    """terraform init downloads remote modules whatever the provider mirror
    says: a template may only use modules it carries (./ or ../ paths)."""
    from stockade.sdk.terraform_variables import declared_variables

    remote = {
        "main.tf": b'module "net" {\n  source = "git::https://example.com/net.git"\n}\n',
        "more.tf.json": b'{"module": {"db": {"source": "hashicorp/consul/aws"}}}',
        "vars.tf": b'variable "size" {\n  default = 1\n}\n',
    }
    with pytest.raises(ManifestError) as refused:
        declared_variables(remote)
    assert [str(p) for p in refused.value.problems] == [
        "main.tf:2: module \"net\": source 'git::https://example.com/net.git' would be "
        "downloaded by terraform init, and builds download nothing: copy the module into "
        "the template and use a path starting with ./",
        "more.tf.json:1: module \"db\": source 'hashicorp/consul/aws' would be downloaded by "
        "terraform init, and builds download nothing: copy the module into the template and "
        "use a path starting with ./",
    ]
    vendored = {
        "main.tf": b'module "net" {\n  source = "./modules/net"\n}\n'
        b'module "up" {\n  source = "../shared"\n}\n',
        "vars.tf": b'variable "size" {\n  default = 1\n}\n',
    }
    assert declared_variables(vendored) == {"size"}
