"""Checking a bundle: the signature over SHA256SUMS, then every file's sha256,
in one pass over the (possibly large) tar, and optionally extracting it.

The public key comes from the caller, never from the bundle alone: a signature
checked with a key the bundle carries proves nothing. ``fingerprint`` pins the
bundle's ``signer.pub`` instead (for a fingerprint read over the phone).

Files are written while they are hashed (so the tar is read once); the caller
extracts into a fresh directory and must not use it unless this returns:
until then nothing in it has been checked."""

from __future__ import annotations

import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from stockade.airgap.errors import AirgapError, VerifyError
from stockade.airgap.keys import fingerprint as key_fingerprint
from stockade.airgap.keys import parse_public_key
from stockade.airgap.manifest import (
    FORMAT_VERSION,
    METADATA,
    SIGNATURE,
    SIGNATURE_BYTES,
    SIGNER,
    SUMS,
    TOP,
    WHEELS,
    BundleInfo,
    SumsError,
    parse_sums,
    path_problem,
)

# The files read whole into memory (the others are streamed), with their limits.
_SMALL_FILES = {
    SUMS: 16 * 1024 * 1024,
    SIGNATURE: SIGNATURE_BYTES,
    SIGNER: 64 * 1024,
    METADATA: 16 * 1024 * 1024,
}
_CHUNK = 1024 * 1024
_CHANGED = "(the bundle was changed after it was signed)"


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose signature and every file checked out."""

    path: Path
    files: int
    size: int
    info: BundleInfo
    fingerprint: str
    directory: Path | None
    """Where the top directory's contents were extracted (None: not extracted)."""


def _kind(member: tarfile.TarInfo) -> str:
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return f"a tar entry of type {member.type!r}"


class _Verifier:
    def __init__(
        self, archive: Path, key: Ed25519PublicKey | None, pinned: str | None, target: Path | None
    ) -> None:
        self.archive = archive
        self.key = key
        self.pinned = pinned
        self.target = target
        self.small: dict[str, bytes] = {}
        self.seen: dict[str, str] = {}  # path -> sha256, in archive order
        self.names: set[str] = set()
        self.expected: dict[str, str] | None = None
        self.files = 0
        self.size = 0

    def run(self) -> VerifiedBundle:
        try:
            with (
                self.archive.open("rb") as raw,
                tarfile.open(fileobj=raw, mode="r|") as tar,
            ):
                for member in tar:
                    self._member(tar, member)
        except FileNotFoundError as exc:
            raise VerifyError(f"{self.archive}: no such file") from exc
        except IsADirectoryError as exc:
            raise VerifyError(f"{self.archive} is a directory, not a bundle") from exc
        except (tarfile.TarError, EOFError) as exc:
            raise VerifyError(
                f"{self.archive}: not a readable tar archive (truncated, compressed or "
                f"not a bundle): {exc}"
            ) from exc
        except OSError as exc:
            if isinstance(exc, AirgapError):
                raise
            raise VerifyError(f"cannot read {self.archive}: {exc.strerror or exc}") from exc
        return self._finish()

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        name = member.name
        problem = path_problem(name)
        if problem:
            raise VerifyError(f"{name!r}: refused, {problem}")
        if name != TOP and not name.startswith(TOP + "/"):
            raise VerifyError(f"{name}: outside the bundle's top directory {TOP}/")
        if name in self.names:
            raise VerifyError(f"{name}: appears twice in the archive")
        self.names.add(name)
        rel = name[len(TOP) + 1 :]
        if member.isdir():
            if self.target is not None and rel:
                self._mkdir(name, self.target / rel)
            return
        if not member.isfile():
            raise VerifyError(f"{name}: {_kind(member)}; a bundle holds only regular files")
        if not rel:
            raise VerifyError(f"{name}: a file where the top directory should be")
        limit = _SMALL_FILES.get(rel)
        if limit is not None and member.size > limit:
            raise VerifyError(f"{name}: {member.size} bytes, more than such a file can be")
        if rel == SIGNATURE and member.size != SIGNATURE_BYTES:
            raise VerifyError(f"{name}: {member.size} bytes, not a 64-byte Ed25519 signature")
        handle = tar.extractfile(member)
        if handle is None:  # pragma: no cover - isfile() members always have data
            raise VerifyError(f"{name}: no data")
        digest = self._copy(name, rel, handle, member.size)
        self.files += 1
        self.size += member.size
        if rel in (SUMS, SIGNATURE):
            self._check_signature()
            return
        if rel == SIGNER:
            self._check_signature()
        self.seen[rel] = digest
        if self.expected is not None:
            self._compare(rel, digest)

    def _mkdir(self, name: str, path: Path) -> None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise VerifyError(f"{name}: cannot be extracted: {exc.strerror}") from exc

    def _copy(self, name: str, rel: str, handle: IO[bytes], size: int) -> str:
        digest = hashlib.sha256()
        keep = rel in _SMALL_FILES
        kept: list[bytes] = []
        out: IO[bytes] | None = None
        if self.target is not None:
            path = self.target / rel
            self._mkdir(name, path.parent)
            try:
                # "x": never through an existing file or symlink
                out = path.open("xb")
            except OSError as exc:
                raise VerifyError(f"{name}: cannot be extracted: {exc.strerror}") from exc
        try:
            read = 0
            while chunk := handle.read(_CHUNK):
                read += len(chunk)
                digest.update(chunk)
                if keep:
                    kept.append(chunk)
                if out is not None:
                    try:
                        out.write(chunk)
                    except OSError as exc:
                        raise VerifyError(f"{name}: cannot be extracted: {exc.strerror}") from exc
            if read != size:
                raise VerifyError(f"{name}: truncated ({read} of {size} bytes)")
        finally:
            if out is not None:
                out.close()
        if keep:
            self.small[rel] = b"".join(kept)
        return digest.hexdigest()

    def _signing_key(self) -> Ed25519PublicKey | None:
        if self.key is not None:
            return self.key
        signer = self.small.get(SIGNER)
        if signer is None:
            return None
        try:
            key = parse_public_key(signer, f"{TOP}/{SIGNER}")
        except AirgapError as exc:
            raise VerifyError(str(exc)) from exc
        found = key_fingerprint(key)
        if found != self.pinned:
            raise VerifyError(
                f"{TOP}/{SIGNER}: the bundle's signer has fingerprint {found}, not the "
                f"expected {self.pinned}: refusing a bundle from another key"
            )
        return key

    def _check_signature(self) -> None:
        if self.expected is not None or SUMS not in self.small or SIGNATURE not in self.small:
            return
        key = self._signing_key()
        if key is None:
            return
        try:
            key.verify(self.small[SIGNATURE], self.small[SUMS])
        except InvalidSignature as exc:
            raise VerifyError(
                f"{TOP}/{SIGNATURE}: the signature does not verify with the public key "
                f"(fingerprint {key_fingerprint(key)}): the bundle was signed by another key, "
                f"or SHA256SUMS was changed after signing"
            ) from exc
        try:
            self.expected = parse_sums(self.small[SUMS])
        except SumsError as exc:
            raise VerifyError(f"{TOP}/{SUMS}: {exc}") from exc
        for rel, digest in self.seen.items():
            self._compare(rel, digest)

    def _compare(self, rel: str, digest: str) -> None:
        assert self.expected is not None
        want = self.expected.get(rel)
        if want is None:
            raise VerifyError(f"{TOP}/{rel}: not listed in SHA256SUMS (added after signing)")
        if want != digest:
            raise VerifyError(f"{TOP}/{rel}: sha256 mismatch {_CHANGED}")

    def _finish(self) -> VerifiedBundle:
        if SUMS not in self.small:
            raise VerifyError(f"{self.archive}: no {TOP}/{SUMS} in it: not a Stockade bundle")
        if SIGNATURE not in self.small:
            raise VerifyError(f"{TOP}/{SIGNATURE}: missing, so the bundle is not signed")
        if self.expected is None:
            raise VerifyError(
                f"{TOP}/{SIGNER}: missing, so --fingerprint cannot be checked; use --public-key"
            )
        for rel in sorted(set(self.expected) - set(self.seen)):
            raise VerifyError(
                f"{TOP}/{rel}: listed in SHA256SUMS but missing from the archive "
                "(removed after signing)"
            )
        info = self._info()
        key = self._signing_key()
        assert key is not None
        return VerifiedBundle(
            path=self.archive,
            files=self.files,
            size=self.size,
            info=info,
            fingerprint=key_fingerprint(key),
            directory=self.target,
        )

    def _info(self) -> BundleInfo:
        where = f"{TOP}/{METADATA}"
        data = self.small.get(METADATA)
        if data is None:
            raise VerifyError(f"{where}: missing from the bundle")
        try:
            raw = json.loads(data)
        except ValueError as exc:
            raise VerifyError(f"{where}: not JSON: {exc}") from exc
        if isinstance(raw, dict) and raw.get("format") != FORMAT_VERSION:
            raise VerifyError(
                f"{where}: bundle format {raw.get('format')!r}, this Stockade reads "
                f"format {FORMAT_VERSION}: use the Stockade that made the bundle"
            )
        try:
            info = BundleInfo.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            place = ".".join(map(str, first["loc"])) or "the top level"
            raise VerifyError(f"{where}: {place}: {first['msg']}") from exc
        # The installer opens these: they must be files checked above.
        assert self.expected is not None
        named = [f"{WHEELS}/{info.stockade_wheel}", *(image.file for image in info.images)]
        for rel in named:
            if rel not in self.expected:
                raise VerifyError(f"{where}: names {rel}, which SHA256SUMS does not list")
        return info


def verify_bundle(
    archive: Path,
    *,
    public_key: Ed25519PublicKey | None = None,
    fingerprint: str | None = None,
    extract_to: Path | None = None,
) -> VerifiedBundle:
    """Check ``archive``'s signature (against ``public_key``, or against the
    bundle's own ``signer.pub`` if its fingerprint is ``fingerprint``) and the
    sha256 of every file; raise :class:`VerifyError` naming the first problem.
    With ``extract_to`` (a new or empty directory) the top directory's files
    are written there on the way; on failure they are left for the caller to
    remove."""
    if (public_key is None) == (fingerprint is None):
        raise ValueError("give exactly one of public_key and fingerprint")
    return _Verifier(archive, public_key, fingerprint, extract_to).run()
