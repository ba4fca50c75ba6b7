"""Templates as files: the ``stockade.yaml`` manifest schema, its validation
with ``file:line`` messages, and the ``.tar.gz`` archive a push uploads.

Shared by the CLI (which checks a directory before pushing) and the server
(which checks the uploaded archive again), so both report the same errors.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import posixpath
import re
import stat
import tarfile
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST_NAME = "stockade.yaml"
# The compressed archive a push uploads; the server refuses larger bodies.
MAX_ARCHIVE_BYTES = 10 * 1024 * 1024
# What the archive may expand to, and how many entries it may hold.
MAX_UNPACKED_BYTES = 100 * 1024 * 1024
MAX_MEMBERS = 10_000
SKIPPED_DIRS = frozenset({".git"})

TEMPLATE_NAME_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$"
TEMPLATE_NAME_HELP = (
    "1-32 characters: lowercase letters, digits and hyphens, starting and ending "
    "with a letter or digit"
)
PARAMETER_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,63}$"
SLUG_PATTERN = r"^[a-z0-9](?:[a-z0-9-]{0,30}[a-z0-9])?$"
SIZE_PATTERN = r"^\d+(?:\.\d+)?\s*(?:[KMGT]i?B?|B)?$"
_REFERENCE = re.compile(r"^\$\{([a-z][a-z0-9_]*)\}$")

ParameterType = Literal["string", "number", "bool", "list(string)"]


class _Strict(BaseModel):
    """Unknown fields are errors, and values are not coerced: ``cpu: "2"`` is
    not a number and ``default: 1`` is not a string."""

    model_config = ConfigDict(extra="forbid", strict=True)


class ParameterValidation(_Strict):
    regex: str | None = Field(None, description="strings must match it (Python syntax)")
    min: float | None = Field(None, description="smallest allowed number")
    max: float | None = Field(None, description="largest allowed number")


class Parameter(_Strict):
    name: str = Field(pattern=PARAMETER_NAME_PATTERN, description="lowercase identifier")
    type: ParameterType = "string"
    display_name: str = Field("", max_length=128)
    description: str = Field("", max_length=4096)
    default: str | float | bool | list[str] | None = Field(
        None, description="value when none is given; required parameters have none"
    )
    options: list[str | float | bool] | None = Field(None, description="the only values allowed")
    validation: ParameterValidation | None = None
    required: bool = False
    mutable: bool = Field(False, description="may change after the workspace is created")


class Compute(_Strict):
    image: str | None = Field(None, max_length=512, description="docker image (docker only)")
    cpu: float | str | None = Field(None, description="CPU cores, or ${parameter}")
    memory: str | None = Field(None, description="e.g. 2GiB, or ${parameter}")
    home_size: str | None = Field(None, description="e.g. 10GiB, or ${parameter}")
    gpus: int | str | None = Field(
        None, description="GPUs to request (docker device requests), or ${parameter}"
    )


class MetadataItem(_Strict):
    key: str = Field(pattern=PARAMETER_NAME_PATTERN)
    display_name: str = Field("", max_length=128)
    script: str = Field(min_length=1)
    interval: int = Field(60, ge=1, le=86400, description="seconds between runs")
    timeout: int = Field(10, ge=1, le=3600, description="seconds before the script is killed")


class Agent(_Strict):
    startup_script: str = ""
    startup_timeout: int = Field(
        600, ge=1, le=86400, description="seconds before the agent gives up on the script"
    )
    metadata: list[MetadataItem] = Field(default_factory=list)


AppShareLevel = Literal["owner", "authenticated", "public"]
SHARE_LEVELS: tuple[AppShareLevel, ...] = ("owner", "authenticated", "public")


class AppHealthCheck(_Strict):
    """How the agent checks an app (like Coder's ``healthcheck``): an HTTP GET
    inside the workspace every ``interval`` seconds; any status below 400 is
    healthy, ``threshold`` failures in a row unhealthy."""

    url: str = Field(
        min_length=1,
        max_length=2048,
        description="a path on the app (/healthz) or a full http:// URL inside the workspace",
    )
    interval: int = Field(5, ge=1, le=3600, description="seconds between checks")
    threshold: int = Field(
        3, ge=1, le=100, description="failures in a row before the app is unhealthy"
    )


class App(_Strict):
    """A web app inside the workspace that the control plane reverse-proxies."""

    slug: str = Field(pattern=SLUG_PATTERN)
    display_name: str = Field("", max_length=128)
    port: int | None = Field(None, ge=1, le=65535)
    url: str | None = Field(
        None, max_length=2048, description="http://HOST:PORT/PATH inside the workspace"
    )
    icon: str | None = Field(None, max_length=512)
    subdomain: bool = Field(
        True,
        description="serve it on its own origin SLUG--WORKSPACE--USER under the wildcard "
        "access URL (the server's --wildcard-access-url); false: at /@USER/WORKSPACE/apps/SLUG/ "
        "on the dashboard's origin",
    )
    share: AppShareLevel = Field(
        "owner",
        description="who may open it: owner, authenticated (any signed-in user) or public "
        "(anyone); capped by the server's --max-app-share-level",
    )
    health_check: AppHealthCheck | None = None


class KubernetesToleration(_Strict):
    """A Pod toleration, as Kubernetes spells it (snake_case here)."""

    key: str | None = Field(None, max_length=316)
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, ge=0)


class KubernetesSettings(_Strict):
    """Where and how a kubernetes workspace's Pod runs (backend: kubernetes)."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[KubernetesToleration] = Field(default_factory=list)
    runtime_class: str | None = Field(None, max_length=253, description="e.g. gvisor, kata")
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets in the workspaces' namespace"
    )
    service_account: str | None = Field(
        None,
        max_length=253,
        description="the Pod's service account; none: the namespace's default, with no API "
        "token mounted",
    )
    gpu_resource: str = Field(
        "nvidia.com/gpu",
        max_length=253,
        description="the extended resource compute.gpus requests (nvidia.com/gpu, amd.com/gpu...)",
    )
    storage_class: str | None = Field(None, max_length=253, description="of the home volume")
    network_policy: bool = Field(
        False,
        description="a NetworkPolicy lets the workspace reach only the control plane, DNS "
        "and allow_egress",
    )
    allow_egress: list[str] = Field(
        default_factory=list, description="CIDR or CIDR:PORT the workspace may also reach"
    )
    read_only_root: bool = Field(
        True, description="read-only root filesystem (/tmp and the home stay writable)"
    )
    run_as_user: int = Field(1000, ge=1, le=2**31 - 1, description="never root")


class Manifest(_Strict):
    name: str = Field(pattern=TEMPLATE_NAME_PATTERN, description=TEMPLATE_NAME_HELP)
    display_name: str = Field("", max_length=128)
    description: str = Field("", max_length=4096)
    icon: str | None = Field(None, max_length=512)
    backend: Literal["local", "docker", "terraform", "kubernetes"]
    parameters: list[Parameter] = Field(default_factory=list)
    compute: Compute = Field(default_factory=Compute)
    agent: Agent = Field(default_factory=Agent)
    apps: list[App] = Field(default_factory=list)
    kubernetes: KubernetesSettings | None = None


# --- errors ----------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    line: int
    path: str
    reason: str
    # The template file the line is in: a terraform template's parameters
    # also come from its .tf files.
    file: str = MANIFEST_NAME

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}: {where}{self.reason}"


class ManifestError(ValueError):
    """The manifest is invalid; ``problems`` holds one line per error."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(map(str, self.problems)))


class ArchiveError(ValueError):
    """The archive is unsafe or unreadable; the message says which entry and why."""


Loc = tuple[str | int, ...]


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _line_of(root: yaml.Node | None, loc: Loc, *, key: bool = False) -> int:
    """The line of the deepest node along ``loc`` (of the key itself when
    ``key``: an unknown field is reported where it is written)."""
    node = root
    line = node.start_mark.line + 1 if node is not None else 1
    for i, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            match = [(k, v) for k, v in node.value if getattr(k, "value", None) == part]
            if not match:
                break
            k_node, v_node = match[-1]
            last = i == len(loc) - 1
            node = k_node if (key and last) else v_node
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _duplicate_keys(node: yaml.Node, loc: Loc = ()) -> Iterable[Problem]:
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for k, v in node.value:
            name = getattr(k, "value", None)
            if name in seen:
                yield Problem(k.start_mark.line + 1, _path((*loc, str(name))), "duplicate key")
            seen.add(name)
            yield from _duplicate_keys(v, (*loc, str(name)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            yield from _duplicate_keys(item, (*loc, i))


def _reason(error: Any, model_fields: Sequence[str] | None) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = f" (known fields: {', '.join(model_fields)})" if model_fields else ""
        return f"unknown field{allowed}"
    if kind == "missing":
        return "required field is missing"
    if kind == "string_pattern_mismatch":
        field = error["loc"][-1] if error["loc"] else ""
        if field == "name" and len(error["loc"]) == 1:
            return f"must be {TEMPLATE_NAME_HELP}"
        if field in ("name", "key"):
            return "must be a lowercase identifier: a letter, then letters, digits or '_'"
        if field == "slug":
            return f"must be {TEMPLATE_NAME_HELP}"
    return str(error["msg"])


def _fields_at(loc: Loc) -> list[str] | None:
    """The known fields of the model an unknown field was found in."""
    model: type[BaseModel] = Manifest
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        inner = _model_in(annotation)
        if inner is None:
            return None
        model = inner
    return list(model.model_fields)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _dedupe_union(errors: list[Any]) -> list[Any]:
    """A union field reports one error per member type; keep one per field."""
    seen: dict[Loc, Any] = {}
    for error in errors:
        loc: list[str | int] = []
        for part in error["loc"]:
            # Union members appear in the location as their type names.
            if isinstance(part, str) and (part in _UNION_TAGS or part.startswith("list[")):
                break
            loc.append(part)
        key = tuple(loc)
        if key not in seen:
            seen[key] = {**error, "loc": key}
    return list(seen.values())


_UNION_TAGS = frozenset({"str", "float", "bool", "int", "list[str]", "none"})


# --- semantic checks ----------------------------------------------------------------


def _type_name(kind: ParameterType) -> str:
    return {"string": "a string", "number": "a number", "bool": "true or false"}.get(
        kind, "a list of strings"
    )


def parse_number(text: str) -> int | float | None:
    """A number parameter's value as a person types it (``3``, ``2.5``), or
    None when it is not a finite number. Clients send what does not parse as
    text, so that the server names the parameter and what it needs."""
    text = text.strip()
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def check_value(param: Parameter, value: Any) -> str | None:
    """Why ``value`` is not acceptable for ``param`` (``None``: it is).

    Used for a manifest's defaults and, at workspace creation, for the values
    users give."""
    kind = param.type
    if kind == "string" and not isinstance(value, str):
        return f"must be {_type_name(kind)}"
    if kind == "number" and (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(float(value))
    ):
        return f"must be {_type_name(kind)}"
    if kind == "bool" and not isinstance(value, bool):
        return f"must be {_type_name(kind)}"
    if kind == "list(string)" and (
        not isinstance(value, list) or not all(isinstance(v, str) for v in value)
    ):
        return f"must be {_type_name(kind)}"
    if param.options is not None:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not any(item == o and type(item) is type(o) for o in param.options) and not (
                kind == "number" and any(item == o for o in param.options)
            ):
                shown = ", ".join(map(_show, param.options))
                return f"{_show(item)} is not one of the options ({shown})"
    rule = param.validation
    if rule is not None:
        if rule.regex is not None and kind in ("string", "list(string)"):
            items = value if isinstance(value, list) else [value]
            for item in items:
                if re.fullmatch(rule.regex, item) is None:
                    return f"{_show(item)} does not match the regex {rule.regex!r}"
        if kind == "number":
            if rule.min is not None and value < rule.min:
                return f"{_show(value)} is less than the minimum {_show(rule.min)}"
            if rule.max is not None and value > rule.max:
                return f"{_show(value)} is more than the maximum {_show(rule.max)}"
    return None


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str):
        return repr(value)
    return str(value)


def _semantic(manifest: Manifest) -> Iterable[tuple[Loc, str, bool]]:
    """(location, reason, point at the key) for what the schema alone cannot say."""
    names: set[str] = set()
    for i, p in enumerate(manifest.parameters):
        at: Loc = ("parameters", i)
        if p.name in names:
            yield (*at, "name"), f"duplicate parameter name {p.name!r}", False
        names.add(p.name)
        rule = p.validation
        if rule is not None:
            if rule.regex is not None:
                if p.type not in ("string", "list(string)"):
                    yield (
                        (*at, "validation", "regex"),
                        f"regex needs type string, not {p.type}",
                        False,
                    )
                try:
                    re.compile(rule.regex)
                except re.error as exc:
                    yield (*at, "validation", "regex"), f"invalid regex: {exc}", False
                    continue
            for bound in ("min", "max"):
                if getattr(rule, bound) is not None and p.type != "number":
                    yield (*at, "validation", bound), f"{bound} needs type number", False
            if rule.min is not None and rule.max is not None and rule.min > rule.max:
                yield (*at, "validation"), "min is greater than max", True
        if p.options is not None:
            if not p.options:
                yield (*at, "options"), "options must not be empty", False
            elemental = p.model_copy(update={"options": None, "type": _element_type(p.type)})
            for j, option in enumerate(p.options):
                problem = check_value(elemental, option)
                if problem:
                    yield (*at, "options", j), f"option {problem}", False
        if p.required and p.default is not None:
            yield (*at, "default"), "a required parameter has no default; remove one", True
        if not p.required and p.default is None:
            yield (
                (*at, "default"),
                ("an optional parameter needs a default (or set required: true)"),
                True,
            )
        if p.default is not None:
            problem = check_value(p, p.default)
            if problem:
                yield (*at, "default"), f"default {problem}", False
    by_name = {p.name: p for p in manifest.parameters}
    compute = manifest.compute
    for field in ("image", "cpu", "memory", "home_size", "gpus"):
        value = getattr(compute, field)
        if not isinstance(value, str):
            continue
        ref = _REFERENCE.match(value)
        if ref:
            if ref.group(1) not in by_name:
                yield ("compute", field), f"refers to an unknown parameter {ref.group(1)!r}", False
            continue
        if field == "cpu":
            yield ("compute", field), "must be a number of cores or ${parameter}", False
        elif field == "gpus":
            yield ("compute", field), "must be a number of GPUs or ${parameter}", False
        elif field in ("memory", "home_size") and parse_size(value) is None:
            yield ("compute", field), f"{value!r} is not a size such as 512MiB or 4GiB", False
    if isinstance(compute.cpu, float | int) and compute.cpu <= 0:
        yield ("compute", "cpu"), "must be greater than 0", False
    if isinstance(compute.gpus, int) and compute.gpus < 0:
        yield ("compute", "gpus"), "must be 0 or more", False
    if manifest.backend in ("docker", "kubernetes") and not compute.image:
        yield ("compute", "image"), f"the {manifest.backend} backend needs an image", True
    if manifest.kubernetes is not None and manifest.backend != "kubernetes":
        yield ("kubernetes",), "kubernetes settings are for the kubernetes backend only", True
    for i, entry in enumerate(manifest.kubernetes.allow_egress if manifest.kubernetes else []):
        if _egress_rule(entry) is None:
            yield (
                ("kubernetes", "allow_egress", i),
                f"{entry!r} is not CIDR or CIDR:PORT (10.0.0.0/8, 10.1.2.3/32:443)",
                False,
            )
    if manifest.backend == "local" and compute.image:
        yield ("compute", "image"), "image is used only by the docker backend", True
    if manifest.backend == "terraform" and any(
        getattr(compute, field) is not None for field in Compute.model_fields
    ):
        yield (
            ("compute",),
            "the terraform backend takes no compute settings: the .tf files size the "
            "compute, from parameters (var.NAME)",
            True,
        )
    slugs: set[str] = set()
    for i, app in enumerate(manifest.apps):
        if app.slug in slugs:
            yield ("apps", i, "slug"), f"duplicate app slug {app.slug!r}", False
        slugs.add(app.slug)
        if (app.port is None) == (app.url is None):
            yield ("apps", i), "give exactly one of port or url", True
        if "--" in app.slug or app.slug.isdigit():
            # SLUG--WORKSPACE--USER hosts split on "--"; an all-digit label is a port.
            yield ("apps", i, "slug"), "an app slug has no '--' and is not all digits", False
        if app.url is not None and app_target(app) is None:
            yield ("apps", i, "url"), "must be http://HOST[:PORT][/PATH]", False
        check = app.health_check
        if check is not None and health_check_url(app) is None:
            yield (
                ("apps", i, "health_check", "url"),
                "must be a path starting with / or an http://HOST[:PORT][/PATH] URL",
                False,
            )
    keys: set[str] = set()
    for i, item in enumerate(manifest.agent.metadata):
        if item.key in keys:
            yield ("agent", "metadata", i, "key"), f"duplicate metadata key {item.key!r}", False
        keys.add(item.key)


def output_apps(manifest: Manifest, value: Any) -> list[App]:
    """The apps a Terraform template's ``stockade_apps`` output adds to its
    manifest's, each checked as a manifest app is; ``ValueError`` saying which
    one is wrong and why (a slug the manifest already has included)."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise ValueError("stockade_apps must be a list of apps (objects with slug and port)")
    apps: list[App] = []
    slugs = {app.slug for app in manifest.apps}
    for i, item in enumerate(value):
        if isinstance(item, dict):
            # Terraform objects carry every attribute, unset ones as null.
            item = {k: v for k, v in item.items() if v is not None}
        try:
            app = App.model_validate(item, strict=False)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = _path(tuple(first["loc"]))
            raise ValueError(
                f"stockade_apps[{i}]{'.' + where if where else ''}: {first['msg']}"
            ) from None
        probe = Manifest.model_construct(
            name=manifest.name, backend=manifest.backend, apps=[app], compute=Compute()
        )
        for loc, reason, _key in _semantic(probe):
            if loc[:1] == ("apps",):
                raise ValueError(f"stockade_apps[{i}]: {reason}")
        if app.slug in slugs:
            raise ValueError(f"stockade_apps[{i}]: the app slug {app.slug!r} is already taken")
        slugs.add(app.slug)
        apps.append(app)
    return apps


def workspace_apps(manifest: Manifest, state: dict[str, Any] | None) -> list[App]:
    """A workspace's apps: its template's, and those its last Terraform build
    output (checked by the provisioner; anything unreadable is left out)."""
    outputs = ((state or {}).get("terraform") or {}).get("outputs") or {}
    try:
        return [*manifest.apps, *output_apps(manifest, outputs.get("stockade_apps"))]
    except ValueError:
        return list(manifest.apps)


def _egress_rule(rule: str) -> tuple[str, int | None] | None:
    """``CIDR`` or ``CIDR:PORT`` as (network, port), None when it is neither."""
    import ipaddress

    network, _, port = rule.rpartition(":") if rule.count(":") == 1 else (rule, "", "")
    try:
        parsed = ipaddress.ip_network(network, strict=False)
    except ValueError:
        return None
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        return None
    return str(parsed), int(port) if port else None


def egress_rule(rule: str) -> tuple[str, int | None]:
    """A checked ``allow_egress`` entry as (CIDR, port or None)."""
    parsed = _egress_rule(rule)
    if parsed is None:
        raise ValueError(f"{rule!r} is not CIDR or CIDR:PORT")
    return parsed


@dataclass(frozen=True)
class AppTarget:
    """Where an app listens inside the workspace, and the path it is served under."""

    host: str
    port: int
    base_path: str  # "" or "/path" without a trailing slash


def _parse_http_url(url: str) -> AppTarget | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    host = parts.hostname
    if parts.scheme != "http" or not host or parts.username or parts.password or parts.fragment:
        return None
    if not re.fullmatch(r"[A-Za-z0-9.:-]{1,255}", host):
        return None
    return AppTarget(host, port or 80, parts.path.rstrip("/"))


def app_target(app: App) -> AppTarget | None:
    """The app's host, port and base path inside the workspace (None: its URL
    is not one the proxy can serve)."""
    if app.port is not None:
        return AppTarget("127.0.0.1", app.port, "")
    return _parse_http_url(app.url or "")


def health_check_url(app: App) -> str | None:
    """The full URL the agent checks (a path is relative to the app)."""
    check = app.health_check
    if check is None:
        return None
    if check.url.startswith("/"):
        target = app_target(app)
        if target is None or any(c in check.url for c in " \r\n#"):
            return None
        return f"http://{target.host}:{target.port}{target.base_path}{check.url}"
    return check.url if _parse_http_url(check.url) is not None else None


def _element_type(kind: ParameterType) -> ParameterType:
    return "string" if kind == "list(string)" else kind


_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?$")


def parse_size(text: str) -> int | None:
    """``512MiB``, ``4GiB``, ``2G``, ``100`` (bytes) to bytes."""
    match = _SIZE.match(text.strip())
    if not match:
        return None
    number, unit, binary = match.groups()
    base = 1024 if binary or unit else 1
    power = " KMGT".index(unit or " ")
    if not binary and unit:
        base = 1000
    return int(float(number) * base**power)


@dataclass(frozen=True)
class ResolvedCompute:
    """A manifest's compute settings with ``${parameter}`` references replaced
    by a workspace's values and sizes in bytes; ``None`` where not set."""

    image: str | None
    cpu: float | None
    memory_bytes: int | None
    home_bytes: int | None
    gpus: int


class ComputeError(ValueError):
    """A parameter value does not fit the compute field that refers to it."""

    def __init__(self, field: str, parameter: str | None, reason: str) -> None:
        self.field = field
        self.parameter = parameter
        via = (
            f"parameter {parameter!r} (used as compute.{field})"
            if parameter
            else f"compute.{field}"
        )
        super().__init__(f"{via}: {reason}")


def resolve_compute(compute: Compute, values: dict[str, Any]) -> ResolvedCompute:
    """Substitute parameter values into ``compute``; raise ``ComputeError``
    naming the parameter when a value cannot serve as that field."""

    def raw(field: str) -> tuple[Any, str | None]:
        value = getattr(compute, field)
        ref = _REFERENCE.match(value) if isinstance(value, str) else None
        if ref is None:
            return value, None
        return values.get(ref.group(1)), ref.group(1)

    image, image_param = raw("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise ComputeError("image", image_param, "must be a non-empty image name")
    cpu, cpu_param = raw("cpu")
    if cpu is not None:
        if isinstance(cpu, bool) or not isinstance(cpu, int | float | str):
            raise ComputeError("cpu", cpu_param, "must be a number of cores")
        try:
            cpu = float(cpu)
        except ValueError:
            raise ComputeError("cpu", cpu_param, f"{cpu!r} is not a number of cores") from None
        if not math.isfinite(cpu) or cpu <= 0:
            raise ComputeError("cpu", cpu_param, "must be more than 0 cores")
    sizes: dict[str, int | None] = {}
    for field in ("memory", "home_size"):
        value, param = raw(field)
        if value is None or value == "":
            sizes[field] = None
            continue
        size = parse_size(value) if isinstance(value, str) else None
        if size is None or size <= 0:
            raise ComputeError(field, param, f"{value!r} is not a size such as 512MiB or 4GiB")
        sizes[field] = size
    gpus, gpu_param = raw("gpus")
    if gpus is None:
        gpus = 0
    if isinstance(gpus, str) and gpus.isdigit():
        gpus = int(gpus)
    if isinstance(gpus, float) and gpus.is_integer():
        gpus = int(gpus)
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
        raise ComputeError("gpus", gpu_param, f"{gpus!r} is not a whole number of GPUs")
    return ResolvedCompute(
        image=image,
        cpu=cpu,
        memory_bytes=sizes["memory"],
        home_bytes=sizes["home_size"],
        gpus=gpus,
    )


# --- parsing ----------------------------------------------------------------------


def parse_manifest(text: str | bytes, *, expected_name: str | None = None) -> Manifest:
    """Parse and validate a manifest; raise ``ManifestError`` listing every
    problem as ``stockade.yaml:LINE: field.path: reason``."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError([Problem(1, "", f"not UTF-8 text ({exc.reason})")]) from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise ManifestError([Problem(line, "", f"invalid YAML: {exc.problem}")]) from exc
    except yaml.YAMLError as exc:
        raise ManifestError([Problem(1, "", f"invalid YAML: {exc}")]) from exc
    if root is None or not isinstance(data, dict):
        line = root.start_mark.line + 1 if root is not None else 1
        raise ManifestError(
            [Problem(line, "", "the manifest must be a mapping (name:, backend:, ...)")]
        )
    problems = list(_duplicate_keys(root))
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        for error in _dedupe_union(exc.errors()):
            loc: Loc = tuple(error["loc"])
            unknown = error["type"] == "extra_forbidden"
            problems.append(
                Problem(
                    _line_of(root, loc, key=unknown),
                    _path(loc),
                    _reason(error, _fields_at(loc) if unknown else None),
                )
            )
        raise ManifestError(sorted(problems, key=lambda p: p.line)) from exc
    for loc, reason, at_key in _semantic(manifest):
        problems.append(Problem(_line_of(root, loc, key=bool(at_key)), _path(loc), reason))
    if expected_name is not None and manifest.name != expected_name:
        problems.append(
            Problem(
                _line_of(root, ("name",)),
                "name",
                f"{manifest.name!r} differs from the template being pushed ({expected_name!r})",
            )
        )
    if problems:
        raise ManifestError(sorted(problems, key=lambda p: p.line))
    return manifest


# --- archives -----------------------------------------------------------------------


def _safe_name(name: str) -> str:
    """The member's normalised relative path, or ``ArchiveError`` saying why not."""
    if not name or "\x00" in name:
        raise ArchiveError("the archive holds an entry with an empty or invalid name")
    if name.startswith("/") or re.match(r"^[A-Za-z]:[\\/]", name) or name.startswith("\\"):
        raise ArchiveError(f"the archive entry {name!r} has an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise ArchiveError(f"the archive entry {name!r} contains '..'")
    clean = posixpath.normpath(name)
    return "" if clean == "." else clean


def _inside(target: str) -> bool:
    return not (target.startswith("/") or target == ".." or target.startswith("../"))


@dataclass(frozen=True)
class ArchiveInfo:
    manifest_text: bytes
    files: int
    unpacked_bytes: int
    sha256: str


def inspect_archive(data: bytes) -> ArchiveInfo:
    """Check an uploaded ``.tar.gz``: readable, within limits, every entry a
    regular file, directory or link that stays inside the tree, and a
    ``stockade.yaml`` at its top. Raise ``ArchiveError`` otherwise."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(
            f"the archive is {len(data)} bytes; the limit is {MAX_ARCHIVE_BYTES} bytes"
        )
    manifest: bytes | None = None
    files = 0
    total = 0
    names: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise ArchiveError(f"the archive holds more than {MAX_MEMBERS} entries")
                name = _safe_name(member.name)
                if member.issym():
                    target = member.linkname
                    if target.startswith("/"):
                        raise ArchiveError(
                            f"the symlink {name!r} points to the absolute path {target!r}"
                        )
                    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(name), target))
                    if not _inside(resolved):
                        raise ArchiveError(
                            f"the symlink {name!r} points outside the template ({target!r})"
                        )
                elif member.islnk():
                    target = posixpath.normpath(member.linkname)
                    if not _inside(target) or member.linkname.startswith("/"):
                        raise ArchiveError(
                            f"the hard link {name!r} points outside the template "
                            f"({member.linkname!r})"
                        )
                    if target not in names:
                        raise ArchiveError(
                            f"the hard link {name!r} points to {member.linkname!r}, "
                            "which is not an earlier file in the archive"
                        )
                elif member.isdev() or member.isfifo():
                    raise ArchiveError(
                        f"the archive entry {name!r} is a device or FIFO; "
                        "only files, directories and links are allowed"
                    )
                elif not (member.isfile() or member.isdir()):
                    raise ArchiveError(f"the archive entry {name!r} has an unsupported type")
                if member.isfile():
                    files += 1
                    total += member.size
                    if total > MAX_UNPACKED_BYTES:
                        raise ArchiveError(
                            f"the archive unpacks to more than {MAX_UNPACKED_BYTES} bytes"
                        )
                    if name == MANIFEST_NAME:
                        extracted = tar.extractfile(member)
                        manifest = extracted.read() if extracted is not None else b""
                names.add(name)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError, zlib.error) as exc:
        raise ArchiveError(f"the body is not a readable .tar.gz archive ({exc})") from exc
    if manifest is None:
        raise ArchiveError(f"the archive has no {MANIFEST_NAME} at its top level")
    return ArchiveInfo(manifest, files, total, hashlib.sha256(data).hexdigest())


TERRAFORM_FILE_SUFFIXES = (".tf", ".tf.json")


def read_archive_files(
    data: bytes, suffixes: tuple[str, ...] = TERRAFORM_FILE_SUFFIXES
) -> dict[str, bytes]:
    """The contents of the files at the top level of an archive whose names
    end with one of ``suffixes`` (a terraform template's root module), by
    name; links are followed inside the archive. Within the limits
    :func:`inspect_archive` checks; raise ``ArchiveError`` otherwise."""
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(
            f"the archive is {len(data)} bytes; the limit is {MAX_ARCHIVE_BYTES} bytes"
        )
    found: dict[str, bytes] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise ArchiveError(f"the archive holds more than {MAX_MEMBERS} entries")
                name = _safe_name(member.name)
                if "/" in name or not name.endswith(suffixes) or member.isdir():
                    continue
                if not (member.isfile() or member.issym() or member.islnk()):
                    continue
                try:
                    extracted = tar.extractfile(member)
                except KeyError:
                    extracted = None
                if extracted is None:
                    raise ArchiveError(f"the link {name!r} points to no file in the archive")
                content = extracted.read(MAX_UNPACKED_BYTES - total + 1)
                total += len(content)
                if total > MAX_UNPACKED_BYTES:
                    raise ArchiveError(
                        f"the archive unpacks to more than {MAX_UNPACKED_BYTES} bytes"
                    )
                found[name] = content
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError, zlib.error) as exc:
        raise ArchiveError(f"the body is not a readable .tar.gz archive ({exc})") from exc
    return found


def read_directory_files(
    directory: Path, suffixes: tuple[str, ...] = TERRAFORM_FILE_SUFFIXES
) -> dict[str, bytes]:
    """As :func:`read_archive_files`, from a template directory (before it
    is packed): its top-level files whose names end with one of ``suffixes``."""
    return {
        path.name: path.read_bytes()
        for path in sorted(directory.iterdir())
        if path.name.endswith(suffixes) and path.is_file()
    }


def build_archive(directory: Path) -> bytes:
    """Pack ``directory`` as a deterministic ``.tar.gz``, skipping ``.git``.
    Links are kept as links; one leaving the tree, a special file, or an
    archive over the limit is an ``ArchiveError``."""
    root = directory.resolve()
    buffer = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buffer, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for path in sorted(_walk(root)):
            rel = path.relative_to(root).as_posix()
            st = path.lstat()
            info = tarfile.TarInfo(rel)
            info.mtime = int(st.st_mtime)
            info.mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                target = str(path.readlink())
                resolved = posixpath.normpath(posixpath.join(posixpath.dirname(rel), target))
                if target.startswith("/") or not _inside(resolved):
                    raise ArchiveError(f"{rel}: the symlink points outside the template ({target})")
                info.type = tarfile.SYMTYPE
                info.linkname = target
                tar.addfile(info)
            elif stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                if st.st_size > MAX_ARCHIVE_BYTES:
                    raise ArchiveError(
                        f"{rel}: the file is {st.st_size} bytes, over the "
                        f"{MAX_ARCHIVE_BYTES}-byte limit of a template; remove it or "
                        "move it out of the template directory"
                    )
                info.size = st.st_size
                with path.open("rb") as handle:
                    tar.addfile(info, handle)
            else:
                raise ArchiveError(f"{rel}: only files, directories and symlinks can be pushed")
    data = buffer.getvalue()
    if len(data) > MAX_ARCHIVE_BYTES:
        raise ArchiveError(
            f"the template packs to {len(data)} bytes, over the limit of {MAX_ARCHIVE_BYTES} bytes"
        )
    return data


def _walk(root: Path) -> Iterable[Path]:
    for path in root.iterdir():
        if path.name in SKIPPED_DIRS and path.is_dir() and not path.is_symlink():
            continue
        yield path
        if path.is_dir() and not path.is_symlink():
            yield from _walk(path)


def extract_archive(data: bytes, destination: Path) -> None:
    """Unpack a checked archive into ``destination`` (which must exist)."""
    inspect_archive(data)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(destination, filter="data")
