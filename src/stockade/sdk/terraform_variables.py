"""Template parameters declared as Terraform variables.

A ``terraform`` template's parameters have one source: the ``variable`` blocks
of its root module (the ``*.tf`` and ``*.tf.json`` files at the template's top
level; subdirectories are modules, with variables of their own). Every
variable whose name does not start with ``stockade_`` (those are what Stockade
itself passes: workspace name and id, owner, transition, agent token...)
becomes a :class:`~stockade.sdk.templates.Parameter`:

- ``type``: ``string``, ``number``, ``bool`` or ``list(string)``; without one,
  the type of the default (``string`` when there is none). Any other type is
  an error: a form cannot ask for it.
- ``default``: the parameter's default, converted to the type as Terraform
  converts it (``"2"`` for a number is 2); none, or ``null``, makes the
  parameter required.
- ``description``: the parameter's description; its display name is the
  variable's name with spaces for underscores, capitalised.
- ``validation`` blocks whose condition Stockade can check before a build
  becomes the parameter's checks: ``can(regex("RE", var.X))`` (also
  ``regex("RE", var.X) == var.X`` and ``length(regexall("RE", var.X)) > 0``)
  a regex, ``var.X >= N`` and ``var.X <= M`` (alone or joined with ``&&``) a
  minimum and maximum, ``contains([...], var.X)`` with literal values the
  options. Other conditions stay Terraform's to enforce at plan time.

:func:`merge_terraform_parameters` combines them with the manifest's own
``parameters:``, where a template may take a variable's parameter over
(options, ``mutable: true``, a display name...).
"""

from __future__ import annotations

import json
import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from stockade.sdk.templates import (
    MANIFEST_NAME,
    PARAMETER_NAME_PATTERN,
    TERRAFORM_FILE_SUFFIXES,
    Manifest,
    ManifestError,
    Parameter,
    ParameterType,
    Problem,
    _line_of,
    check_value,
    parse_number,
)

# What Stockade passes to every terraform template; never a parameter.
RESERVED_PREFIX = "stockade_"
SUPPORTED_TYPES: tuple[ParameterType, ...] = ("string", "number", "bool", "list(string)")
_SUPPORTED_HELP = "use string, number, bool or list(string)"
_PARAMETER_NAME = re.compile(PARAMETER_NAME_PATTERN)


# --- reading variable blocks ----------------------------------------------------------


@dataclass
class _Variable:
    """One ``variable`` block as written: its attributes (HCL values as
    python-hcl2 serializes them, or JSON values) and where each is."""

    name: str
    file: str
    line: int
    attrs: dict[str, Any] = field(default_factory=dict)
    attr_lines: dict[str, int] = field(default_factory=dict)
    # (line, condition) of each validation block that has a condition.
    validations: list[tuple[int, Any]] = field(default_factory=list)
    # HCL strings keep their template escapes ($${, %%{); JSON values do not.
    hcl: bool = True

    def where(self, attr: str | None = None) -> int:
        return self.attr_lines.get(attr, self.line) if attr else self.line

    def problem(self, reason: str, attr: str | None = None) -> Problem:
        return Problem(self.where(attr), f'variable "{self.name}"', reason, file=self.file)


def _is_override(path: str) -> bool:
    """Terraform's override files, merged into the blocks of the others."""
    stem = path.removesuffix(".json").removesuffix(".tf")
    return stem == "override" or stem.endswith("_override")


def _module_files(files: Mapping[str, bytes]) -> list[str]:
    """The root module's files in the order Terraform reads them: by name,
    override files last."""
    top = [p for p in files if "/" not in p.strip("/") and p.endswith(TERRAFORM_FILE_SUFFIXES)]
    return sorted(top, key=lambda p: (_is_override(p), p))


def _hcl_error(exc: Exception) -> tuple[int, str]:
    """(line, reason) of a python-hcl2 / lark parse error."""
    line = getattr(exc, "line", None)
    column = getattr(exc, "column", None)
    token = getattr(exc, "token", None)
    char = getattr(exc, "char", None)
    if token is not None and getattr(token, "type", "") == "$END":
        what = "unexpected end of file"
    elif token is not None:
        shown = str(token).strip() or str(token)
        what = f"unexpected {shown[:40]!r}"
    elif char is not None:
        what = f"unexpected character {char!r}"
    else:
        text = str(exc).strip()
        what = text.splitlines()[0] if text else type(exc).__name__
    at = f" at column {column}" if isinstance(column, int) and column > 0 else ""
    return (line if isinstance(line, int) and line > 0 else 1), f"{what}{at}"


def _line_of_rule(rule: Any) -> int | None:
    meta = rule.to_lark().meta
    line = getattr(meta, "line", None)
    return line if isinstance(line, int) else None


def _read_hcl(path: str, text: str) -> tuple[list[_Variable], list[Problem]]:
    # Imported here: parsing HCL is needed only for terraform templates, and
    # every CLI command would pay for the grammar otherwise.
    import hcl2
    from hcl2.rules.base import AttributeRule, BlockRule
    from lark.exceptions import LarkError

    options = hcl2.SerializationOptions(
        strip_string_quotes=True,
        with_comments=False,
        preserve_heredocs=False,
        preserve_scientific_notation=False,
    )
    try:
        tree = hcl2.parses(text)
    except (LarkError, RuntimeError, ValueError) as exc:
        line, reason = _hcl_error(exc)
        return [], [Problem(line, "", f"not valid HCL: {reason}", file=path)]
    found: list[_Variable] = []
    problems: list[Problem] = []
    for block in tree.body.children:
        if not isinstance(block, BlockRule):
            continue
        labels = [str(label.serialize(options)) for label in block.labels]
        if labels[0] == "module":
            problems.extend(_module_problems(block, labels, path, options))
            continue
        if labels[0] != "variable":
            continue
        line = _line_of_rule(block) or 1
        if len(labels) != 2:
            problems.append(
                Problem(line, "", "a variable block takes one label: its name", file=path)
            )
            continue
        variable = _Variable(labels[1], path, line)
        try:
            for item in block.body.children:
                if isinstance(item, AttributeRule):
                    name = str(item.identifier.serialize(options))
                    if name in variable.attrs:
                        # python-hcl2 keeps the last; Terraform refuses both.
                        problems.append(
                            Problem(
                                _line_of_rule(item) or line,
                                f'variable "{variable.name}"',
                                f"{name} is set twice (first at line "
                                f"{variable.attr_lines[name]}); Terraform refuses that",
                                file=path,
                            )
                        )
                    variable.attrs[name] = item.expression.serialize(options)
                    variable.attr_lines[name] = _line_of_rule(item) or line
                elif isinstance(item, BlockRule) and str(item.labels[0].serialize(options)) == (
                    "validation"
                ):
                    body = item.body.serialize(options)
                    if "condition" in body:
                        variable.validations.append(
                            (_line_of_rule(item) or line, body["condition"])
                        )
                    variable.attr_lines.setdefault("validation", _line_of_rule(item) or line)
        except (LarkError, RuntimeError, ValueError) as exc:
            problems.append(variable.problem(f"cannot be read ({exc})"))
            continue
        found.append(variable)
    return found, problems


def _remote_source(source: object) -> bool:
    """Whether ``terraform init`` would download a module from ``source``:
    anything but a path starting with ./ or ../ (registry addresses, git::,
    https://, s3::, github.com/...)."""
    return not (isinstance(source, str) and source.startswith(("./", "../")))


def _module_problem(name: str, source: object, path: str, line: int) -> Problem:
    return Problem(
        line,
        f'module "{name}"',
        f"source {source!r} would be downloaded by terraform init, and builds download "
        "nothing: copy the module into the template and use a path starting with ./",
        file=path,
    )


def _module_problems(block: Any, labels: list[str], path: str, options: Any) -> list[Problem]:
    from hcl2.rules.base import AttributeRule

    line = _line_of_rule(block) or 1
    name = labels[1] if len(labels) > 1 else "?"
    for item in block.body.children:
        if isinstance(item, AttributeRule) and str(item.identifier.serialize(options)) == "source":
            source = item.expression.serialize(options)
            if _remote_source(source):
                return [_module_problem(name, source, path, _line_of_rule(item) or line)]
            return []
    return []


def _read_json(path: str, text: str) -> tuple[list[_Variable], list[Problem]]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        line = getattr(exc, "lineno", 1)
        return [], [Problem(line, "", f"not valid JSON: {exc}", file=path)]
    blocks = data.get("variable") if isinstance(data, dict) else None
    # Terraform's JSON syntax allows one object of blocks or a list of them.
    groups = blocks if isinstance(blocks, list) else [blocks] if blocks is not None else []
    start = text.find('"variable"')
    found: list[_Variable] = []
    for group in groups:
        if not isinstance(group, dict):
            continue
        for name, body in group.items():
            if name == "//":
                continue
            # JSON keeps no lines: the first "NAME": after "variable" is near enough.
            match = re.compile(re.escape(json.dumps(name)) + r"\s*:").search(text, max(start, 0))
            line = text.count("\n", 0, match.start()) + 1 if match else 1
            variable = _Variable(name, path, line, hcl=False)
            for part in body if isinstance(body, list) else [body]:
                if not isinstance(part, dict):
                    continue
                for key, value in part.items():
                    if key == "validation":
                        checks = value if isinstance(value, list) else [value]
                        variable.validations.extend(
                            (line, check["condition"])
                            for check in checks
                            if isinstance(check, dict) and "condition" in check
                        )
                    elif key != "//":
                        variable.attrs[key] = value
            found.append(variable)
    problems: list[Problem] = []
    modules = data.get("module") if isinstance(data, dict) else None
    for group in modules if isinstance(modules, list) else [modules] if modules else []:
        for name, body in group.items() if isinstance(group, dict) else ():
            for part in body if isinstance(body, list) else [body]:
                if isinstance(part, dict) and _remote_source(part.get("source")):
                    problems.append(_module_problem(name, part.get("source"), path, 1))
    return found, problems


def _read_variables(files: Mapping[str, bytes]) -> tuple[list[_Variable], list[Problem]]:
    """Every variable of the root module in file order, override files
    merged in as Terraform merges them."""
    variables: dict[str, _Variable] = {}
    problems: list[Problem] = []
    for path in _module_files(files):
        try:
            text = files[path].decode("utf-8")
        except UnicodeDecodeError as exc:
            problems.append(Problem(1, "", f"not UTF-8 text ({exc.reason})", file=path))
            continue
        reader = _read_json if path.endswith(".json") else _read_hcl
        found, bad = reader(path, text)
        problems.extend(bad)
        for variable in found:
            first = variables.get(variable.name)
            if _is_override(path):
                if first is None:
                    problems.append(
                        variable.problem(
                            "an override file overrides a variable declared in another "
                            "file; declare it there first"
                        )
                    )
                    continue
                # Override attributes replace the original's; validation
                # blocks replace all of the original's.
                first.attrs.update(variable.attrs)
                first.attr_lines.update(dict.fromkeys(variable.attrs, variable.line))
                if variable.validations:
                    first.validations = variable.validations
            elif first is not None:
                problems.append(
                    variable.problem(
                        f"declared twice (first at {first.file}:{first.line}); "
                        "Terraform refuses duplicate variables"
                    )
                )
            else:
                variables[variable.name] = variable
    return list(variables.values()), problems


# --- values -----------------------------------------------------------------------------


class _NotLiteral(ValueError):
    """An HCL expression where Terraform and Stockade need a literal value."""


def _hcl_string(value: str, hcl: bool) -> str:
    """An HCL string value as the literal it stands for (python-hcl2 keeps
    the template escapes ``$${`` and ``%%{``); a template with an
    interpolation or a whole expression is not a literal."""
    if not hcl:
        return value
    if re.search(r"(?<!\$)\$\{|(?<!%)%\{", value):
        raise _NotLiteral(value)
    return value.replace("$${", "${").replace("%%{", "%{")


def _type_of(variable: _Variable) -> tuple[ParameterType | None, str | None]:
    """(the parameter type, None) or (None, why not)."""
    if "type" in variable.attrs:
        raw = variable.attrs["type"]
        text = raw if isinstance(raw, str) else json.dumps(raw)
        if text.startswith("${") and text.endswith("}"):
            text = text[2:-1]
        text = re.sub(r"\s+", "", text)
        if text in SUPPORTED_TYPES:
            return text, None
        return None, f"type {text} is not supported as a parameter ({_SUPPORTED_HELP})"
    default = variable.attrs.get("default")
    if default is None:
        return "string", None
    if isinstance(default, bool):
        return "bool", None
    if isinstance(default, int | float):
        return "number", None
    if isinstance(default, list) and all(isinstance(v, str) for v in default):
        return "list(string)", None
    if isinstance(default, str):
        if variable.hcl and default.startswith("${") and default.endswith("}"):
            return None, (
                "the default must be a literal value; declare its type "
                f"({_SUPPORTED_HELP}) and give a literal default"
            )
        return "string", None
    return None, (
        f"its default {json.dumps(default)} is not a string, number, bool or list of "
        f"strings; a parameter needs one of those ({_SUPPORTED_HELP}, in type = ...)"
    )


def _number_text(value: int | float) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _convert(value: Any, kind: ParameterType, hcl: bool) -> Any:
    """``value`` as ``kind``, converted as Terraform converts a default
    (``"2"`` to 2, ``true`` to ``"true"``...); raise ValueError with why not."""
    if isinstance(value, str):
        value = _hcl_string(value, hcl)
    if kind == "string":
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, int | float):
            return _number_text(value)
        if isinstance(value, str):
            return value
    elif kind == "number":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and (number := parse_number(value)) is not None:
            return number
    elif kind == "bool":
        if isinstance(value, bool):
            return value
        if value in ("true", "false"):
            return value == "true"
    elif isinstance(value, list):
        return [_convert(item, "string", hcl) for item in value]
    raise ValueError(f"{json.dumps(value)} is not {_KIND_TEXT[kind]}")


_KIND_TEXT: dict[str, str] = {
    "string": "a string",
    "number": "a number",
    "bool": "true or false",
    "list(string)": "a list of strings",
}


# --- validation conditions ---------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<space>\s+)
    | (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<num>\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)
    | (?P<name>[A-Za-z_][A-Za-z0-9_-]*(?:\.[A-Za-z_][A-Za-z0-9_-]*)*)
    | (?P<op>&&|\|\||>=|<=|==|!=|[-+*/%<>!()\[\],])
    """,
    re.VERBOSE,
)
_Token = tuple[str, Any]


def _tokens(expression: str) -> list[_Token] | None:
    """The tokens of a condition in the small language the rules below read
    (strings decoded, numbers as numbers); None when it holds anything else
    (heredocs, templates, conditionals, for expressions...)."""
    from hcl2.utils import process_escape_sequences

    out: list[_Token] = []
    pos = 0
    while pos < len(expression):
        match = _TOKEN.match(expression, pos)
        if match is None:
            return None
        pos = match.end()
        kind = match.lastgroup or ""
        text = match.group()
        if kind == "space":
            continue
        if kind == "str":
            try:
                literal = _hcl_string(text[1:-1], hcl=True)
            except _NotLiteral:
                return None
            out.append(("str", process_escape_sequences(literal)))
        elif kind == "num":
            number = float(text)
            out.append(("num", int(number) if number.is_integer() and "." not in text else number))
        elif text == "-" and (not out or (out[-1][0] == "op" and out[-1][1] not in ")]")):
            out.append(("neg", "-"))
        else:
            out.append((kind, text))
    # A minus before a number where no value precedes it is the number's sign.
    merged: list[_Token] = []
    for token in out:
        if merged and merged[-1] == ("neg", "-") and token[0] == "num":
            merged[-1] = ("num", -token[1])
        else:
            merged.append(token)
    if any(t[0] == "neg" for t in merged):
        return None
    return merged


def _closing(tokens: list[_Token], start: int) -> int:
    """The index of the bracket closing the one at ``start`` (-1: none)."""
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i] in (("op", "("), ("op", "[")):
            depth += 1
        elif tokens[i] in (("op", ")"), ("op", "]")):
            depth -= 1
            if depth == 0:
                return i
    return -1


def _conjuncts(tokens: list[_Token]) -> list[list[_Token]]:
    """The parts of ``A && B && ...`` (through parentheses). A condition
    holds only when each part does, so each part Stockade can check is a
    sound check on its own; an ``||`` at the top leaves nothing certain."""
    while tokens and tokens[0] == ("op", "(") and _closing(tokens, 0) == len(tokens) - 1:
        tokens = tokens[1:-1]
    parts: list[list[_Token]] = []
    depth = 0
    start = 0
    for i, token in enumerate(tokens):
        if token in (("op", "("), ("op", "[")):
            depth += 1
        elif token in (("op", ")"), ("op", "]")):
            depth -= 1
        elif depth == 0 and token == ("op", "||"):
            return []
        elif depth == 0 and token == ("op", "&&"):
            parts.append(tokens[start:i])
            start = i + 1
    if not parts:
        return [tokens]
    parts.append(tokens[start:])
    return [piece for part in parts for piece in _conjuncts(part)]


# RE2 (Terraform's regex syntax) that Python reads differently or not at all.
_RE2_ONLY = ("[:", "\\p", "\\P", "\\z", "\\C", "\\Q", "(?U")


def _python_regex(pattern: str, *, search: bool) -> str | None:
    """A Python regex that :func:`re.fullmatch` (as ``check_value`` uses it)
    accepts at least every string Terraform's RE2 ``regex()`` does: searched
    anywhere when ``search``, else matching the whole string. None when
    Python could read the pattern differently."""
    if any(construct in pattern for construct in _RE2_ONLY):
        return None
    flags_match = re.match(r"\(\?[ims]+\)", pattern)
    flags = flags_match.group() if flags_match else ""
    body = pattern[len(flags) :]
    anchored = (
        body.startswith("^")
        and body.endswith("$")
        and (len(body) - 1 - len(body[:-1].rstrip("\\"))) % 2 == 0  # the $ is not escaped
        and "|" not in body
        and "m" not in flags
    )
    if search and not anchored:
        # fullmatch of .*(?:RE).* is re.search(RE); scoped (?s:) so that
        # only the padding crosses newlines.
        body = f"(?s:.*?)(?:{body})(?s:.*)"
    result = flags + body
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            re.compile(result)
        except (re.error, Warning):
            return None
    return result


def _is_var(token: _Token, name: str) -> bool:
    return token == ("name", f"var.{name}")


def _rule_of(tokens: list[_Token], name: str, kind: ParameterType) -> dict[str, Any]:
    """What one conjunct says that a Parameter can check: regex, min, max or
    options (empty: nothing)."""
    t = tokens
    # var.X >= N, var.X <= N, N <= var.X, N >= var.X
    if kind == "number" and len(t) == 3 and t[1] in (("op", ">="), ("op", "<=")):
        low = t[1][1] == ">="
        if _is_var(t[0], name) and t[2][0] == "num":
            return {"min" if low else "max": t[2][1]}
        if _is_var(t[2], name) and t[0][0] == "num":
            return {"max" if low else "min": t[0][1]}
    if kind == "string":
        var = ("name", f"var.{name}")
        # can(regex("RE", var.X))
        if len(t) == 9 and _shape(t, "can", "(", "regex", "(", "STR", ",", var, ")", ")"):
            return _regex_rule(t[4][1], search=True)
        # length(regexall("RE", var.X)) > 0, or >= 1
        count = ("length", "(", "regexall", "(", "STR", ",", var, ")", ")")
        if len(t) == 11 and (_shape(t, *count, ">", 0) or _shape(t, *count, ">=", 1)):
            return _regex_rule(t[4][1], search=True)
        # regex("RE", var.X) == var.X, either way round
        call = ("regex", "(", "STR", ",", var, ")")
        if len(t) == 8 and _shape(t, *call, "==", var):
            return _regex_rule(t[2][1], search=False)
        if len(t) == 8 and _shape(t, var, "==", *call):
            return _regex_rule(t[4][1], search=False)
    # contains([literals], var.X)
    if (
        len(t) >= 8
        and _shape(t[:3], "contains", "(", "[")
        and _closing(t, 2) == len(t) - 4
        and _shape(t[-4:], "]", ",", ("name", f"var.{name}"), ")")
    ):
        return _options_rule(t[3:-4], kind)
    return {}


def _shape(tokens: list[_Token], *pattern: Any) -> bool:
    """Whether ``tokens`` are ``pattern``: "STR" any string, a str an
    operator or name, a number that number, a tuple that token."""
    if len(tokens) != len(pattern):
        return False
    for token, want in zip(tokens, pattern, strict=True):
        if want == "STR":
            ok = token[0] == "str"
        elif isinstance(want, tuple):
            ok = token == want
        elif isinstance(want, str):
            ok = token[0] in ("op", "name") and token[1] == want
        else:
            ok = token[0] == "num" and token[1] == want
        if not ok:
            return False
    return True


def _options_rule(items: list[_Token], kind: ParameterType) -> dict[str, Any]:
    """Options from the literals of a list (``"a", "b"``), when all are of
    the parameter's type."""
    values = items[0::2]
    if not values or any(comma != ("op", ",") for comma in items[1::2]):
        return {}
    literals: list[Any] = []
    for token in values:
        if token[0] in ("str", "num"):
            literals.append(token[1])
        elif token in (("name", "true"), ("name", "false")):
            literals.append(token[1] == "true")
        else:
            return {}
    if kind == "string":
        ok = all(isinstance(v, str) for v in literals)
    elif kind == "number":
        ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in literals)
    elif kind == "bool":
        ok = all(isinstance(v, bool) for v in literals)
    else:
        # For a list, contains() asks whether the whole list is an element.
        ok = False
    return {"options": literals} if ok else {}


def _regex_rule(pattern: str, *, search: bool) -> dict[str, Any]:
    translated = _python_regex(pattern, search=search)
    return {"regex": translated} if translated is not None else {}


def _condition_rules(condition: Any, name: str, kind: ParameterType) -> list[dict[str, Any]]:
    if not isinstance(condition, str):
        return []
    text = condition.strip()
    if text.startswith("${") and text.endswith("}"):
        text = text[2:-1]
    tokens = _tokens(text)
    if tokens is None:
        return []
    return [rule for part in _conjuncts(tokens) if (rule := _rule_of(part, name, kind))]


# --- variables to parameters --------------------------------------------------------------


def _display_name(name: str) -> str:
    text = name.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _parameter(variable: _Variable) -> tuple[Parameter | None, list[Problem]]:
    name = variable.name
    if not _PARAMETER_NAME.match(name):
        return None, [
            variable.problem(
                "a parameter's name must be a lowercase identifier of at most 64 "
                "characters (a letter, then lowercase letters, digits or '_'); rename "
                "the variable"
            )
        ]
    kind, why = _type_of(variable)
    if kind is None:
        return None, [variable.problem(why or "unsupported type", "type")]
    data: dict[str, Any] = {
        "name": name,
        "type": kind,
        "display_name": _display_name(name),
    }
    description = variable.attrs.get("description")
    if isinstance(description, str):
        try:
            data["description"] = _hcl_string(description, variable.hcl)
        except _NotLiteral:
            data["description"] = description
    default = variable.attrs.get("default")
    if default is None:
        data["required"] = True
    else:
        try:
            data["default"] = _convert(default, kind, variable.hcl)
        except _NotLiteral:
            return None, [variable.problem("the default must be a literal value", "default")]
        except ValueError as exc:
            return None, [variable.problem(f"default {exc} (type {kind})", "default")]
    checks: dict[str, Any] = {}
    options: list[Any] | None = None
    for line, condition in variable.validations:
        for rule in _condition_rules(condition, name, kind):
            if "min" in rule:
                checks["min"] = max(rule["min"], checks.get("min", -math.inf))
            if "max" in rule:
                checks["max"] = min(rule["max"], checks.get("max", math.inf))
            if "regex" in rule:
                # One regex fits in a parameter; Terraform checks the others.
                checks.setdefault("regex", rule["regex"])
            if "options" in rule:
                options = (
                    rule["options"]
                    if options is None
                    else [o for o in options if o in rule["options"]]
                )
            if checks.get("min", -math.inf) > checks.get("max", math.inf) or options == []:
                return None, [
                    Problem(
                        line,
                        f'variable "{name}"',
                        "its validation conditions allow no value at all",
                        file=variable.file,
                    )
                ]
    if checks:
        data["validation"] = checks
    if options is not None:
        data["options"] = options
    try:
        parameter = Parameter.model_validate(data)
    except ValidationError as exc:
        return None, [
            variable.problem(
                f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}", str(e["loc"][0])
            )
            for e in exc.errors()
        ]
    if parameter.default is not None:
        problem = check_value(parameter, parameter.default)
        if problem:
            return None, [variable.problem(f"default {problem}", "default")]
    return parameter, []


def _variable_parameters(
    files: Mapping[str, bytes],
) -> tuple[list[tuple[_Variable, Parameter | None]], list[Problem]]:
    variables, problems = _read_variables(files)
    out: list[tuple[_Variable, Parameter | None]] = []
    for variable in variables:
        if variable.name.startswith(RESERVED_PREFIX):
            continue
        parameter, bad = _parameter(variable)
        problems.extend(bad)
        out.append((variable, parameter))
    return out, problems


def _raise(problems: Iterable[Problem]) -> None:
    ordered = sorted(problems, key=lambda p: (p.file != MANIFEST_NAME, p.file, p.line))
    if ordered:
        raise ManifestError(ordered)


def declared_variables(files: Mapping[str, bytes]) -> set[str]:
    """The names of every variable the root module declares, ``stockade_*``
    ones included (what a build may pass values for). Raise
    :class:`ManifestError` when a file cannot be read."""
    variables, problems = _read_variables(files)
    _raise(problems)
    return {variable.name for variable in variables}


def terraform_parameters(files: Mapping[str, bytes]) -> list[Parameter]:
    """The parameters declared as variables in a terraform template's root
    module, in file order (files by name).

    ``files`` maps paths relative to the template to their contents; only
    the top-level ``*.tf`` and ``*.tf.json`` files are read (others, and
    subdirectories, are ignored). Raise :class:`ManifestError` with one
    ``FILE:LINE: variable "NAME": reason`` problem per error: HCL that does not
    parse, a type a form cannot ask for, a default that is not of the type
    or fails the validation Stockade translated."""
    found, problems = _variable_parameters(files)
    _raise(problems)
    return [parameter for _, parameter in found if parameter is not None]


def merge_terraform_parameters(
    manifest: Manifest,
    files: Mapping[str, bytes],
    *,
    manifest_text: str | bytes | None = None,
) -> Manifest:
    """``manifest`` with the parameters its Terraform variables declare.

    Only for ``backend: terraform`` (other manifests are returned as they
    are). A parameter of the manifest's ``parameters:`` takes over the
    variable of its name whole (to add options, ``mutable: true``, a display
    name...), but its type must be the variable's; every parameter there must
    have a variable, since Stockade passes parameters to Terraform as
    variables and a value for an undeclared one would be lost. Variables add
    the other parameters, in file order, after the manifest's own.

    ``manifest_text`` (the ``stockade.yaml`` the manifest was parsed from)
    gives its problems their lines. Raise :class:`ManifestError` listing
    every problem."""
    if manifest.backend != "terraform":
        return manifest
    found, problems = _variable_parameters(files)
    root: yaml.Node | None = None
    if manifest_text is not None:
        try:
            root = yaml.compose(manifest_text, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            root = None
    declared = {variable.name: (variable, parameter) for variable, parameter in found}
    own = {p.name for p in manifest.parameters}
    for i, param in enumerate(manifest.parameters):
        at = ("parameters", i)
        if param.name.startswith(RESERVED_PREFIX):
            problems.append(
                Problem(
                    _line_of(root, (*at, "name")),
                    f"parameters[{i}].name",
                    f"{param.name!r}: names starting with {RESERVED_PREFIX} are the "
                    "variables Stockade passes itself; rename the parameter and its variable",
                )
            )
            continue
        if param.name not in declared:
            problems.append(
                Problem(
                    _line_of(root, (*at, "name")),
                    f"parameters[{i}].name",
                    f'declare variable "{param.name}" in a .tf file at the template\'s top '
                    "level: Stockade passes parameters to Terraform as variables, and the "
                    "value of an undeclared one would be lost",
                )
            )
            continue
        variable, from_variable = declared[param.name]
        if from_variable is not None and from_variable.type != param.type:
            problems.append(
                Problem(
                    _line_of(root, (*at, "type")),
                    f"parameters[{i}].type",
                    f'parameter "{param.name}" is {param.type} here but variable '
                    f'"{param.name}" ({variable.file}:{variable.where("type")}) is '
                    f"{from_variable.type}; give both the same type",
                )
            )
    _raise(problems)
    merged = list(manifest.parameters) + [
        parameter for _, parameter in found if parameter is not None and parameter.name not in own
    ]
    return manifest.model_copy(update={"parameters": merged})
