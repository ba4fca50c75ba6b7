"""How the agent gets into a workspace: a bundle and a bootstrap script.

A workspace image needs only ``/bin/sh`` and ``python3`` (3.9 or newer). Its
init process is :data:`BOOTSTRAP_SCRIPT`, which fetches the agent bundle from
the control plane (never from a public index), caches it under
``$HOME/.cache/stockade/agent-<sha256>.pyz``, verifies its sha256 and runs it.

The bundle (:func:`build_bundle`) is a zipapp holding ``stockade/agent/*.py``,
the pure-Python ``wsproto`` and ``h11`` packages, and what the agent's SSH
server (:mod:`stockade.agent.ssh`) needs: ``asyncssh``, ``typing_extensions``,
``cryptography`` (with its native ``_rust.abi3.so``) and cffi's native
``_cffi_backend`` for each CPython version available. Everything comes from
what is installed next to the server, at run time, offline: nothing is ever
downloaded. The ``_cffi_backend`` of the server's own interpreter comes from
its site-packages; those of other CPython versions from the wheelhouse
:func:`agent_wheels_dir` (``<venv>/agent-wheels``, filled at install time by
``./dev``, which runs ``pip download cffi==<installed> --only-binary=:all:``
for each version), when it is there. The extension files' names carry their
ABI tag, so they live side by side in one directory.

Which workspaces get SSH: CPython of a version that has a ``_cffi_backend``
in the bundle and is at least the floor of the installed cryptography wheel's
``cpXY-abi3`` tag (asyncssh itself needs 3.10); the CPU architecture of the
server (cryptography's wheel is for one); and glibc at least the wheel's
``manylinux_2_NN`` tag (read from its dist-info ``WHEEL`` file). With the
pinned cryptography 50.0.2 on x86_64 that is CPython 3.11 and newer (3.11 to
3.14 with the wheelhouse, 3.11 alone without), x86_64, glibc 2.34 or newer
(Debian 12, Ubuntu 22.04, RHEL 9 and later). :func:`native_support` says it
for the running server. Anywhere else the agent still runs, without SSH
(:func:`stockade.agent.ssh.ssh_available` gives the reason).

Native extensions cannot be imported from inside a zip, so the bundle's
``__main__.py`` extracts the bundle once into ``agent-<id>/`` next to the
``.pyz`` (else under ``$HOME/.cache/stockade``, else the temp dir): into a
temporary directory first, then renamed into place, so that concurrent starts
are safe and a restart reuses it. That directory goes first on ``sys.path``;
when extraction is impossible the agent runs from the zip (without SSH).
Extracted directories of other bundles unused for a day are removed.

The bundle is deterministic (sorted entries, fixed timestamps and modes), so
its sha256 only changes when its code does.

The server serves it at :data:`BUNDLE_PATH` with the sha256 in the
:data:`SHA256_HEADER` response header (GET and HEAD), and a backend that knows
the sha256 puts it in the workspace's ``STOCKADE_AGENT_BUNDLE_SHA256``: a
workspace restart then runs the cached bundle without asking the server.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import io
import os
import platform
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

BUNDLE_PATH = "/api/v2/agent/bundle.pyz"
SHA256_HEADER = "X-Stockade-Sha256"
BUNDLE_SHA256_ENV = "STOCKADE_AGENT_BUNDLE_SHA256"

# The pure-Python packages the agent needs besides the standard library.
VENDORED = ("wsproto", "h11")
# What the SSH server needs: distributions whose files go in the bundle.
SSH_DISTRIBUTIONS = ("asyncssh", "cryptography", "typing_extensions", "cffi")
# Where ./dev puts other CPython versions' cffi wheels (see the docstring).
AGENT_WHEELS_ENV = "STOCKADE_AGENT_WHEELS"
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_SHEBANG = b"#!/usr/bin/env python3\n"
_CFFI_BACKEND = re.compile(r"^_cffi_backend\.cpython-3(\d+)-([A-Za-z0-9_]+)-linux-gnu\.so$")

# The bundle's entry point (Python 3.9+, standard library only). __BUNDLE_ID__
# is replaced by a digest of every other file of the bundle.
_MAIN = r'''
"""Stockade workspace agent bundle: ``python3 agent.pyz``.

Extracts the bundle once (native extensions cannot be imported from a zip),
puts the extracted directory first on sys.path, then runs the agent. See
stockade.agent.bundle for the details.
"""
import os
import shutil
import sys
import tempfile
import time
import zipfile

BUNDLE_ID = "__BUNDLE_ID__"
COMPLETE = ".complete"
STALE_SECONDS = 86400


def _parents(bundle):
    yield os.path.dirname(os.path.abspath(bundle))
    home = os.environ.get("HOME")
    if home:
        yield os.path.join(home, ".cache", "stockade")
    yield os.path.join(tempfile.gettempdir(), "stockade-%d" % os.getuid())


def _remove_stale(parent, keep):
    # Other bundles' directories nobody started from for a day.
    try:
        names = os.listdir(parent)
    except OSError:
        return
    now = time.time()
    for name in names:
        path = os.path.join(parent, name)
        if name == keep or not (name.startswith("agent-") or name.startswith(".agent-")):
            continue
        if not os.path.isdir(path) or os.path.islink(path):
            continue
        marker = os.path.join(path, COMPLETE)
        try:
            age = now - os.stat(marker if os.path.exists(marker) else path).st_mtime
        except OSError:
            continue
        if age > STALE_SECONDS:
            shutil.rmtree(path, ignore_errors=True)


def extract(bundle):
    """The directory holding the bundle's files (extracted if needed), or None."""
    name = "agent-" + BUNDLE_ID
    for parent in _parents(bundle):
        target = os.path.join(parent, name)
        marker = os.path.join(target, COMPLETE)
        if os.path.isfile(marker):
            try:
                os.utime(marker)
            except OSError:
                pass
            return target
        tmp = None
        try:
            os.makedirs(parent, mode=0o700, exist_ok=True)
            tmp = tempfile.mkdtemp(prefix="." + name + ".tmp-", dir=parent)
            with zipfile.ZipFile(bundle) as archive:
                for info in archive.infolist():
                    path = archive.extract(info, tmp)
                    os.chmod(path, (info.external_attr >> 16) & 0o777 or 0o644)
            with open(os.path.join(tmp, COMPLETE), "w"):
                pass
            try:
                os.rename(tmp, target)
                tmp = None
            except OSError:
                pass  # another start won the race: use its directory
            if os.path.isfile(marker):
                _remove_stale(parent, name)
                return target
        except (OSError, zipfile.BadZipFile):
            pass
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return None


def prepare():
    """Put the extracted bundle first on sys.path; its directory, or None."""
    bundle = os.path.dirname(os.path.abspath(__file__))
    directory = extract(bundle)
    if directory is not None:
        sys.path.insert(0, directory)
    return directory


if __name__ == "__main__":
    prepare()
    from stockade.agent import main

    sys.exit(main())
'''.lstrip()
_PACKAGE_INIT = '''\
"""Stockade: only the workspace agent, in its bundle."""
'''


@dataclass(frozen=True)
class NativeSupport:
    """Where the bundle's SSH server can run, read from the installed wheels."""

    python_floor: tuple[int, int]
    python_versions: tuple[str, ...]
    architecture: str
    glibc: str


def _distribution_files(distribution: str) -> list[Path]:
    dist = importlib.metadata.distribution(distribution)
    return [Path(str(dist.locate_file(file))) for file in dist.files or []]


def _wheel_tags(distribution: str) -> list[str]:
    dist = importlib.metadata.distribution(distribution)
    text = dist.read_text("WHEEL") or ""
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Tag:")]


def agent_wheels_dir() -> Path:
    """The wheelhouse of other CPython versions' cffi wheels."""
    configured = os.environ.get(AGENT_WHEELS_ENV, "").strip()
    return Path(configured) if configured else Path(sys.prefix) / "agent-wheels"


def _cryptography_floor() -> tuple[tuple[int, int], str, str]:
    """(minimum CPython, glibc, architecture) of the installed cryptography."""
    for tag in _wheel_tags("cryptography"):
        python, abi, platform_tag = tag.split("-", 2)
        match = re.fullmatch(r"cp3(\d+)", python)
        glibc = re.match(r"manylinux_(\d+)_(\d+)_(\w+)$", platform_tag)
        if abi == "abi3" and match and glibc:
            return (3, int(match.group(1))), f"{glibc.group(1)}.{glibc.group(2)}", glibc.group(3)
    # Not an abi3 manylinux wheel (built from source?): this interpreter only.
    return sys.version_info[:2], platform.libc_ver()[1] or "unknown", platform.machine()


def _cffi_backends() -> dict[str, bytes]:
    """``_cffi_backend`` extensions by file name: this interpreter's, plus
    those in the wheelhouse's cffi wheels of the installed cffi version."""
    floor, _, arch = _cryptography_floor()
    found: dict[str, bytes] = {}
    for path in _distribution_files("cffi"):
        match = _CFFI_BACKEND.match(path.name)
        if match and path.is_file():
            found[path.name] = path.read_bytes()
    version = importlib.metadata.version("cffi")
    wheels = agent_wheels_dir()
    candidates = sorted(wheels.glob(f"cffi-{version}-cp3*-*.whl")) if wheels.is_dir() else []
    for wheel in candidates:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                match = _CFFI_BACKEND.match(name)
                if match and name not in found:
                    found[name] = archive.read(name)
    return {
        name: data
        for name, data in found.items()
        if (match := _CFFI_BACKEND.match(name))
        and (3, int(match.group(1))) >= floor
        and match.group(2) == arch
    }


_SPEEDUPS = re.compile(r"^speedups\.cpython-3(\d+)-([A-Za-z0-9_]+)-linux-gnu\.so$")
# websockets' C extension (BSD-3-Clause) holds apply_mask, which the agent
# uses to mask the frames it sends (RFC 6455: clients mask everything) 30
# times faster than wsproto's pure Python: masking was a quarter of the
# agent's CPU time in the SSH bulk benchmark. Its module init is
# PyInit_speedups, so it imports as ``stockade_speedups.speedups``.
SPEEDUPS_PACKAGE = "stockade_speedups"


def _mask_speedups() -> dict[str, bytes]:
    """websockets' ``speedups`` extension for this interpreter and for the
    wheelhouse's websockets wheels of the installed version, by bundle path."""
    found: dict[str, bytes] = {}
    for path in _distribution_files("websockets"):
        if _SPEEDUPS.match(path.name) and path.is_file():
            found[path.name] = path.read_bytes()
    version = importlib.metadata.version("websockets")
    wheels = agent_wheels_dir()
    candidates = sorted(wheels.glob(f"websockets-{version}-cp3*-*.whl")) if wheels.is_dir() else []
    for wheel in candidates:
        with zipfile.ZipFile(wheel) as archive:
            for name in archive.namelist():
                base = name.rpartition("/")[2]
                if name.startswith("websockets/") and _SPEEDUPS.match(base):
                    found.setdefault(base, archive.read(name))
    if not found:
        return {}
    files = {f"{SPEEDUPS_PACKAGE}/{name}": data for name, data in found.items()}
    files[f"{SPEEDUPS_PACKAGE}/__init__.py"] = (
        b'"""websockets\' C speedups (apply_mask), for the agent\'s WebSocket client."""\n'
    )
    return files


def native_support() -> NativeSupport:
    """Which workspaces the bundle built here gives SSH to."""
    floor, glibc, arch = _cryptography_floor()
    versions = sorted(
        (int(m.group(1)) for name in _cffi_backends() if (m := _CFFI_BACKEND.match(name))),
    )
    return NativeSupport(floor, tuple(f"3.{minor}" for minor in versions), arch, glibc)


def _package_files(module: ModuleType, prefix: str) -> dict[str, bytes]:
    """The ``.py`` files of an installed package, by their name in the zip."""
    if module.__file__ is None:
        raise RuntimeError(f"{module.__name__} is not installed as files")
    root = Path(module.__file__).parent
    return {
        f"{prefix}/{path.relative_to(root).as_posix()}": path.read_bytes()
        for path in root.rglob("*.py")
        if "__pycache__" not in path.parts
    }


def _ssh_files() -> dict[str, bytes]:
    """asyncssh, cryptography (``.py`` and its ``.so``) and typing_extensions
    as installed, plus the ``_cffi_backend`` extensions."""
    files: dict[str, bytes] = {}
    for distribution in ("asyncssh", "cryptography", "typing_extensions"):
        dist = importlib.metadata.distribution(distribution)
        for file in dist.files or []:
            name = file.as_posix()
            if ".dist-info/" in name or "__pycache__" in name or name.startswith("../"):
                continue
            if name.endswith(".py") or name.endswith(".so"):
                files[name] = Path(str(dist.locate_file(file))).read_bytes()
    files.update(_cffi_backends())
    return files


def _license_files(distribution: str) -> dict[str, bytes]:
    """The license texts of an installed distribution (they go along)."""
    found: dict[str, bytes] = {}
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return found
    for file in dist.files or []:
        name = Path(str(file)).name
        if "LICEN" in name.upper() or "COPYING" in name.upper():
            found[f"licenses/{distribution}/{name}"] = Path(
                str(dist.locate_file(file))
            ).read_bytes()
    return found


def bundle_id(files: dict[str, bytes]) -> str:
    """A digest of the bundle's files: names the extracted directory."""
    digest = hashlib.sha256()
    for name, data in sorted(files.items()):
        digest.update(hashlib.sha256(name.encode()).digest())
        digest.update(hashlib.sha256(data).digest())
    return digest.hexdigest()[:32]


def bundle_files() -> dict[str, bytes]:
    """Every file of the bundle, by its path inside the zip."""
    import h11
    import wsproto

    import stockade.agent

    files = {"stockade/__init__.py": _PACKAGE_INIT.encode()}
    agent_dir = Path(stockade.agent.__file__ or "").parent
    for path in sorted(agent_dir.glob("*.py")):
        files[f"stockade/agent/{path.name}"] = path.read_bytes()
    # The stream protocol the agent shares with the server and the CLI, and
    # the egress guard it shares with the server.
    for shared in ("tunnel", "egress"):
        for path in sorted((agent_dir.parent / shared).glob("*.py")):
            files[f"stockade/{shared}/{path.name}"] = path.read_bytes()
    for module in (wsproto, h11):
        files.update(_package_files(module, module.__name__))
    files.update(_ssh_files())
    files.update(_mask_speedups())
    for name in (*VENDORED, *SSH_DISTRIBUTIONS, "websockets"):
        files.update(_license_files(name))
    files["__main__.py"] = _MAIN.replace("__BUNDLE_ID__", bundle_id(files)).encode()
    return files


def build_bundle(path: str | os.PathLike[str] | None = None) -> bytes:
    """Build the agent bundle (a zipapp) and return its bytes; also write it to
    ``path`` when given. Same code in, same bytes out."""
    buffer = io.BytesIO()
    buffer.write(_SHEBANG)
    # Like zipapp: the shebang, then the zip (offsets count from its start).
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in sorted(bundle_files().items()):
            info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, whatever builds it
            native = name.endswith(".so")
            info.external_attr = (0o100755 if native else 0o100644) << 16
            # Level 9 gains 1% on the 14 MB extension and takes 3x as long.
            archive.writestr(info, data, compresslevel=6 if native else 9)
    data = buffer.getvalue()
    if path is not None:
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(data)
        tmp.chmod(0o644)
        tmp.replace(target)
    return data


@functools.lru_cache(maxsize=1)
def agent_bundle() -> tuple[bytes, str]:
    """The bundle for this server process and its sha256 (hex), built once."""
    data = build_bundle()
    return data, hashlib.sha256(data).hexdigest()


# The workspace's init process: POSIX sh, with python3's urllib for the
# download (the images have no curl). It never touches STOCKADE_AGENT_TOKEN
# (the download runs without it in its environment) and execs the agent,
# which takes the token out of its own environment.
_FETCH = r"""
import hashlib, os, random, ssl, sys, time, urllib.error, urllib.request

def log(message):
    sys.stderr.write("stockade-bootstrap: " + message + "\n")
    sys.stderr.flush()

def sha256_of(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 16), b""):
            digest.update(chunk)
    return digest.hexdigest()

base = os.environ["STOCKADE_ACCESS_URL"].rstrip("/")
url = base + "__BUNDLE_PATH__"
cache = os.path.join(os.environ.get("HOME") or "/tmp", ".cache", "stockade")
pinned = os.environ.get("__SHA_ENV__", "").strip().lower()
ca_file = os.environ.get("STOCKADE_AGENT_CA_FILE", "").strip()
context = ssl.create_default_context(cafile=ca_file) if ca_file else None

def cached(sha):
    path = os.path.join(cache, "agent-" + sha + ".pyz")
    if os.path.isfile(path) and sha256_of(path) == sha:
        return path
    return None

def done(path):
    sys.stdout.write(path + "\n")
    sys.exit(0)

def fetch(method):
    request = urllib.request.Request(url, method=method)
    with urllib.request.urlopen(request, timeout=30, context=context) as response:
        sha = (response.headers.get("__SHA_HEADER__") or "").strip().lower()
        return sha, (response.read() if method == "GET" else b"")

if pinned and cached(pinned):
    done(cached(pinned))
delay = 0.5
while True:
    try:
        if not pinned:
            try:
                current, _ = fetch("HEAD")
            except (urllib.error.URLError, OSError):
                current = ""  # no HEAD here, or the server is down: the GET tells
            if current and cached(current):
                done(cached(current))
        sent_sha, body = fetch("GET")
        break
    except urllib.error.HTTPError as exc:
        if 400 <= exc.code < 500 and exc.code not in (408, 429):
            log("error: " + url + " answered HTTP " + str(exc.code) + ": cannot get the agent")
            sys.exit(1)
        problem = "HTTP " + str(exc.code)
    except (urllib.error.URLError, OSError) as exc:
        problem = str(getattr(exc, "reason", None) or exc)
    wait = delay * random.uniform(0.5, 1.0)
    log("control plane unreachable at " + base + " (" + problem + "); retrying in %.1fs" % wait)
    time.sleep(wait)
    delay = min(delay * 2, 10.0)

expected = pinned or sent_sha
actual = hashlib.sha256(body).hexdigest()
if not expected:
    log("error: no sha256 to verify the agent bundle with (neither __SHA_ENV__ "
        "nor a __SHA_HEADER__ header): refusing to run it")
    sys.exit(1)
if actual != expected:
    log("error: the agent bundle from " + url + " has sha256 " + actual + ", expected "
        + expected + ": refusing to run it")
    sys.exit(1)
os.makedirs(cache, mode=0o700, exist_ok=True)
path = os.path.join(cache, "agent-" + actual + ".pyz")
tmp = path + ".tmp-" + str(os.getpid())
with open(tmp, "wb") as f:
    f.write(body)
os.replace(tmp, path)
for name in os.listdir(cache):
    if name.startswith("agent-") and name.endswith(".pyz") and name != os.path.basename(path):
        try:
            os.remove(os.path.join(cache, name))
        except OSError:
            pass
log("agent bundle " + actual[:12] + " downloaded (" + str(len(body)) + " bytes)")
done(path)
"""

_FETCH = (
    _FETCH.replace("__BUNDLE_PATH__", BUNDLE_PATH)
    .replace("__SHA_ENV__", BUNDLE_SHA256_ENV)
    .replace("__SHA_HEADER__", SHA256_HEADER)
)
if "'" in _FETCH:  # pragma: no cover - guards the quoting below
    raise RuntimeError("the bootstrap's Python must not contain single quotes")

BOOTSTRAP_SCRIPT = f"""\
#!/bin/sh
# Stockade workspace bootstrap: get the agent from the control plane, run it.
log() {{ printf 'stockade-bootstrap: %s\\n' "$*" >&2; }}
PYTHON=$(command -v python3 2>/dev/null)
if [ -z "$PYTHON" ]; then
  log "error: python3 is not installed in this workspace image;" \
    "the Stockade agent needs Python 3.9 or newer"
  exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 9) else 1)' 2>/dev/null; then
  log "error: $("$PYTHON" -V 2>&1) at $PYTHON is too old;" \
    "the Stockade agent needs Python 3.9 or newer"
  exit 1
fi
if [ -z "${{STOCKADE_ACCESS_URL:-}}" ]; then
  log "error: STOCKADE_ACCESS_URL is not set: the agent does not know where the control plane is"
  exit 1
fi
FETCH='{_FETCH}'
BUNDLE=$(unset STOCKADE_AGENT_TOKEN; "$PYTHON" -c "$FETCH") || exit 1
exec "$PYTHON" "$BUNDLE"
"""
