"""argon2id password hashing and the password policy."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from stockade.server.errors import InvalidInput

T = TypeVar("T")

# OWASP's argon2id baseline (19 MiB, 2 passes, 1 lane). It measured 47 ms on
# one core of the 2-core test machines, so those peak at ~40 logins/s.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)

MIN_LENGTH = 8
MAX_LENGTH = 256

# The most common passwords in public breach corpora; refusing them stops the
# guesses a rate limit cannot.
_COMMON = frozenset((Path(__file__).with_name("common_passwords.txt")).read_text().split())


@functools.cache
def _dummy_hash() -> str:
    return _HASHER.hash("stockade-dummy-password-for-timing")


def check_policy(password: str, *, username: str, email: str) -> None:
    """Raise ``InvalidInput`` with a message saying what to change."""
    if len(password) < MIN_LENGTH:
        raise InvalidInput(
            f"password is too short: use at least {MIN_LENGTH} characters",
            reason="weak_password",
        )
    if len(password) > MAX_LENGTH:
        raise InvalidInput(
            f"password is too long: use at most {MAX_LENGTH} characters", reason="weak_password"
        )
    lowered = password.lower()
    if lowered in _COMMON:
        raise InvalidInput(
            "password is one of the most common passwords: choose another", reason="weak_password"
        )
    if len(set(password)) < 4:
        raise InvalidInput(
            "password has too few different characters: use at least 4", reason="weak_password"
        )
    local_part = email.split("@", 1)[0].lower()
    if username.lower() in lowered or (len(local_part) >= 4 and local_part in lowered):
        raise InvalidInput(
            "password must not contain your username or email", reason="weak_password"
        )


# Hashing runs on its own two threads: it is CPU-bound (more threads than
# cores only queue) and each run holds a 19 MiB buffer, which glibc would
# otherwise keep cached in the arena of every one of anyio's 40 worker threads.
_HASH_THREADS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="argon2")


async def _in_hash_thread(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(_HASH_THREADS, fn, *args)


async def hash_password(password: str) -> str:
    return await _in_hash_thread(_HASHER.hash, password)


def _verify(hashed: str | None, password: str) -> bool:
    try:
        return _HASHER.verify(hashed or _dummy_hash(), password) and hashed is not None
    except (VerificationError, InvalidHashError):
        return False


async def verify_password(hashed: str | None, password: str) -> bool:
    """Check ``password``; with no hash, spend the same time and say no, so that
    unknown users cannot be told apart by timing."""
    return await _in_hash_thread(_verify, hashed, password)


def needs_rehash(hashed: str) -> bool:
    return _HASHER.check_needs_rehash(hashed)
