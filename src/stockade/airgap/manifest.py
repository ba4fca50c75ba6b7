"""The bundle's layout and its two manifests: ``SHA256SUMS`` (the signed list
of every file's sha256, in ``sha256sum -c`` format) and ``bundle.json`` (what
the bundle holds, for the installer and for people).

Everything lives under one top directory, :data:`TOP`::

    stockade-bundle/
      SHA256SUMS          "<sha256>  <path>" lines, sorted, for every other file
      SHA256SUMS.sig      the raw 64-byte Ed25519 signature of SHA256SUMS
      signer.pub          the signer's public key (only pinned by --fingerprint)
      bundle.json         this module's BundleInfo
      README.txt          how to verify and install, with or without Stockade
      wheels/             a flat wheelhouse: Stockade and every dependency
      agent-wheels/       cffi and websockets for the agent's other CPythons
      images/NAME.tar     `docker save` of each workspace image
      templates/BACKEND/  the starters of `stockade templates init`
      terraform-mirror/   optional, copied as given
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

TOP = "stockade-bundle"
SUMS = "SHA256SUMS"
SIGNATURE = "SHA256SUMS.sig"
SIGNER = "signer.pub"
METADATA = "bundle.json"
README = "README.txt"
WHEELS = "wheels"
AGENT_WHEELS = "agent-wheels"
IMAGES = "images"
TEMPLATES = "templates"
TERRAFORM_MIRROR = "terraform-mirror"
FORMAT_VERSION = 1
SIGNATURE_BYTES = 64
# The first members of the archive, in this order: a verifier streaming it
# checks the signature before it reads anything else.
HEAD = (SUMS, SIGNATURE, SIGNER, METADATA, README)

_SUM_LINE = re.compile(r"^([0-9a-f]{64})  (.+)$")
# sha256sum escapes names holding a backslash or a newline; bundles hold none.
_BAD_CHARS = re.compile(r"[\\\n\r\x00]")
_CHUNK = 1024 * 1024


class ImageInfo(BaseModel):
    """A workspace image carried as a ``docker save`` archive."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the reference it was saved and loads under, e.g. repo:tag")
    id: str = Field(description="Docker's image id (sha256:...), checked after the load")
    file: str = Field(description="its archive, relative to the top directory")
    size: int


class BundleInfo(BaseModel):
    """``bundle.json``: what a bundle holds (itself listed in SHA256SUMS)."""

    model_config = ConfigDict(extra="forbid")
    format: int = FORMAT_VERSION
    stockade_version: str
    stockade_wheel: str = Field(description="file name in wheels/")
    created_at: str
    python_versions: list[str]
    platforms: list[str]
    agent_python_versions: list[str] = Field(
        description="CPython versions that agent-wheels/ has cffi wheels for"
    )
    images: list[ImageInfo]
    templates: list[str] = Field(description="backends with a starter under templates/")
    terraform_mirror: bool
    signer_fingerprint: str


def sha256_file(path: Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def path_problem(path: str) -> str | None:
    """Why ``path`` (relative, '/'-separated) may not be in a bundle, or None."""
    if not path:
        return "an empty path"
    if path.startswith("/"):
        return "an absolute path"
    if _BAD_CHARS.search(path):
        return "a backslash, newline or NUL in the name"
    parts = path.split("/")
    if ".." in parts:
        return "a '..' component (it would escape the bundle's directory)"
    if any(part in ("", ".") for part in parts):
        return "an empty or '.' component"
    return None


def format_sums(digests: dict[str, str]) -> bytes:
    """``SHA256SUMS``: one ``<sha256>  <path>`` line per file, sorted by path."""
    return "".join(f"{digests[path]}  {path}\n" for path in sorted(digests)).encode()


class SumsError(ValueError):
    """A SHA256SUMS file that does not parse; the message names the line."""


def parse_sums(data: bytes) -> dict[str, str]:
    """Paths to hex digests from a SHA256SUMS file (strict: the format written
    by :func:`format_sums`, safe relative paths, no duplicates)."""
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise SumsError("is not UTF-8 text") from exc
    if text and not text.endswith("\n"):
        raise SumsError("does not end with a newline")
    digests: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        match = _SUM_LINE.match(line)
        if not match:
            raise SumsError(f"line {number} is not '<sha256>  <path>'")
        digest, path = match.groups()
        problem = path_problem(path)
        if problem:
            raise SumsError(f"line {number} names {path!r}: {problem}")
        if path in (SUMS, SIGNATURE):
            raise SumsError(f"line {number} lists {path}, which it cannot cover")
        if path in digests:
            raise SumsError(f"line {number} lists {path} a second time")
        digests[path] = digest
    return digests
