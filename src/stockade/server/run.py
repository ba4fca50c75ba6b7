"""Run the control plane under uvicorn until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import socket
import sys
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from stockade import egress
from stockade.server.app import create_app
from stockade.server.observability import configure_logging, get_logger
from stockade.server.services import Services
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


class _Server(uvicorn.Server):
    """uvicorn's server, able to listen on more addresses once it runs: the
    gateway of the Docker network that docker workspaces' agents reach the
    server at. The app's own sockets and these share one protocol, state and
    graceful shutdown."""

    def __init__(
        self, config: uvicorn.Config, *, redirect_address: str = "", access_url: str = ""
    ) -> None:
        super().__init__(config)
        self._extra: dict[str, asyncio.base_events.Server] = {}
        self._extra_lock = asyncio.Lock()
        self.redirect_address = redirect_address
        self.access_url = access_url

    async def listen_also(self, host: str) -> None:
        """Listen on ``host`` at the configured port too (idempotent); raises
        ``OSError`` when the address cannot be bound."""
        async with self._extra_lock:
            if host in self._extra:
                return
            config = self.config

            def protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
                # As uvicorn makes its own (Server.startup).
                made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                    config=config,
                    server_state=self.server_state,
                    app_state=self.lifespan.state,
                    _loop=_loop,
                )
                return made

            loop = asyncio.get_running_loop()
            self._extra[host] = await loop.create_server(
                protocol,
                host=host,
                port=config.port,
                backlog=config.backlog,
                # uvicorn's context (None without TLS): agents on the gateway
                # get https like everyone else.
                ssl=config.ssl,
            )

    async def redirect_http(self, address: str, access_url: str) -> None:
        """Listen on ``address`` with plain HTTP, sending every request to
        the same path under ``access_url`` (308, so the method and body
        stay). Connections share this server's state and shutdown."""
        config = uvicorn.Config(
            _redirect_app(access_url), loop="asyncio", lifespan="off", access_log=False,
            log_config=None, server_header=False,
        )  # fmt: skip
        config.load()
        host, _, port = address.rpartition(":")

        def protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            made: asyncio.Protocol = config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state={}, _loop=_loop
            )
            return made

        loop = asyncio.get_running_loop()
        self._extra[address] = await loop.create_server(
            protocol, host=host.strip("[]"), port=int(port), backlog=config.backlog
        )

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        # The redirect first: when its address cannot be bound, the server
        # stops before it ever answers, as uvicorn does for its own address.
        if self.redirect_address:
            try:
                await self.redirect_http(self.redirect_address, self.access_url)
            except OSError as exc:
                get_logger("stockade.server").error(
                    "redirect_listen_failed", address=self.redirect_address, error=str(exc)
                )
                sys.exit(1)
        await super().startup(sockets)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self._extra.values():
            server.close()
        await super().shutdown(sockets)


def _redirect_app(access_url: str) -> Starlette:
    """Every request, whatever its Host, to the same path under the access
    URL (never to a host the request names: no open redirect)."""

    async def redirect(request: Request) -> Response:
        target = access_url + request.url.path
        if request.url.query:
            target += "?" + request.url.query
        return RedirectResponse(target, status_code=308)

    return Starlette(routes=[Route("/{path:path}", redirect, methods=_ALL_METHODS)])


_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _on_loopback(url: str) -> bool:
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(settings: Settings) -> None:
    """Blocks until a signal arrives; uvicorn then stops accepting, lets
    in-flight requests finish and runs the app's shutdown."""
    _return_freed_memory()
    configure_logging(settings.log_level, settings.log_json)
    # The database holds password and token hashes and the audit log.
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    settings.data_dir.chmod(0o700)
    # Before anything can dial out: every later connection and lookup of
    # this process, whichever library makes it, goes through the allow-list.
    egress.install(settings.egress_policy, "server")
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=settings.trusted_proxies or None,
        # uvloop, whose outbound entry points check the egress guard (its
        # own connects happen in C, where the audit hook cannot see them).
        loop="stockade.server.loop:GuardedLoop",
        ws_per_message_deflate=False,  # byte streams: compression costs CPU, gains nothing
        timeout_graceful_shutdown=10,
        server_header=False,
        ssl_certfile=settings.tls_cert_file,
        ssl_keyfile=settings.tls_key_file,
    )
    server = _Server(
        config, redirect_address=settings.redirect_http_address, access_url=settings.access_url
    )
    if not settings.agent_url and _on_loopback(settings.access_url):
        # Containers cannot reach the host's loopback: docker workspaces get
        # the gateway of their network, where the server listens too (unless
        # it listens on every address already).
        everywhere = settings.host in ("0.0.0.0", "::", "[::]", "*")
        services: Services = app.state.services
        services.provisioner.reach_docker_agents(
            None if everywhere else server.listen_also, settings.access_url
        )
    server.run()
