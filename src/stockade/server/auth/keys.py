"""API key format: ``<id>-<secret>``. The id (10 chars) finds the row; the
secret (22 chars, 128+ bits) is compared by its SHA-256."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

_ALPHABET = string.ascii_letters + string.digits
ID_LENGTH = 10
SECRET_LENGTH = 22


def _random(length: int, alphabet: str = _ALPHABET) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(length))


# The login type of a workspace's AI bridge key: made by the bridge for the
# workspace's agent, good only on the bridge, revoked with the agent.
AIBRIDGE_LOGIN_TYPE = "aibridge"


def generate() -> tuple[str, str, str]:
    """Returns (key id, full token to hand out once, hash to store)."""
    key_id = _random(ID_LENGTH, string.ascii_lowercase + string.digits)
    secret = _random(SECRET_LENGTH)
    return key_id, f"{key_id}-{secret}", hash_secret(secret)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def split(token: str) -> tuple[str, str] | None:
    key_id, sep, secret = token.partition("-")
    if not sep or len(key_id) != ID_LENGTH or len(secret) != SECRET_LENGTH:
        return None
    return key_id, secret


def matches(secret: str, hashed: str) -> bool:
    return hmac.compare_digest(hash_secret(secret), hashed)
