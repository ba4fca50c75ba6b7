"""The errors of the air-gap bundle: each carries one line a person can act on."""

from __future__ import annotations


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
