"""How the agent gets into a workspace: a bundle and a bootstrap script.

A workspace image needs only ``/bin/sh`` and ``python3`` (3.9 or newer). Its
init process is :data:`BOOTSTRAP_SCRIPT`, which fetches the agent bundle from
the control plane (never from a public index), caches it under
``$HOME/.cache/stockade/agent-<sha256>.pyz``, verifies its sha256 and runs it.

The bundle (:func:`build_bundle`) is a zipapp holding ``stockade/agent/*.py``
and the pure-Python ``wsproto`` and ``h11`` packages installed next to the
server. It is deterministic (sorted entries, fixed timestamps and modes), so
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
import zipfile
from pathlib import Path
from types import ModuleType

BUNDLE_PATH = "/api/v2/agent/bundle.pyz"
SHA256_HEADER = "X-Stockade-Sha256"
BUNDLE_SHA256_ENV = "STOCKADE_AGENT_BUNDLE_SHA256"

# The packages the agent needs besides the standard library.
VENDORED = ("wsproto", "h11")
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)
_SHEBANG = b"#!/usr/bin/env python3\n"

_MAIN = '''\
"""Stockade workspace agent bundle: ``python3 agent.pyz``."""
import sys

from stockade.agent import main

sys.exit(main())
'''
_PACKAGE_INIT = '''\
"""Stockade: only the workspace agent, in its bundle."""
'''


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


def _license_files(distribution: str) -> dict[str, bytes]:
    """The license texts of an installed distribution (MIT: they go along)."""
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


def bundle_files() -> dict[str, bytes]:
    """Every file of the bundle, by its path inside the zip."""
    import h11
    import wsproto

    import stockade.agent

    files = {"__main__.py": _MAIN.encode(), "stockade/__init__.py": _PACKAGE_INIT.encode()}
    agent_dir = Path(stockade.agent.__file__ or "").parent
    for path in sorted(agent_dir.glob("*.py")):
        files[f"stockade/agent/{path.name}"] = path.read_bytes()
    for module in (wsproto, h11):
        files.update(_package_files(module, module.__name__))
    for name in VENDORED:
        files.update(_license_files(name))
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
            info.external_attr = 0o100644 << 16
            archive.writestr(info, data, compresslevel=9)
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
