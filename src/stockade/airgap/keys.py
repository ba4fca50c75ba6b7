"""Ed25519 keys for signing bundles: generation, loading and fingerprints.

The private key is PEM PKCS#8 (unencrypted, mode 0600), the public key PEM
SubjectPublicKeyInfo, both readable by OpenSSL 3, so that a bundle can be
checked with ``openssl pkeyutl -verify -rawin`` on a machine without Stockade.
The fingerprint is the hex sha256 of the 32-byte raw public key: short enough
to read over the phone, and what ``--fingerprint`` pins."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from stockade.airgap.errors import KeyFileError

# Key files are small; anything larger is not a key (and is not read whole).
_MAX_KEY_BYTES = 64 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class KeyPair:
    """Where :func:`generate_keypair` wrote the keys, and the public key's fingerprint."""

    private_path: Path
    public_path: Path
    fingerprint: str


def fingerprint(key: Ed25519PublicKey) -> str:
    """The hex sha256 of the raw 32-byte public key."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The public key as PEM SubjectPublicKeyInfo (what OpenSSL's ``-pubin`` reads)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def normalize_fingerprint(text: str) -> str:
    """A fingerprint as 64 lowercase hex digits; colons and spaces are ignored."""
    value = re.sub(r"[\s:]", "", text).lower()
    if not _HEX64.match(value):
        raise KeyFileError(
            f"{text!r} is not a key fingerprint: expected 64 hex digits "
            "(what `stockade airgap keygen` printed)"
        )
    return value


def _write_new(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # whatever the umask
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def generate_keypair(prefix: Path) -> KeyPair:
    """Write a new Ed25519 key to ``prefix`` (0600) and its public key to
    ``prefix.pub``; never overwrites either."""
    public_path = prefix.with_name(prefix.name + ".pub")
    if not prefix.name:
        raise KeyFileError(f"{prefix}: give a file name for the private key")
    if prefix.is_dir():
        raise KeyFileError(f"{prefix} is a directory: give a file name for the private key")
    if not prefix.parent.is_dir():
        raise KeyFileError(f"{prefix.parent} is not a directory: create it first")
    for path in (prefix, public_path):
        if path.exists() or path.is_symlink():
            raise KeyFileError(f"{path} already exists: refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        _write_new(prefix, private, 0o600)
    except FileExistsError as exc:
        raise KeyFileError(f"{prefix} already exists: refusing to overwrite a key") from exc
    except OSError as exc:
        raise KeyFileError(f"cannot write {prefix}: {exc.strerror}") from exc
    try:
        _write_new(public_path, public_pem(key.public_key()), 0o644)
    except OSError as exc:
        prefix.unlink()  # half a key pair is worse than none
        if isinstance(exc, FileExistsError):
            message = f"{public_path} already exists: refusing to overwrite a key"
            raise KeyFileError(message) from exc
        raise KeyFileError(f"cannot write {public_path}: {exc.strerror}") from exc
    return KeyPair(prefix, public_path, fingerprint(key.public_key()))


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        if not path.is_file():
            raise KeyFileError(f"{path}: no such {what} file")
        if path.stat().st_size > _MAX_KEY_BYTES:
            raise KeyFileError(f"{path} is too large to be a {what}")
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc.strerror}") from exc


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 signing key in ``path`` (PEM PKCS#8, as keygen writes it)."""
    data = _read_key_file(path, "signing key")
    if b"PUBLIC KEY" in data and b"PRIVATE KEY" not in data:
        raise KeyFileError(f"{path} is a public key: sign with the private key (keygen's -o file)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise KeyFileError(
            f"{path} is encrypted: sign with an unencrypted key made by `stockade airgap keygen`"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path} is not a PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key: make one with `stockade airgap keygen`")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """The Ed25519 public key in ``path`` (PEM SubjectPublicKeyInfo)."""
    data = _read_key_file(path, "public key")
    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{path} is a private key: verify with the public key (the .pub file) and keep "
            "the private key on the machine that signs"
        )
    return parse_public_key(data, str(path))


def parse_public_key(data: bytes, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM bytes; ``where`` names them in errors."""
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{where} is not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where} is not an Ed25519 public key")
    return key
