"""Run the control plane under uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import ctypes
import sys

import uvicorn

from stockade.server.app import create_app
from stockade.server.observability import configure_logging
from stockade.server.settings import Settings


def _return_freed_memory() -> None:
    """Keep large freed blocks (argon2's 19 MiB) going back to the OS.

    glibc raises its mmap threshold after the first large block is freed, and
    later ones are then carved from arenas and kept: RSS climbed from ~100 MB
    to ~450 MB after a burst of logins. Pinning the threshold stops that."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 256 * 1024)


def serve(settings: Settings) -> None:
    """Blocks until a signal arrives; uvicorn then stops accepting, lets
    in-flight requests finish and runs the app's shutdown."""
    _return_freed_memory()
    configure_logging(settings.log_level, settings.log_json)
    # The database holds password and token hashes and the audit log.
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.data_dir.chmod(0o700)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
        ws_per_message_deflate=False,  # byte streams: compression costs CPU, gains nothing
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    uvicorn.Server(config).run()
