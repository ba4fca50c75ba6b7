"""Encryption at rest for secrets the server must read back (workspace SSH
host keys; later OIDC client secrets and the like).

AES-256-GCM with a key derived (HKDF-SHA256) from the deployment's audit key,
so a site has one secret to keep and share between replicas rather than two.
The derivation is one-way: this key reveals nothing of the audit key. Whoever
holds the database alone cannot decrypt; the audit key is kept out of it
(``DATA_DIR/audit.key`` or ``--audit-key``)."""

from __future__ import annotations

import base64
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_VERSION = "v1"
_NONCE_BYTES = 12


class SecretBoxError(Exception):
    """A stored secret could not be decrypted (wrong key or edited value)."""


class SecretBox:
    def __init__(self, master_key: bytes) -> None:
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"stockade secrets v1"
        ).derive(master_key)
        self._aead = AESGCM(key)

    def encrypt(self, plaintext: str, *, context: str) -> str:
        """``plaintext`` sealed; ``context`` (e.g. the row's id) is bound to
        it, so a value copied onto another row does not decrypt there."""
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, plaintext.encode(), context.encode())
        return f"{_VERSION}:{base64.b64encode(nonce + sealed).decode()}"

    def decrypt(self, value: str, *, context: str) -> str:
        version, _, payload = value.partition(":")
        if version != _VERSION:
            raise SecretBoxError(f"unknown secret format {version!r}")
        try:
            raw = base64.b64decode(payload, validate=True)
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], context.encode())
        except (ValueError, InvalidTag) as exc:
            raise SecretBoxError("the secret does not decrypt with this server's key") from exc
        return plain.decode()
