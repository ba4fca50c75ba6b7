"""Which certificates clients trust: the system's CAs, plus the control
plane's private CA when ``STOCKADE_CA_FILE`` names its PEM bundle.

One environment variable (rather than a flag per command) because the
``ssh --stdio`` ProxyCommand that OpenSSH runs gets no flags from the user,
only their environment. Standard library only: that ProxyCommand imports it
without the rest of the CLI."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

CA_FILE_ENV = "STOCKADE_CA_FILE"


class CaFileError(ValueError):
    """The CA bundle named by ``STOCKADE_CA_FILE`` (or given) cannot be used."""


def ca_file_from_env() -> str | None:
    """``$STOCKADE_CA_FILE``, or None when unset or empty."""
    return os.environ.get(CA_FILE_ENV, "").strip() or None


def client_ssl_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """A verifying client context: the system's CAs, and ``ca_file`` (default
    ``$STOCKADE_CA_FILE``) too. Raises :class:`CaFileError` when that file
    cannot be read or is no PEM CA bundle."""
    context = ssl.create_default_context()
    path = ca_file if ca_file is not None else ca_file_from_env()
    if path:
        try:
            context.load_verify_locations(cafile=os.fspath(path))
        except (OSError, ssl.SSLError) as exc:
            raise CaFileError(
                f"cannot use the CA bundle {path} ({CA_FILE_ENV}): "
                f"{getattr(exc, 'strerror', None) or exc}"
            ) from None
    return context
