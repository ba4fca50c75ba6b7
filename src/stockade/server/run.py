"""Run the control plane under uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import uvicorn

from stockade.server.app import create_app
from stockade.server.observability import configure_logging
from stockade.server.settings import Settings


def serve(settings: Settings) -> None:
    """Blocks until a signal arrives; uvicorn then stops accepting, lets
    in-flight requests finish and runs the app's shutdown."""
    configure_logging(settings.log_level, settings.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
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
