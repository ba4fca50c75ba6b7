"""The server's event loop: uvloop, with the egress guard at its doors.

uvloop resolves names and connects TCP and UDP sockets in C (libuv), where
no Python audit event sees them, so the egress guard's audit hook alone
would miss asyncpg's and httpx's connections on it. This loop checks the
destination of every entry point that opens an outbound connection or
resolves a name before uvloop does the work; what uvloop does through
Python sockets (``sock_connect``, ``sock_sendto``) the audit hook already
sees. Why not the standard asyncio loop, which the hook sees through
entirely: on the API benchmark (SQLite, 20 clients) login's p99 was 3.4 s
on it against 1.2-1.5 s on uvloop; small-request throughput moved too much
between runs (63-84 req/s) to tell the loops apart."""

from __future__ import annotations

import ipaddress
from typing import Any

import uvloop

from stockade import egress


class GuardedLoop(uvloop.Loop):
    """uvloop whose outbound entry points ask the egress guard first; the
    class is the loop factory uvicorn's ``loop`` setting names."""

    async def getaddrinfo(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        egress.check("resolve", host, port)
        return await super().getaddrinfo(host, port, *args, **kwargs)

    async def getnameinfo(self, sockaddr: Any, flags: int = 0) -> Any:
        if isinstance(sockaddr, tuple):
            egress.check("resolve", sockaddr[0], sockaddr[1])
        return await super().getnameinfo(sockaddr, flags)

    async def create_connection(
        self, protocol_factory: Any, host: Any = None, port: Any = None, **kwargs: Any
    ) -> Any:
        if kwargs.get("sock") is None:
            # A name is resolved first (by uvloop, in C): a lookup, as the
            # audit hook would count it on the standard loop.
            egress.check("connect" if _is_address(host) else "resolve", host, port)
        return await super().create_connection(protocol_factory, host, port, **kwargs)

    async def create_datagram_endpoint(
        self, protocol_factory: Any, local_addr: Any = None, remote_addr: Any = None, **kwargs: Any
    ) -> Any:
        if isinstance(remote_addr, tuple):
            egress.check("send", remote_addr[0], remote_addr[1])
        return await super().create_datagram_endpoint(
            protocol_factory, local_addr, remote_addr, **kwargs
        )


def _is_address(host: Any) -> bool:
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    return True
