"""The offline provider mirror that terraform builds install providers from.

Every build's CLI configuration holds one ``filesystem_mirror`` pointing at
this directory and no direct installation, so a template can use exactly the
providers an operator put here. Terraform's filesystem mirror reads two
layouts under its directory (``internal/getproviders/filesystem_search.go``
in Terraform), and so do we:

- packed: ``HOSTNAME/NAMESPACE/TYPE/terraform-provider-TYPE_VERSION_OS_ARCH.zip``,
  the release zip as it is; ``terraform providers mirror DIR`` writes this,
  plus ``index.json`` and ``VERSION.json`` files per provider that only a
  network mirror reads (Terraform ignores them here; we check and skip them);
- unpacked: ``HOSTNAME/NAMESPACE/TYPE/VERSION/OS_ARCH/``, the zip's files
  with the executable ``terraform-provider-TYPE*`` among them.

``import_mirror`` takes such a tree carried across the air gap, refuses it
whole when anything in it is not what these layouts hold (naming the path and
what was expected), and copies each package in under a temporary name that
is then renamed, so a build never sees half a package.

Standard library only: it runs in the server, in ``stockade provisionerd``
and in the CLI.
"""

from __future__ import annotations

import contextlib
import filecmp
import json
import os
import platform
import re
import shutil
import stat
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

__all__ = [
    "DEFAULT_HOSTNAME",
    "MirrorError",
    "ProviderPackage",
    "current_platform",
    "import_mirror",
    "list_providers",
    "missing_provider_help",
]

DEFAULT_HOSTNAME = "registry.terraform.io"
Layout = Literal["packed", "unpacked"]

# The parts of a provider address, as Terraform accepts them (ASCII only:
# Terraform also takes IDNA names, which no real provider uses).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*(?::[0-9]{{1,5}})?")
# Terraform refuses "--" in namespaces and types (it would read "xn--" as punycode).
_NAMESPACE = re.compile(r"(?!.*--)[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?")
_TYPE = re.compile(rf"(?!.*--){_LABEL}")
_VERSION_RE = r"[0-9]+\.[0-9]+\.[0-9]+(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?"
_VERSION = re.compile(_VERSION_RE)
_PLATFORM_RE = r"[a-z0-9]+_[a-z0-9]+"
_PLATFORM = re.compile(_PLATFORM_RE)
_VERSION_JSON = re.compile(rf"{_VERSION_RE}\.json")

_EXPECTED = (
    "expected what `terraform providers mirror DIR` writes, DIR/HOSTNAME/NAMESPACE/TYPE/"
    "terraform-provider-TYPE_VERSION_OS_ARCH.zip (with index.json and VERSION.json beside), "
    "or the unpacked DIR/HOSTNAME/NAMESPACE/TYPE/VERSION/OS_ARCH/terraform-provider-TYPE*"
)


_WHAT_HOST = "after a registry host (e.g. registry.terraform.io)"
_WHAT_NAMESPACE = "after a provider namespace (e.g. hashicorp)"
_WHAT_TYPE = "after a provider type (e.g. null)"


class MirrorError(ValueError):
    """A provider mirror (or a tree to import into one) that is not what
    Terraform's filesystem mirror reads; the message names the path and says
    what was expected there."""


@dataclass(frozen=True)
class ProviderPackage:
    """One provider package in a mirror: a version of a provider for one
    platform, as a zip (``packed``) or a directory (``unpacked``)."""

    hostname: str
    namespace: str
    type: str
    version: str
    platform: str
    layout: Layout
    path: Path

    @property
    def source(self) -> str:
        """The address a template's ``required_providers`` gives as
        ``source``: ``NAMESPACE/TYPE``, with the hostname in front unless it
        is the default registry."""
        return _source(self.hostname, self.namespace, self.type)

    @property
    def relative_path(self) -> PurePosixPath:
        """Where the package lives under a mirror's directory."""
        base = PurePosixPath(self.hostname, self.namespace, self.type)
        if self.layout == "packed":
            return base / f"terraform-provider-{self.type}_{self.version}_{self.platform}.zip"
        return base / self.version / self.platform

    def as_dict(self) -> dict[str, str]:
        """The package as JSON-ready strings (``stockade terraform mirror list -o json``)."""
        return {
            "source": self.source,
            "hostname": self.hostname,
            "namespace": self.namespace,
            "type": self.type,
            "version": self.version,
            "platform": self.platform,
            "layout": self.layout,
            "path": str(self.path),
        }


def _source(hostname: str, namespace: str, type_name: str) -> str:
    short = f"{namespace}/{type_name}"
    return short if hostname.lower() == DEFAULT_HOSTNAME else f"{hostname}/{short}"


def current_platform() -> str:
    """This host's platform in Terraform's words (``linux_amd64``): what a
    mirror needs packages for to run builds here."""
    machine = platform.machine().lower()
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}.get(
        machine, machine
    )
    return f"{platform.system().lower()}_{arch}"


def _version_key(version: str) -> tuple[int, int, int, int, str]:
    """Semantic version order: a pre-release sorts before its release."""
    core, _, rest = version.partition("+")[0].partition("-")
    major, minor, patch = (int(n) for n in core.split("."))
    return (major, minor, patch, 0 if rest else 1, rest)


def _sort_key(package: ProviderPackage) -> tuple[object, ...]:
    return (
        package.hostname.lower(),
        package.namespace.lower(),
        package.type.lower(),
        _version_key(package.version),
        package.platform,
        package.layout,
    )


def _packed_name(type_name: str) -> re.Pattern[str]:
    return re.compile(
        rf"terraform-provider-{re.escape(type_name)}_({_VERSION_RE})_({_PLATFORM_RE})\.zip",
        re.IGNORECASE,
    )


def _is_binary(name: str, type_name: str) -> bool:
    return name.lower().startswith(f"terraform-provider-{type_name.lower()}")


def _subdirs(directory: Path, pattern: re.Pattern[str]) -> Iterator[Path]:
    """The real (not symlinked: Terraform does not follow those below the
    mirror's top) subdirectories whose names fit ``pattern``."""
    for entry in sorted(directory.iterdir()):
        if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            yield entry


def list_providers(mirror_dir: Path) -> list[ProviderPackage]:
    """The packages Terraform's filesystem mirror at ``mirror_dir`` offers,
    in both layouts, sorted by provider, version and platform. What Terraform
    would ignore there is ignored here too; a directory that does not exist
    holds nothing. ``MirrorError`` when the directory cannot be read."""
    try:
        if not mirror_dir.exists():
            return []
        found: list[ProviderPackage] = []
        for host in _subdirs(mirror_dir, _HOSTNAME):
            for namespace in _subdirs(host, _NAMESPACE):
                for type_dir in _subdirs(namespace, _TYPE):
                    found.extend(_packages_of(type_dir, host.name, namespace.name))
    except OSError as exc:
        raise MirrorError(f"cannot read the provider mirror {mirror_dir}: {exc}") from exc
    return sorted(found, key=_sort_key)


def _packages_of(type_dir: Path, hostname: str, namespace: str) -> Iterator[ProviderPackage]:
    type_name = type_dir.name
    packed = _packed_name(type_name)
    for entry in sorted(type_dir.iterdir()):
        match = packed.fullmatch(entry.name)
        if match and entry.is_file():
            yield ProviderPackage(
                hostname, namespace, type_name, match[1], match[2].lower(), "packed", entry
            )
        elif _VERSION.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
            for target in sorted(entry.iterdir()):
                if (
                    _PLATFORM.fullmatch(target.name)
                    and target.is_dir()
                    and _has_executable(target, type_name)
                ):
                    yield ProviderPackage(
                        hostname, namespace, type_name, entry.name, target.name, "unpacked", target
                    )


def _has_executable(directory: Path, type_name: str) -> bool:
    return any(
        _is_binary(f.name, type_name) and f.is_file() and os.access(f, os.X_OK)
        for f in directory.iterdir()
    )


# -- import -------------------------------------------------------------------


@dataclass
class _Planned:
    """A package found in the tree to import: where it is, where it goes, and
    (unpacked) its files as (source file, path inside the package)."""

    package: ProviderPackage
    shown: Path
    relative: PurePosixPath
    files: list[tuple[Path, PurePosixPath]] = field(default_factory=list)


def import_mirror(source: Path, mirror_dir: Path) -> list[ProviderPackage]:
    """Check the tree at ``source`` (what ``terraform providers mirror DIR``
    wrote on a connected machine, or an unpacked mirror) and copy its
    packages into ``mirror_dir``; returns the packages copied (in the
    mirror), leaving out those the mirror already held identical.

    Nothing is copied unless the whole tree checks out: every name fits the
    layout, every zip is a readable zip holding ``terraform-provider-TYPE*``
    at its top and no path leaving it, no symlink points out of the tree or
    at a directory, and the mirror holds no different package of the same
    provider, version and platform. Each package is written under a
    temporary name and renamed into place. ``MirrorError`` names the first
    path that is wrong and what was expected there."""
    root = _import_root(source)
    mirror = mirror_dir.expanduser().absolute()
    resolved_mirror = mirror.resolve()
    if (
        resolved_mirror == root
        or root in resolved_mirror.parents
        or resolved_mirror in root.parents
    ):
        raise MirrorError(
            f"{source} and the mirror {mirror} overlap: import from a directory outside the "
            "mirror (e.g. where `terraform providers mirror` wrote it)"
        )
    planned = _scan(root, source)
    if not planned:
        raise MirrorError(f"{source}: holds no provider package; {_EXPECTED}")
    todo = [p for p in planned if not _already_there(p, mirror)]
    return [_copy(p, mirror) for p in todo]


def _import_root(source: Path) -> Path:
    if not source.exists():
        raise MirrorError(f"{source}: no such directory")
    if not source.is_dir():
        raise MirrorError(
            f"{source}: not a directory; expected the directory `terraform providers mirror DIR` "
            "wrote (DIR)"
        )
    return source.resolve()


def _shown(root: Path, shown_root: Path, path: Path) -> Path:
    """``path`` under the source as the user named it."""
    return shown_root / path.relative_to(root)


def _kind(path: Path, root: Path, shown_root: Path) -> Literal["file", "dir"]:
    """A regular file or directory, or a symlink to a regular file inside
    the tree (copied as that file); anything else is refused."""
    shown = _shown(root, shown_root, path)
    if path.is_symlink():
        link = os.readlink(path)
        target = path.resolve()
        if target != root and root not in target.parents:
            raise MirrorError(
                f"{shown}: a symlink to {link}, outside {shown_root}; expected the files "
                "themselves (copy the mirror with `cp -rL` to resolve its symlinks)"
            )
        if not target.exists():
            raise MirrorError(f"{shown}: a symlink to {link}, which does not exist")
        if not target.is_file():
            raise MirrorError(
                f"{shown}: a symlink to the directory {link}; expected a real directory "
                "(copy the mirror with `cp -rL` to resolve its symlinks)"
            )
        return "file"
    mode = path.lstat().st_mode
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    raise MirrorError(f"{shown}: not a regular file or directory; {_EXPECTED}")


def _expect_dir(
    path: Path, root: Path, shown_root: Path, pattern: re.Pattern[str], what: str
) -> None:
    shown = _shown(root, shown_root, path)
    if _kind(path, root, shown_root) != "dir":
        raise MirrorError(f"{shown}: a file where a directory named {what} belongs; {_EXPECTED}")
    if not pattern.fullmatch(path.name):
        raise MirrorError(f"{shown}: {path.name!r} is not named {what}; {_EXPECTED}")


def _scan(root: Path, shown_root: Path) -> list[_Planned]:
    planned: list[_Planned] = []
    try:
        for host in sorted(root.iterdir()):
            _expect_dir(host, root, shown_root, _HOSTNAME, _WHAT_HOST)
            for namespace in sorted(host.iterdir()):
                _expect_dir(namespace, root, shown_root, _NAMESPACE, _WHAT_NAMESPACE)
                for type_dir in sorted(namespace.iterdir()):
                    _expect_dir(type_dir, root, shown_root, _TYPE, _WHAT_TYPE)
                    for entry in sorted(type_dir.iterdir()):
                        planned.extend(
                            _scan_entry(entry, root, shown_root, host.name, namespace.name)
                        )
    except OSError as exc:
        raise MirrorError(f"cannot read {shown_root}: {exc}") from exc
    return planned


def _scan_entry(
    entry: Path, root: Path, shown_root: Path, hostname: str, namespace: str
) -> list[_Planned]:
    """What one entry of a provider's directory holds: a packed package, an
    unpacked version directory, or a network mirror's index (checked, not
    imported: Terraform ignores it in a filesystem mirror, and another
    import would make it wrong)."""
    type_name = entry.parent.name
    shown = _shown(root, shown_root, entry)
    kind = _kind(entry, root, shown_root)
    name = entry.name
    if kind == "file" and (name == "index.json" or _VERSION_JSON.fullmatch(name)):
        _check_json(entry, shown)
        return []
    match = _packed_name(type_name).fullmatch(name)
    if kind == "file" and match:
        _check_zip(entry, shown, type_name)
        package = ProviderPackage(
            hostname, namespace, type_name, match[1], match[2].lower(), "packed", entry
        )
        return [_Planned(package, shown, package.relative_path)]
    if kind == "dir" and _VERSION.fullmatch(name):
        return [
            _scan_unpacked(target, root, shown_root, hostname, namespace)
            for target in sorted(entry.iterdir())
        ]
    if kind == "file" and name.lower().endswith(".zip"):
        raise MirrorError(
            f"{shown}: not a package name for {namespace}/{type_name}; expected "
            f"terraform-provider-{type_name}_VERSION_OS_ARCH.zip "
            f"(e.g. terraform-provider-{type_name}_1.2.3_linux_amd64.zip)"
        )
    if kind == "dir":
        raise MirrorError(
            f"{shown}: {name!r} is not a version; expected a version directory "
            f"(e.g. {namespace}/{type_name}/1.2.3/linux_amd64/) or the packages' zip files; "
            f"{_EXPECTED}"
        )
    raise MirrorError(
        f"{shown}: unexpected file; a provider's directory holds terraform-provider-"
        f"{type_name}_VERSION_OS_ARCH.zip packages, index.json, VERSION.json and unpacked "
        "VERSION/OS_ARCH/ directories only"
    )


def _check_json(path: Path, shown: Path) -> None:
    try:
        value = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise MirrorError(
            f"{shown}: not valid JSON ({exc}); expected the index `terraform providers mirror` "
            "writes (or leave the file out)"
        ) from None
    if not isinstance(value, dict):
        raise MirrorError(
            f"{shown}: expected a JSON object, as `terraform providers mirror` writes "
            "(or leave the file out)"
        )


def _check_zip(path: Path, shown: Path, type_name: str) -> None:
    """A readable zip with ``terraform-provider-TYPE*`` at its top, nothing
    leaving the directory it is extracted into, and no symlink."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            for info in infos:
                member = info.filename
                parts = PurePosixPath(member).parts
                if member.startswith("/") or "\\" in member or ".." in parts or ":" in member:
                    raise MirrorError(
                        f"{shown}: holds {member!r}, a path leaving the directory it is "
                        "extracted into; expected the provider's release zip"
                    )
                if stat.S_ISLNK(info.external_attr >> 16):
                    raise MirrorError(
                        f"{shown}: holds the symlink {member!r}; expected the provider's "
                        "release zip (plain files)"
                    )
            binaries = [
                i
                for i in infos
                if not i.is_dir() and "/" not in i.filename and _is_binary(i.filename, type_name)
            ]
            if not binaries:
                held = ", ".join(i.filename for i in infos[:5]) or "nothing"
                raise MirrorError(
                    f"{shown}: holds no terraform-provider-{type_name}* file at its top (it "
                    f"holds {held}); expected the provider's release zip"
                )
            corrupt = archive.testzip()
            if corrupt is not None:
                raise MirrorError(f"{shown}: {corrupt} in it is corrupt; copy the file again")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as exc:
        raise MirrorError(
            f"{shown}: not a readable zip file ({exc}); expected the provider's release zip, "
            "as `terraform providers mirror` downloads it"
        ) from None


def _scan_unpacked(
    target: Path, root: Path, shown_root: Path, hostname: str, namespace: str
) -> _Planned:
    """An unpacked package: VERSION/OS_ARCH/ with terraform-provider-TYPE*
    among its files (subdirectories allowed, symlinks inside the tree
    copied as their files)."""
    version_dir = target.parent
    type_name = version_dir.parent.name
    shown = _shown(root, shown_root, target)
    if _kind(target, root, shown_root) != "dir" or not _PLATFORM.fullmatch(target.name):
        raise MirrorError(
            f"{shown}: expected a platform directory named OS_ARCH (e.g. linux_amd64) "
            f"holding terraform-provider-{type_name}*; {_EXPECTED}"
        )
    files: list[tuple[Path, PurePosixPath]] = []
    for directory, dirnames, filenames in os.walk(target):
        here = Path(directory)
        for name in sorted(dirnames + filenames):
            path = here / name
            if _kind(path, root, shown_root) == "file":
                files.append((path, PurePosixPath(path.relative_to(target).as_posix())))
        dirnames.sort()
    if not any(len(rel.parts) == 1 and _is_binary(rel.name, type_name) for _, rel in files):
        raise MirrorError(
            f"{shown}: holds no terraform-provider-{type_name}* file; expected the provider's "
            "executable (and the other files of its release zip) there"
        )
    package = ProviderPackage(
        hostname, namespace, type_name, version_dir.name, target.name, "unpacked", target
    )
    return _Planned(package, shown, package.relative_path, sorted(files, key=lambda f: f[1]))


def _already_there(planned: _Planned, mirror: Path) -> bool:
    """Whether the mirror holds this package already, identical; a different
    one is refused rather than replaced (its hashes would no longer match
    what templates' lock files recorded)."""
    dest = mirror / planned.relative
    if not os.path.lexists(dest):
        return False
    package = planned.package
    if package.layout == "packed":
        same = dest.is_file() and filecmp.cmp(package.path, dest, shallow=False)
    else:
        same = dest.is_dir() and _same_tree(planned.files, dest)
    if same:
        return True
    raise MirrorError(
        f"{planned.shown}: the mirror already holds a different {package.source} "
        f"{package.version} for {package.platform} at {dest}; remove that one first if this "
        "one should replace it"
    )


def _same_tree(files: list[tuple[Path, PurePosixPath]], dest: Path) -> bool:
    there = sorted(
        PurePosixPath(p.relative_to(dest).as_posix()) for p in dest.rglob("*") if not p.is_dir()
    )
    if there != [rel for _, rel in files]:
        return False
    return all(filecmp.cmp(src, dest / rel, shallow=False) for src, rel in files)


def _copy(planned: _Planned, mirror: Path) -> ProviderPackage:
    package = planned.package
    dest = mirror / planned.relative
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        if package.layout == "packed":
            _copy_file_atomically(package.path, dest)
        else:
            _copy_dir_atomically(planned.files, dest, package.type)
    except OSError as exc:
        raise MirrorError(f"cannot write {dest} into the mirror {mirror}: {exc}") from exc
    return ProviderPackage(
        package.hostname,
        package.namespace,
        package.type,
        package.version,
        package.platform,
        package.layout,
        dest,
    )


def _copy_file_atomically(source: Path, dest: Path) -> None:
    # A dot name with a suffix Terraform's mirror search ignores.
    fd, temp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, source.open("rb") as data:
            shutil.copyfileobj(data, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o644)
        os.rename(temp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


def _copy_dir_atomically(
    files: list[tuple[Path, PurePosixPath]], dest: Path, type_name: str
) -> None:
    # A sibling of OS_ARCH whose name is no platform: Terraform ignores it.
    temp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        for source, rel in files:
            target = temp.joinpath(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out, source.open("rb") as data:
                shutil.copyfileobj(data, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            # The provider must be executable even when its bits were lost on
            # the way (a FAT stick, a zip tool); the rest keeps its own.
            executable = (len(rel.parts) == 1 and _is_binary(rel.name, type_name)) or bool(
                source.stat().st_mode & 0o111
            )
            os.chmod(target, 0o755 if executable else 0o644)
        for directory in [temp, *(p for p in temp.rglob("*") if p.is_dir())]:
            os.chmod(directory, 0o755)  # noqa: S103 - builds may run as another user
        os.rename(temp, dest)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


# -- help ---------------------------------------------------------------------


def _address(source: str) -> tuple[str, str, str]:
    """``[HOSTNAME/][NAMESPACE/]TYPE`` as Terraform reads it (no namespace:
    hashicorp)."""
    parts = source.strip().split("/")
    if len(parts) == 1:
        return DEFAULT_HOSTNAME, "hashicorp", parts[0]
    if len(parts) == 2:
        return DEFAULT_HOSTNAME, parts[0], parts[1]
    return parts[0], parts[1], "/".join(parts[2:])


def missing_provider_help(source: str, constraint: str | None, mirror_dir: Path) -> str:
    """What to tell the author of a template whose provider ``source``
    (``hashicorp/random``; ``constraint`` like ``~> 3.0``, None for any
    version) the mirror at ``mirror_dir`` lacks: what the mirror has of that
    provider, and how an operator adds it."""
    hostname, namespace, type_name = _address(source)
    wanted = (hostname.lower(), namespace.lower(), type_name.lower())
    try:
        have = [
            p
            for p in list_providers(mirror_dir)
            if (p.hostname.lower(), p.namespace.lower(), p.type.lower()) == wanted
        ]
    except MirrorError as exc:
        have = []
        unreadable = f" (and it cannot be read: {exc})"
    else:
        unreadable = ""
    name = _source(hostname, namespace, type_name)
    versions = f' version "{constraint}"' if constraint else " (any version)"
    held = ", ".join(f"{p.version} ({p.platform}, {p.layout})" for p in have) or "nothing"
    platform_name = current_platform()
    return (
        f"The provider {name}{versions} is not in the provider mirror {mirror_dir}"
        f"{unreadable}; builds install providers from that mirror only.\n"
        f"The mirror has of {name}: {held}.\n"
        "To add it: on a machine with internet access, in the template's directory, run\n"
        f"  terraform providers mirror -platform={platform_name} DIR\n"
        "carry DIR across to this site, then on the server (or the provisioner daemon's host) "
        "run\n"
        "  stockade terraform mirror import DIR"
    )
