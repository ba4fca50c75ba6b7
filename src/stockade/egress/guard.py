"""Refuse, in-process, every outbound connection and name lookup that is not on
the allow-list, and count every attempt.

The guard is a :func:`sys.addaudithook` hook: CPython raises an audit event
before each ``socket.connect``/``connect_ex``, ``sendto``, ``sendmsg`` and
each name lookup (``getaddrinfo``, ``gethostbyname``, ``gethostbyaddr``,
``getnameinfo``), whatever library makes the call (asyncio, httpx, asyncpg,
asyncssh, urllib...). Raising from the hook aborts the call, so no library
can slip past it. Its boundary: sockets opened by C code that bypasses
Python's ``socket`` module (uvloop's own transports, libpq) and child
processes are not seen. The server's uvloop therefore calls :func:`check`
at its outbound entry points (``stockade.server.loop``), the database
driver is asyncpg, which dials through the loop, and the zero-egress test
watches the network itself for everything else.

What is checked is the destination named by the call: the address of a
connect or send, the name of a lookup (a lookup's own packets go to the
system's resolver, which the site runs). Loopback and the unspecified
address are always allowed; by default so are the private ranges (RFC 1918
and IPv6 ULA); link-local is not (cloud metadata services live there).
Unix sockets, netlink and other non-IP families are not egress.

Every attempt, allowed or denied, is counted in a :class:`EgressLedger`
by (component, kind, destination, port, decision), which the owning process
drains into the deployment's egress report.
"""

from __future__ import annotations

import _socket
import contextlib
import contextvars
import ipaddress
import logging
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Union

log = logging.getLogger("stockade.egress")

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
# RFC 1918 and IPv6 unique local addresses: where an air-gapped site's own
# services live.
DEFAULT_PRIVATE_NETWORKS = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
_PRIVATE = tuple(ipaddress.ip_network(n) for n in DEFAULT_PRIVATE_NETWORKS)

# Audit event -> the kind of attempt it is.
_CONNECT_EVENTS = {"socket.connect": "connect", "socket.sendto": "send", "socket.sendmsg": "send"}
_LOOKUP_EVENTS = {
    "socket.getaddrinfo",
    "socket.gethostbyname",
    "socket.gethostbyname_ex",
    "socket.gethostbyaddr",
    "socket.getnameinfo",
}
_IP_FAMILIES = (int(socket.AF_INET), int(socket.AF_INET6))


def _family(sock: Any) -> int | None:
    # The C socket's own int: socket.socket.family converts it to an enum
    # on every read, which was a third of the hook's time.
    try:
        return _raw_family(sock)  # type: ignore[no-any-return]
    except TypeError:  # not a socket object
        return None


_raw_family = _socket.socket.family.__get__

_DECISION_CACHE = 4096
REASON_LOOPBACK = "loopback"
REASON_PRIVATE = "private network"
REASON_OWN = "Stockade's own address"
REASON_HOSTNAME = "this host's own name"
REASON_DENIED = "not on the allow-list"
# Reasons that make an allowed destination internal to the site whatever the
# allow-list says (the rest were allowed because an admin listed them).
INTERNAL_REASONS = frozenset({REASON_LOOPBACK, REASON_PRIVATE, REASON_OWN, REASON_HOSTNAME})


class EgressDenied(PermissionError):
    """An outbound connection or lookup the allow-list does not cover.

    A :class:`PermissionError` (an :class:`OSError`), so every library
    treats it as the connection failure it is."""

    def __init__(self, kind: str, destination: str, port: int, component: str) -> None:
        self.kind = kind
        self.destination = destination
        self.port = port
        self.component = component
        target = f"{destination}:{port}" if port else destination
        verb = "looking up" if kind == "resolve" else "connecting to"
        super().__init__(
            f"Stockade's egress guard refused {verb} {target} (from the {component}): "
            "it is not on the allow-list. If this destination is part of your site, "
            "add it to the server's egress_allow setting."
        )


def _parse_ip(text: str) -> IPAddress | None:
    # Scoped IPv6 ("fe80::1%eth0") keeps its scope out of the check.
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _normal_host(host: str) -> str:
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


class EgressPolicy:
    """What may be reached: IP networks, exact host names and domain suffixes.

    Build it with :meth:`build`; :meth:`decide` answers for one destination
    with the reason (the network or entry that allowed it), or None when the
    destination is denied."""

    def __init__(
        self,
        networks: Iterable[tuple[IPNetwork, str]],
        hosts: Iterable[str] = (),
        suffixes: Iterable[str] = (),
        local_names: Iterable[str] = (),
        own_hosts: Iterable[str] = (),
    ) -> None:
        self.own_hosts = frozenset(_normal_host(h) for h in own_hosts if h)
        self.networks = tuple(networks)
        self.hosts = frozenset(_normal_host(h) for h in hosts)
        self.suffixes = tuple(s.lower() for s in suffixes)
        self.local_names = frozenset(_normal_host(n) for n in local_names if n)
        self._loopback = tuple(ipaddress.ip_network(n) for n in LOOPBACK_NETWORKS)
        self._decided: dict[str, str | None] = {}

    @classmethod
    def build(
        cls,
        allow: Iterable[str] = (),
        *,
        private_networks: bool = True,
        own_hosts: Iterable[str] = (),
    ) -> EgressPolicy:
        """A policy from allow-list entries: an IP address, a CIDR network, a
        host name, or ``*.domain`` for every name under a domain. ``own_hosts``
        are Stockade's own addresses (its access URL's host, its database's).
        Raises ``ValueError`` naming the first entry that is none of these."""
        networks: list[tuple[IPNetwork, str]] = []
        if private_networks:
            networks += [(n, REASON_PRIVATE) for n in _PRIVATE]
        hosts: list[str] = []
        suffixes: list[str] = []
        for raw in allow:
            entry = raw.strip()
            if not entry:
                continue
            try:
                network = ipaddress.ip_network(entry, strict=False)
            except ValueError:
                pass
            else:
                networks.append((network, f"allow-list entry {entry}"))
                continue
            name = _normal_host(entry)
            if name.startswith("*."):
                suffix = name[1:]
                if _valid_name(suffix[1:]):
                    suffixes.append(suffix)
                    continue
            elif _valid_name(name):
                hosts.append(name)
                continue
            raise ValueError(
                f"egress allow-list entry {raw!r} is not an IP address, a CIDR network "
                "(10.1.0.0/16), a host name (idp.example.internal) or *.domain"
            )
        return cls(networks, hosts, suffixes, _local_names(), own_hosts)

    def decide_address(self, address: IPAddress) -> str | None:
        """Why ``address`` may be reached, or None when it may not."""
        if address.is_unspecified or any(address in n for n in self._loopback):
            return REASON_LOOPBACK
        for network, reason in self.networks:
            if address.version == network.version and address in network:
                return reason
        return None

    def decide(self, host: str) -> str | None:
        """Why ``host`` (an address or a name) may be reached, or None."""
        # Decisions are cached: parsing addresses costs more than the
        # loopback connect it guards (a few destinations recur for ever).
        try:
            return self._decided[host]
        except KeyError:
            pass
        reason = self._decide(host)
        if len(self._decided) >= _DECISION_CACHE:
            self._decided.clear()
        self._decided[host] = reason
        return reason

    def _decide(self, host: str) -> str | None:
        name = _normal_host(host)
        address = _parse_ip(name)
        if address is not None and (address.is_unspecified or address.is_loopback):
            return REASON_LOOPBACK
        if name in self.own_hosts:
            return REASON_OWN
        if address is not None:
            return self.decide_address(address)
        if name == "localhost" or name.endswith(".localhost"):
            return REASON_LOOPBACK
        if name in self.local_names:
            # Allowed: libraries look it up all the time. Asked of the
            # hosts file, or else of the site's own resolver.
            return REASON_HOSTNAME
        if name in self.hosts:
            return f"allow-list entry {name}"
        for suffix in self.suffixes:
            if name.endswith(suffix):
                return f"allow-list entry *{suffix}"
        return None

    def describe(self) -> list[str]:
        """The allow-list in words, loopback first."""
        return [
            *LOOPBACK_NETWORKS,
            *(str(n) for n, _ in self.networks),
            *sorted(self.hosts),
            *(f"*{s}" for s in self.suffixes),
            *(f"{h} (Stockade's own)" for h in sorted(self.own_hosts)),
        ]

    def to_wire(self) -> dict[str, Any]:
        """The policy as JSON-able data: how it travels to the agent."""
        return {
            "networks": [[str(n), reason] for n, reason in self.networks],
            "hosts": sorted(self.hosts),
            "suffixes": list(self.suffixes),
            "own_hosts": sorted(self.own_hosts),
        }

    @classmethod
    def from_wire(cls, data: Any, own_hosts: Iterable[str] = ()) -> EgressPolicy:
        """The policy :meth:`to_wire` sent, plus more ``own_hosts``; raises
        ``ValueError`` when ``data`` is not such a policy."""
        try:
            networks = [(ipaddress.ip_network(n), str(r)) for n, r in data["networks"]]
            hosts = [str(h) for h in data["hosts"]]
            suffixes = [str(s) for s in data["suffixes"]]
            own = [*(str(h) for h in data["own_hosts"]), *own_hosts]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed egress policy: {exc!r}") from None
        return cls(networks, hosts, suffixes, _local_names(), own)


def _local_names() -> list[str]:
    """This host's own name (a workspace's, in the agent)."""
    try:
        return [socket.gethostname()]
    except OSError:
        return []


def _valid_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    return all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isalnum() or c in "-_" for c in label)
        for label in name.split(".")
    )


def is_internal(destination: str) -> bool:
    """True when ``destination`` is an address on loopback or in the default
    private ranges, or a loopback name: internal whatever the allow-list says."""
    if _normal_host(destination) == "localhost":
        return True
    address = _parse_ip(destination)
    if address is None:
        return False
    if address.is_unspecified or address.is_loopback:
        return True
    return any(address.version == n.version and address in n for n in _PRIVATE)


@dataclass(frozen=True)
class EgressRecord:
    """Attempts of one kind by one component to one destination, with one
    decision, since the last drain."""

    component: str
    kind: str  # connect | send | resolve
    destination: str
    port: int  # 0 for a lookup without a port
    allowed: bool
    reason: str
    count: int
    first_seen: float  # epoch seconds
    last_seen: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "kind": self.kind,
            "destination": self.destination,
            "port": self.port,
            "allowed": self.allowed,
            "reason": self.reason,
            "count": self.count,
            "first_seen": self.first_seen,
            "last_seen": self.last_seen,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], component: str) -> EgressRecord:
        """A record another process sent (the agent's, provisionerd's), under
        the ``component`` the receiver knows it by. Raises ``ValueError``."""
        try:
            count = int(data["count"])
            first, last = float(data["first_seen"]), float(data["last_seen"])
            port = int(data.get("port") or 0)
            kind = str(data["kind"])
            destination = str(data["destination"])[:255]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed egress record: {exc}") from None
        if kind not in ("connect", "send", "resolve") or count < 1 or not 0 <= port <= 65535:
            raise ValueError("malformed egress record")
        return cls(
            component=component,
            kind=kind,
            destination=destination,
            port=port,
            allowed=bool(data.get("allowed")),
            reason=str(data.get("reason") or "")[:128],
            count=count,
            first_seen=first,
            last_seen=max(first, last),
        )


_Key = tuple[str, str, str, int, bool]


class EgressLedger:
    """Counts attempts until someone drains them; safe from any thread."""

    # A flood of distinct destinations (a port scan from a workspace's
    # ssh -L) must not grow memory without bound: past this many keys
    # between drains, new keys are counted in one overflow record.
    MAX_KEYS = 10_000

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[_Key, list[Any]] = {}

    def record(
        self,
        component: str,
        kind: str,
        destination: str,
        port: int,
        allowed: bool,
        reason: str,
        count: int = 1,
        first_seen: float | None = None,
        last_seen: float | None = None,
    ) -> None:
        now = time.time()
        first = first_seen if first_seen is not None else now
        last = last_seen if last_seen is not None else now
        key: _Key = (component, kind, destination, port, allowed)
        with self._lock:
            entry = self._pending.get(key)
            if entry is None:
                if len(self._pending) >= self.MAX_KEYS:
                    key = (component, kind, "(other destinations)", 0, allowed)
                    entry = self._pending.get(key)
                if entry is None:
                    self._pending[key] = [count, first, last, reason]
                    return
            entry[0] += count
            entry[1] = min(entry[1], first)
            entry[2] = max(entry[2], last)
            entry[3] = reason

    def add(self, records: Iterable[EgressRecord]) -> None:
        """Count records drained elsewhere (or put back after a failed flush)."""
        for r in records:
            self.record(
                r.component, r.kind, r.destination, r.port, r.allowed, r.reason,
                r.count, r.first_seen, r.last_seen,
            )  # fmt: skip

    def drain(self) -> list[EgressRecord]:
        """Everything counted since the last drain, which starts afresh."""
        with self._lock:
            pending, self._pending = self._pending, {}
        return [
            EgressRecord(key[0], key[1], key[2], key[3], key[4], value[3], *value[:3])
            for key, value in pending.items()
        ]


_component: contextvars.ContextVar[str] = contextvars.ContextVar("stockade_egress_component")


@contextlib.contextmanager
def as_component(name: str) -> Iterator[None]:
    """Attribute the attempts made in this context (and in threads started
    with ``asyncio.to_thread`` from it) to ``name``: the in-process build
    workers run as "provisioner" inside the server."""
    token = _component.set(name)
    try:
        yield
    finally:
        _component.reset(token)


class _Guard:
    def __init__(self, policy: EgressPolicy, component: str, ledger: EgressLedger) -> None:
        self.policy = policy
        self.component = component
        self.ledger = ledger
        self.busy = threading.local()
        # Addresses that names on the allow-list resolved to, with the
        # name's reason: connecting to them is allowed wherever they are
        # (an internal service may live on a non-private address).
        self.resolved: dict[str, str] = {}

    def learn(self, host: Any, result: Any) -> None:
        """Remember where ``host`` resolved to, when it may be reached."""
        if not isinstance(host, (str, bytes)) or not isinstance(result, list):
            return
        name = _normal_host(host.decode("ascii", "replace") if isinstance(host, bytes) else host)
        if _parse_ip(name) is not None:
            return  # an address, not a name: nothing learned
        reason = self.policy.decide(name)
        if reason is None:
            return
        if len(self.resolved) >= _DECISION_CACHE:
            self.resolved.clear()
        for entry in result:
            sockaddr = entry[4] if isinstance(entry, tuple) and len(entry) == 5 else None
            if isinstance(sockaddr, tuple) and isinstance(sockaddr[0], str):
                self.resolved[sockaddr[0]] = f"{reason} (its address)"

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        # Called for every audit event of the process (open, import...):
        # the cheap test comes first.
        if not event.startswith("socket."):
            return
        kind = _CONNECT_EVENTS.get(event)
        if kind is not None:
            sock, address = args[0], args[1]
            if not isinstance(address, tuple) or _family(sock) not in _IP_FAMILIES:
                return  # unix sockets, netlink; sendmsg on a connected socket
            host, port = address[0], address[1]
        elif event in _LOOKUP_EVENTS:
            kind = "resolve"
            if event == "socket.getaddrinfo":
                host, port = args[0], args[1]
            elif event == "socket.getnameinfo":
                sockaddr = args[0]
                host, port = (
                    (sockaddr[0], sockaddr[1]) if isinstance(sockaddr, tuple) else (None, 0)
                )
            else:
                host, port = args[0], 0
        else:
            return
        if host is not None:  # None: a passive lookup (binding every address)
            self.check(kind, host, port)

    def check(self, kind: str, host: Any, port: Any) -> None:
        """:meth:`_check`, unless this thread is inside a check already (a
        log handler's own socket, say)."""
        if getattr(self.busy, "active", False):
            return
        self.busy.active = True
        try:
            self._check(kind, host, port)
        finally:
            self.busy.active = False

    def _check(self, kind: str, host: Any, port: Any) -> None:
        if isinstance(host, (bytes, bytearray)):
            host = bytes(host).decode("ascii", "replace")
        host = _normal_host(str(host))
        if host in ("", "<broadcast>"):
            return
        try:
            number = int(port or 0)
        except (TypeError, ValueError):
            number = 0  # a service name ("https")
        component = _component.get(self.component)
        reason = self.policy.decide(host)
        if reason is None and kind != "resolve":
            reason = self.resolved.get(host)
        self.ledger.record(
            component, kind, host, number, reason is not None, reason or REASON_DENIED
        )
        if reason is None:
            denied = EgressDenied(kind, host, number, component)
            log.warning("%s", denied)
            raise denied


_guard: _Guard | None = None
_ledger = EgressLedger()


def ledger() -> EgressLedger:
    """The process's ledger, which the guard records into."""
    return _ledger


def install(policy: EgressPolicy, component: str) -> None:
    """Enforce ``policy`` from now on in this process, attributing attempts
    to ``component`` by default. The hook cannot be removed (audit hooks are
    for good), so a second call only replaces the policy and component."""
    global _guard
    if _guard is not None:
        _guard.policy = policy
        _guard.component = component
        return
    _guard = _Guard(policy, component, _ledger)
    sys.addaudithook(_guard.hook)
    # The audit event comes before the lookup; what it found is learned
    # here, after it (asyncio and most libraries call socket.getaddrinfo
    # through the module, so they get this one).
    socket.getaddrinfo = _learning(socket.getaddrinfo)


def _learning(original: Any) -> Any:
    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        result = original(host, port, *args, **kwargs)
        guard = _guard
        if guard is not None:
            guard.learn(host, result)
        return result

    getaddrinfo.__doc__ = original.__doc__
    getaddrinfo.__wrapped__ = original  # type: ignore[attr-defined]
    return getaddrinfo


def check(kind: str, host: Any, port: Any) -> None:
    """Check (and count) an attempt that no audit event announces, such as
    uvloop's own connects: raises :class:`EgressDenied` when the allow-list
    does not cover ``host``. Does nothing before :func:`install`."""
    if _guard is not None and host is not None:
        _guard.check(kind, host, port)


def guard_installed() -> bool:
    """Whether :func:`install` ran in this process."""
    return _guard is not None
