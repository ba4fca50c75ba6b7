"""The errors of the air-gap bundle: each carries one line a person can act on."""

from __future__ import annotations

from typing import Any


class AirgapError(Exception):
    """Something about a bundle, a key or an install went wrong; ``str()`` is
    the one-line reason the CLI prints."""


class KeyFileError(AirgapError):
    """A signing or public key file is missing, unreadable, or not Ed25519."""


class BundleError(AirgapError):
    """A bundle could not be built (a missing wheel, image, or input)."""


class VerifyError(AirgapError):
    """A bundle failed verification: the message names the file at fault."""


class InstallError(AirgapError):
    """An install from a verified bundle could not be completed."""


def docker_client(error: type[AirgapError], remedy: str) -> Any:
    """A client of the Docker daemon that answers, or ``error`` saying why
    not and what to do (``remedy``)."""
    import docker

    try:
        client = docker.from_env(version="auto")
        client.ping()
    except docker.errors.DockerException as exc:
        raise error(f"Docker is not reachable ({exc}): {remedy}") from exc
    return client
