"""Building a bundle on a connected machine: Stockade's wheel and every
dependency's for the chosen CPython versions and platforms, the agent's extra
wheels, the workspace images, the starter templates, an optional Terraform
provider mirror; then SHA256SUMS, its Ed25519 signature, and one plain tar
written atomically.

Wheels come through ``pip download`` with pip's own configuration (its index
is the site's mirror on a connected machine); images from the local Docker
daemon (never pulled)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from stockade.airgap.errors import BundleError, docker_client
from stockade.airgap.keys import fingerprint, load_private_key, public_pem
from stockade.airgap.manifest import (
    AGENT_WHEELS,
    HEAD,
    IMAGES,
    METADATA,
    README,
    SIGNATURE,
    SIGNER,
    SUMS,
    TEMPLATES,
    TERRAFORM_MIRROR,
    TOP,
    WHEELS,
    BundleInfo,
    ImageInfo,
    format_sums,
    path_problem,
    sha256_file,
)
from stockade.sdk.starters import STARTERS, starter_manifest, write_starter

Log = Callable[[str], None]

# The CPython versions a workspace's agent may run, as ./dev's AGENT_PYTHONS:
# the agent bundle takes their cffi and websockets wheels from agent-wheels/.
AGENT_PYTHONS = ("3.11", "3.12", "3.13", "3.14")
AGENT_PACKAGES = ("cffi", "websockets")
_PYTHON = re.compile(r"^3\.\d{1,2}$")
_PLATFORM_TAG = re.compile(r"^[a-z0-9_]+$")
# The architecture at the end of a Linux platform tag; one pip run per
# architecture, since pip picks one wheel per package for all --platform values.
_LINUX_PLATFORM = re.compile(
    r"^(?:manylinux1|manylinux2010|manylinux2014|manylinux_\d+_\d+|musllinux_\d+_\d+|linux)_(\w+)$"
)
_WHEEL_NAME = re.compile(r"^stockade-([^-]+)-[^-]+-[^-]+-[^-]+\.whl$")


@dataclass
class BundleOptions:
    """What ``stockade airgap bundle`` was asked for (empty lists: the defaults)."""

    output: Path
    signing_key: Path
    python_versions: Sequence[str] = ()
    platforms: Sequence[str] = ()
    images: Sequence[str] = ()
    include_images: bool = True
    terraform_mirror: Path | None = None
    stockade_wheel: Path | None = None
    agent_python_versions: Sequence[str] = field(default_factory=lambda: AGENT_PYTHONS)


@dataclass(frozen=True)
class BundleSummary:
    """What was written."""

    path: Path
    files: int
    size: int
    seconds: float
    fingerprint: str
    info: BundleInfo


def default_python() -> str:
    """The running interpreter's ``X.Y``."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def default_platforms() -> list[str]:
    """This machine's manylinux tag, as ./dev uses: ``manylinux2014_<machine>``
    (glibc 2.17 or newer), which every pinned dependency ships on x86_64."""
    return [f"manylinux2014_{platform.machine()}"]


def default_images() -> list[str]:
    """The image the docker starter template uses."""
    image = starter_manifest("docker").compute.image
    return [image] if image else []


def _nothing(_: str) -> None:
    return None


def _pip_error(output: str) -> str:
    """The line of pip's output that says what went wrong."""
    errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR:")]
    for line in errors:
        if "No matching distribution" in line:
            return line.removeprefix("ERROR: ")
    if errors:
        return errors[0].removeprefix("ERROR: ")
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def _run(command: list[str], what: str, *, cwd: Path | None = None) -> str:
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=cwd, check=False, stdin=subprocess.DEVNULL
        )
    except OSError as exc:
        raise BundleError(f"{what}: cannot run {command[0]}: {exc.strerror}") from exc
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise BundleError(f"{what}: {_pip_error(output)}")
    return output


def _pip(*args: str) -> list[str]:
    return [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-input"]


def _installed_origin() -> Path | None:
    """Where the running Stockade was installed from, when that was a local
    directory (an editable or source install) or a local wheel file."""
    try:
        text = importlib.metadata.distribution("stockade").read_text("direct_url.json")
    except importlib.metadata.PackageNotFoundError:
        return None
    if not text:
        return None
    url = str(json.loads(text).get("url", ""))
    parts = urlsplit(url)
    if parts.scheme != "file":
        return None
    return Path(unquote(parts.path))


def _build_wheel(source: Path, scratch: Path, log: Log) -> Path:
    """``pip wheel --no-deps`` of a copy of the source checkout: building in
    place would leave build/ and egg-info behind in it (and build/ can carry
    stale modules into the wheel)."""
    if not (source / "pyproject.toml").is_file() or not (source / "src").is_dir():
        raise BundleError(
            f"{source} (where Stockade is installed from) is not a source checkout with "
            "pyproject.toml and src/: pass --stockade-wheel FILE"
        )
    log(f"building the Stockade wheel from {source}")
    copy = scratch / "source"
    copy.mkdir()
    for item in source.iterdir():
        if item.is_file() and not item.is_symlink():
            shutil.copy2(item, copy / item.name)
    shutil.copytree(
        source / "src",
        copy / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
    )
    dist = scratch / "dist"
    _run(_pip("wheel", "--no-deps", "-q", "-w", str(dist), str(copy)), "building Stockade's wheel")
    wheels = sorted(dist.glob("stockade-*.whl"))
    if len(wheels) != 1:
        raise BundleError(f"building Stockade's wheel in {dist} gave {len(wheels)} wheels, not 1")
    return wheels[0]


def _stockade_wheel(options: BundleOptions, scratch: Path, log: Log) -> Path:
    wheel = options.stockade_wheel
    if wheel is None:
        origin = _installed_origin()
        if origin is None:
            raise BundleError(
                "this Stockade was not installed from a local checkout or wheel: "
                "pass --stockade-wheel FILE"
            )
        wheel = origin if origin.suffix == ".whl" else _build_wheel(origin, scratch, log)
    if not wheel.is_file():
        raise BundleError(f"{wheel}: no such wheel file")
    if not _WHEEL_NAME.match(wheel.name):
        raise BundleError(f"{wheel.name} is not a Stockade wheel (stockade-VERSION-...whl)")
    return wheel


def _arch_groups(platforms: Sequence[str]) -> list[list[str]]:
    groups: dict[str, list[str]] = {}
    for tag in platforms:
        match = _LINUX_PLATFORM.match(tag)
        groups.setdefault(match.group(1) if match else tag, []).append(tag)
    return list(groups.values())


def _target(python: str, platforms: Sequence[str]) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    for tag in platforms:
        args += ["--platform", tag]
    return args


def _download_dependencies(
    wheel: Path, pythons: Sequence[str], platforms: Sequence[str], dest: Path, log: Log
) -> None:
    for python in pythons:
        for group in _arch_groups(platforms):
            where = f"CPython {python} on {', '.join(group)}"
            log(f"downloading Stockade's dependencies for {where}")
            try:
                _run(
                    _pip("download", "-q", "-d", str(dest), *_target(python, group), str(wheel)),
                    f"no complete set of wheels for {where}",
                )
            except BundleError as exc:
                raise BundleError(
                    f"{exc} (a dependency with only newer wheels needs another --platform, "
                    "e.g. manylinux_2_28_x86_64 next to manylinux2014_x86_64)"
                ) from exc


def _download_agent_wheels(
    pythons: Sequence[str], platforms: Sequence[str], dest: Path, log: Log
) -> list[str]:
    """cffi and websockets wheels (the installed versions) for the agent's
    CPython versions; returns the versions that got cffi (which SSH needs). A
    missing wheel is a warning, as in ./dev: those workspaces run without SSH
    (cffi) or mask frames in Python (websockets)."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in AGENT_PACKAGES]
    log(f"downloading the agent's wheels ({', '.join(pins)}) for CPython {', '.join(pythons)}")
    got_cffi: list[str] = []
    for python in pythons:
        for group in _arch_groups(platforms):
            base = _pip("download", "-q", "--no-deps", "-d", str(dest), *_target(python, group))
            try:
                _run([*base, *pins], "agent wheels")
                ok = set(pins)
            except BundleError:
                ok = set()
                for pin in pins:  # one at a time, to keep the one that exists
                    try:
                        _run([*base, pin], "agent wheels")
                        ok.add(pin)
                    except BundleError as exc:
                        log(f"warning: no {pin} wheel for CPython {python} on {group[0]}: {exc}")
            if pins[0] in ok and python not in got_cffi:
                got_cffi.append(python)
    return got_cffi


def image_file_name(reference: str) -> str:
    """``images/<name>.tar`` for an image reference (``repo:tag``)."""
    return f"{IMAGES}/{re.sub(r'[^A-Za-z0-9._-]+', '_', reference)}.tar"


def _find_images(client: Any, references: Sequence[str]) -> list[tuple[str, Any]]:
    """(tag, image) for each reference, checked before anything is downloaded."""
    import docker

    found: list[tuple[str, Any]] = []
    for reference in dict.fromkeys(references):
        try:
            image = client.images.get(reference)
        except docker.errors.ImageNotFound as exc:
            raise BundleError(
                f"image {reference} is not in the local Docker daemon: build or load it "
                "there first (nothing is pulled)"
            ) from exc
        except docker.errors.DockerException as exc:
            raise BundleError(f"image {reference}: {exc}") from exc
        tags: list[str] = list(image.tags)
        tag = next((t for t in (reference, f"{reference}:latest") if t in tags), None)
        if tag is None:
            raise BundleError(
                f"image {reference}: give it by one of its tags ({', '.join(tags) or 'none'}); "
                "an image saved by id loads without a name"
            )
        found.append((tag, image))
    return found


def _save_images(images: list[tuple[str, Any]], root: Path, log: Log) -> list[ImageInfo]:
    """``docker save`` each image under its tag, so that ``docker load`` names it."""
    import docker

    saved: list[ImageInfo] = []
    for tag, image in images:
        name = image_file_name(tag)
        if any(other.file == name for other in saved):
            raise BundleError(f"images {tag} and another one would both be saved as {name}")
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        log(f"saving image {tag} ({image.id[:19]})")
        try:
            with path.open("wb") as out:
                for chunk in image.save(named=tag):
                    out.write(chunk)
        except docker.errors.DockerException as exc:
            raise BundleError(f"docker save {tag}: {exc}") from exc
        saved.append(ImageInfo(name=tag, id=image.id, file=name, size=path.stat().st_size))
    return saved


def _copy_mirror(source: Path, dest: Path, log: Log) -> None:
    if not source.is_dir():
        raise BundleError(f"--terraform-mirror {source}: not a directory")
    log(f"copying the Terraform provider mirror {source}")
    try:
        # Symlinks are followed: the bundle holds regular files only.
        shutil.copytree(source, dest, symlinks=False)
    except (shutil.Error, OSError) as exc:
        raise BundleError(f"copying --terraform-mirror {source}: {exc}") from exc


def _files(root: Path) -> list[str]:
    """Every file under ``root``, relative, '/'-separated; nothing else allowed."""
    found: list[str] = []
    for directory, subdirs, names in os.walk(root):
        subdirs.sort()
        for name in sorted(names) + [d for d in subdirs if Path(directory, d).is_symlink()]:
            path = Path(directory, name)
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not path.is_file():
                raise BundleError(f"{rel}: not a regular file; a bundle holds only files")
            problem = path_problem(rel)
            if problem:
                raise BundleError(f"{rel}: cannot go in a bundle: {problem}")
            found.append(rel)
    return found


_README_TEXT = """\
Stockade offline install bundle
===============================

Stockade {version}, made {created_at}, for CPython {pythons} on {platforms}.
Images: {images}.

It is signed with the Ed25519 key whose fingerprint (the sha256 of the raw
public key) is

    {fingerprint}

Get the public key (the .pub file of `stockade airgap keygen`) through a channel
you trust, not from this bundle: signer.pub in it is only a convenience.

1. Verify, with Stockade (any machine that has it):

    stockade airgap verify BUNDLE.tar --public-key stockade-airgap.pub

   or with standard tools only (OpenSSL 3 and coreutils), in an empty directory:

    tar -xf BUNDLE.tar && cd {top}
    openssl pkeyutl -verify -pubin -inkey /path/to/stockade-airgap.pub -rawin \\
        -in {sums} -sigfile {signature}
    sha256sum --strict -c {sums}
    # and nothing that SHA256SUMS does not list (in bash; this prints nothing):
    find . -type f ! -name {sums} ! -name {signature} | sed 's|^\\./||' | sort \\
        | comm -23 - <(sed 's/^[0-9a-f]*  //' {sums} | sort)

2. Install into a new directory, without network (it verifies again first):

    stockade airgap install BUNDLE.tar --public-key stockade-airgap.pub --prefix /opt/stockade

   On a host with no Stockade yet, take the installer from this directory first:

    python3 -m venv /tmp/stockade-installer
    /tmp/stockade-installer/bin/pip install --no-index --find-links wheels stockade=={version}
    /tmp/stockade-installer/bin/stockade airgap install BUNDLE.tar \\
        --public-key stockade-airgap.pub --prefix /opt/stockade

3. Start the server: /opt/stockade/venv/bin/stockade server --help
"""


def _readme(info: BundleInfo) -> str:
    return _README_TEXT.format(
        version=info.stockade_version,
        created_at=info.created_at,
        pythons=", ".join(info.python_versions),
        platforms=", ".join(info.platforms),
        images=", ".join(image.name for image in info.images) or "none",
        fingerprint=info.signer_fingerprint,
        top=TOP,
        sums=SUMS,
        signature=SIGNATURE,
    )


def _write_tar(root: Path, order: Sequence[str], output: Path, mtime: int) -> None:
    """The tar of ``order`` (paths under ``root``), written beside ``output``
    and renamed onto it: a reader never sees half a bundle."""
    fd, temp = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:", format=tarfile.PAX_FORMAT) as tar:
                for rel in order:
                    path = root / rel
                    info = tarfile.TarInfo(f"{TOP}/{rel}")
                    info.size = path.stat().st_size
                    info.mtime = mtime
                    info.mode = 0o644
                    info.uname = info.gname = "root"
                    with path.open("rb") as handle:
                        tar.addfile(info, handle)
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, output)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _check_options(options: BundleOptions) -> tuple[list[str], list[str]]:
    pythons = list(dict.fromkeys(options.python_versions or [default_python()]))
    platforms = list(dict.fromkeys(options.platforms or default_platforms()))
    for python in [*pythons, *options.agent_python_versions]:
        if not _PYTHON.match(python):
            raise BundleError(f"--python {python!r}: give a CPython version such as 3.11")
    for tag in platforms:
        if not _PLATFORM_TAG.match(tag):
            raise BundleError(
                f"--platform {tag!r}: give a wheel platform tag such as manylinux2014_x86_64"
            )
    output = options.output
    if output.is_dir():
        raise BundleError(f"{output} is a directory: give the bundle's file name")
    if not output.parent.is_dir():
        raise BundleError(f"{output.parent} is not a directory: create it first")
    if options.stockade_wheel is not None and not options.stockade_wheel.is_file():
        raise BundleError(f"--stockade-wheel {options.stockade_wheel}: no such file")
    if options.terraform_mirror is not None and not options.terraform_mirror.is_dir():
        raise BundleError(f"--terraform-mirror {options.terraform_mirror}: not a directory")
    return pythons, platforms


def build_bundle(options: BundleOptions, log: Log = _nothing) -> BundleSummary:
    """Build and sign a bundle into ``options.output`` (replaced atomically)."""
    started = time.monotonic()
    pythons, platforms = _check_options(options)
    # The key first: a typo should not cost minutes of downloads.
    key = load_private_key(options.signing_key)
    references = list(options.images or default_images()) if options.include_images else []
    client = (
        docker_client(BundleError, "start dockerd, or pass --no-images") if references else None
    )
    try:
        images = _find_images(client, references) if references else []
        return _build(options, pythons, platforms, key, images, started, log)
    finally:
        if client is not None:
            client.close()


def _build(
    options: BundleOptions,
    pythons: list[str],
    platforms: list[str],
    key: Ed25519PrivateKey,
    images: list[tuple[str, Any]],
    started: float,
    log: Log,
) -> BundleSummary:
    signer = fingerprint(key.public_key())
    created = datetime.now(UTC).replace(microsecond=0)
    with tempfile.TemporaryDirectory(
        dir=options.output.parent, prefix=f".{options.output.name}."
    ) as scratch_dir:
        scratch = Path(scratch_dir)
        root = scratch / TOP
        root.mkdir()
        wheel = _stockade_wheel(options, scratch, log)
        version = _WHEEL_NAME.match(wheel.name)
        assert version is not None
        _download_dependencies(wheel, pythons, platforms, root / WHEELS, log)
        if not (root / WHEELS / wheel.name).is_file():
            shutil.copy2(wheel, root / WHEELS / wheel.name)
        agent_pythons = _download_agent_wheels(
            options.agent_python_versions, platforms, root / AGENT_WHEELS, log
        )
        for backend in STARTERS:
            write_starter(root / TEMPLATES / backend, backend)
        if options.terraform_mirror is not None:
            _copy_mirror(options.terraform_mirror, root / TERRAFORM_MIRROR, log)
        saved = _save_images(images, root, log) if images else []
        info = BundleInfo(
            stockade_version=version.group(1),
            stockade_wheel=wheel.name,
            created_at=created.isoformat().replace("+00:00", "Z"),
            python_versions=pythons,
            platforms=platforms,
            agent_python_versions=agent_pythons,
            images=saved,
            templates=list(STARTERS),
            terraform_mirror=options.terraform_mirror is not None,
            signer_fingerprint=signer,
        )
        (root / METADATA).write_text(info.model_dump_json(indent=2) + "\n")
        (root / README).write_text(_readme(info))
        (root / SIGNER).write_bytes(public_pem(key.public_key()))
        files = _files(root)
        log(f"hashing and signing {len(files)} files")
        sums = format_sums({rel: sha256_file(root / rel) for rel in files})
        (root / SUMS).write_bytes(sums)
        (root / SIGNATURE).write_bytes(key.sign(sums))
        order = [*HEAD, *(rel for rel in files if rel not in HEAD)]
        log(f"writing {options.output}")
        _write_tar(root, order, options.output, int(created.timestamp()))
    return BundleSummary(
        path=options.output,
        files=len(order),
        size=options.output.stat().st_size,
        seconds=time.monotonic() - started,
        fingerprint=signer,
        info=info,
    )
