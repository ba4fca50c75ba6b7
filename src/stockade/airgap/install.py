"""Installing from a bundle on a machine with no network: verify (refusing
on any failure), extract, a fresh venv with ``pip install --no-index`` from
the bundle's wheels alone, the agent's wheels where the agent bundle looks
for them, ``docker load`` of the images, and the templates and Terraform
mirror copied out."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stockade.airgap.errors import AirgapError, InstallError, docker_client
from stockade.airgap.manifest import AGENT_WHEELS, TEMPLATES, TERRAFORM_MIRROR, WHEELS, ImageInfo
from stockade.airgap.verify import VerifiedBundle, verify_bundle

Log = Callable[[str], None]


@dataclass(frozen=True)
class InstallResult:
    """What an install put where."""

    prefix: Path
    venv: Path
    stockade: Path
    templates: Path
    terraform_mirror: Path | None
    images: list[ImageInfo]
    bundle: VerifiedBundle
    seconds: float


def _nothing(_: str) -> None:
    return None


def _offline_env() -> dict[str, str]:
    """The environment for pip: no configuration file and no PIP_* variable,
    so that nothing (an index URL, a find-links, a proxy) but the bundle's
    wheelhouse can be used."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    env.pop("PYTHONPATH", None)
    return env


def _run(command: list[str], what: str) -> str:
    try:
        result = subprocess.run(
            command,
            capture_output=True,
            text=True,
            env=_offline_env(),
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except OSError as exc:
        raise InstallError(f"{what}: cannot run {command[0]}: {exc.strerror}") from exc
    if result.returncode != 0:
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if line.startswith("ERROR:")]
        lines = errors or [line for line in output.splitlines() if line.strip()] or ["no output"]
        raise InstallError(f"{what}: {lines[-1 if not errors else 0].strip()}")
    return result.stdout


def _compile(venv: Path) -> None:
    """Byte-compile the venv, as pip would have, in parallel. Failures are
    ignored as pip ignores them (a package may ship files for other
    Pythons); the interpreter compiles what it imports anyway."""
    python = str(venv / "bin" / "python")
    subprocess.run(
        [python, "-m", "compileall", "-q", "-j", "0", str(venv / "lib")],
        capture_output=True,
        env=_offline_env(),
        check=False,
        stdin=subprocess.DEVNULL,
    )


def _python_version(python: str) -> str:
    """``X.Y`` of an interpreter, or an InstallError saying it is not one."""
    try:
        result = subprocess.run(
            [python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True,
            text=True,
            env=_offline_env(),
            check=False,
            stdin=subprocess.DEVNULL,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise InstallError(f"--python {python}: cannot run it ({exc})") from exc
    version = result.stdout.strip()
    if result.returncode != 0 or not re.fullmatch(r"3\.\d+", version):
        raise InstallError(
            f"--python {python}: not a CPython 3 interpreter (exit {result.returncode})"
        )
    return version


def _load_images(client: Any, root: Path, images: list[ImageInfo], log: Log) -> None:
    import docker

    for image in images:
        log(f"loading image {image.name}")
        try:
            with (root / image.file).open("rb") as data:
                client.images.load(data)
            loaded = client.images.get(image.name)
        except (docker.errors.DockerException, OSError) as exc:
            raise InstallError(f"docker load {image.file}: {exc}") from exc
        if loaded.id != image.id:
            raise InstallError(
                f"docker load {image.file}: {image.name} is now {loaded.id}, "
                f"not the bundle's {image.id}"
            )


def _check_prefix(prefix: Path) -> bool:
    """Whether the prefix exists already (it must then be an empty directory)."""
    if prefix.is_symlink() or (prefix.exists() and not prefix.is_dir()):
        raise InstallError(f"--prefix {prefix}: exists and is not a directory")
    if prefix.is_dir():
        if any(prefix.iterdir()):
            raise InstallError(
                f"--prefix {prefix} is not empty: install into a new (or empty) directory"
            )
        return True
    if not prefix.parent.is_dir():
        raise InstallError(f"--prefix {prefix}: {prefix.parent} does not exist")
    return False


def install_bundle(
    archive: Path,
    *,
    prefix: Path,
    public_key: Ed25519PublicKey | None = None,
    fingerprint: str | None = None,
    python: str | None = None,
    include_images: bool = True,
    log: Log = _nothing,
) -> InstallResult:
    """Verify ``archive`` and install it under ``prefix`` (a new or empty
    directory): ``bundle/`` (the verified files), ``venv/``, ``templates/``
    and, if the bundle has one, ``terraform-mirror/``. On failure the prefix
    is left as it was found (images already loaded stay in Docker)."""
    started = time.monotonic()
    prefix = prefix.absolute()
    python = python or sys.executable
    if shutil.which(python) is None:
        raise InstallError(f"--python {python}: not found")
    existed = _check_prefix(prefix)
    remedy = "start dockerd (DOCKER_HOST to point elsewhere), or pass --no-images"
    client = docker_client(InstallError, remedy) if include_images else None
    try:
        prefix.mkdir(exist_ok=True)
        result = _install(archive, prefix, public_key, fingerprint, python, client, log)
    except (AirgapError, OSError) as exc:
        # Everything in the prefix is ours: it was new or empty.
        if existed:
            for child in prefix.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        else:
            shutil.rmtree(prefix, ignore_errors=True)
        if isinstance(exc, AirgapError):
            raise
        raise InstallError(f"installing into {prefix}: {exc}") from exc
    finally:
        if client is not None:
            client.close()
    return dataclasses.replace(result, seconds=time.monotonic() - started)


def _install(
    archive: Path,
    prefix: Path,
    public_key: Ed25519PublicKey | None,
    fingerprint: str | None,
    python: str,
    client: Any,
    log: Log,
) -> InstallResult:
    staging = prefix / ".bundle.partial"
    staging.mkdir()
    log(f"verifying {archive}")
    verified = verify_bundle(
        archive, public_key=public_key, fingerprint=fingerprint, extract_to=staging
    )
    root = prefix / "bundle"
    staging.rename(root)
    info = verified.info
    version = _python_version(python)
    if version not in info.python_versions:
        raise InstallError(
            f"--python {python} is CPython {version}; the bundle has wheels for "
            f"{', '.join(info.python_versions)}: pass --python with one of those"
        )
    venv = prefix / "venv"
    log(f"creating {venv} (CPython {version})")
    _run([python, "-m", "venv", str(venv)], f"creating the venv {venv}")
    log(f"installing Stockade {info.stockade_version} from the bundle's wheels (--no-index)")
    _run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "--no-index",
            "--find-links",
            str(root / WHEELS),
            "--only-binary=:all:",
            "--disable-pip-version-check",
            "--no-input",
            "--no-cache-dir",
            # Compiled below, on every core: pip compiles one file at a time,
            # which was two thirds of the install's time.
            "--no-compile",
            f"stockade=={info.stockade_version}",
        ],
        "pip install from the bundle",
    )
    _compile(venv)
    if (root / AGENT_WHEELS).is_dir():
        # Where stockade.agent.bundle.agent_wheels_dir() looks by default.
        shutil.copytree(root / AGENT_WHEELS, venv / AGENT_WHEELS)
    templates = prefix / "templates"
    shutil.copytree(root / TEMPLATES, templates)
    mirror = None
    if info.terraform_mirror:
        mirror = prefix / "terraform-mirror"
        shutil.copytree(root / TERRAFORM_MIRROR, mirror)
    if client is not None:
        _load_images(client, root, info.images, log)
    return InstallResult(
        prefix=prefix,
        venv=venv,
        stockade=venv / "bin" / "stockade",
        templates=templates,
        terraform_mirror=mirror,
        images=info.images if client is not None else [],
        bundle=verified,
        seconds=0.0,
    )
