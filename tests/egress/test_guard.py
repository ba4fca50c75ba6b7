"""The egress guard: the policy's decisions, the ledger, and the hook itself
in a real process, whose connections go through asyncio, httpx, urllib and
plain sockets.

The hook runs in a child process inside a network namespace of its own
(``unshare --net``, only loopback): a guard that failed to refuse would send
nothing beyond this machine, and its failure shows as a network error
instead of the guard's refusal."""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from stockade.egress import EgressDenied, EgressLedger, EgressPolicy, EgressRecord, is_internal
from stockade.egress.guard import REASON_HOSTNAME, REASON_LOOPBACK, REASON_OWN, REASON_PRIVATE
from tests.conftest import require


def test_the_default_policy_allows_loopback_and_private_networks_only() -> None:
    policy = EgressPolicy.build()
    assert policy.decide("127.0.0.1") == REASON_LOOPBACK
    assert policy.decide("::1") == REASON_LOOPBACK
    assert policy.decide("0.0.0.0") == REASON_LOOPBACK
    assert policy.decide("localhost") == REASON_LOOPBACK
    assert policy.decide("LOCALHOST.") == REASON_LOOPBACK
    # This host's own name is looked up all the time; not a loopback address.
    assert policy.decide(socket.gethostname()) == REASON_HOSTNAME
    assert policy.decide("10.1.2.3") == REASON_PRIVATE
    assert policy.decide("172.20.0.1") == REASON_PRIVATE
    assert policy.decide("192.168.5.5") == REASON_PRIVATE
    assert policy.decide("fd12:3456::1") == REASON_PRIVATE
    assert policy.decide("::ffff:10.0.0.1") == REASON_PRIVATE  # IPv4-mapped
    # The internet, link-local (cloud metadata) and every name not listed.
    for denied in ("8.8.8.8", "172.32.0.1", "169.254.169.254", "2001:db8::1", "example.com"):
        assert policy.decide(denied) is None, denied


def test_entries_add_addresses_networks_names_and_domains() -> None:
    policy = EgressPolicy.build(
        ["203.0.113.7", "198.51.100.0/24", "IdP.Corp.Internal", "*.llm.internal"],
        private_networks=False,
        own_hosts=["stockade.example"],
    )
    assert policy.decide("10.0.0.1") is None  # private networks are off
    assert policy.decide("127.0.0.1") == REASON_LOOPBACK  # never off
    assert policy.decide("203.0.113.7") == "allow-list entry 203.0.113.7"
    assert policy.decide("198.51.100.200") == "allow-list entry 198.51.100.0/24"
    assert policy.decide("idp.corp.internal") == "allow-list entry idp.corp.internal"
    assert policy.decide("a.b.llm.internal") == "allow-list entry *.llm.internal"
    assert policy.decide("llm.internal") is None  # *.domain: names under it only
    assert policy.decide("evil-llm.internal") is None
    assert policy.decide("stockade.example") == REASON_OWN
    again = EgressPolicy.from_wire(json.loads(json.dumps(policy.to_wire())), own_hosts=["x.y"])
    for host in ("203.0.113.7", "idp.corp.internal", "a.llm.internal", "stockade.example"):
        assert again.decide(host) == policy.decide(host)
    assert again.decide("x.y") == REASON_OWN
    assert again.decide("10.0.0.1") is None


@pytest.mark.parametrize("entry", ["not a host", "http://idp/", "*.", "-bad-.example", "a..b"])
def test_a_bad_entry_is_refused_with_what_would_do(entry: str) -> None:
    with pytest.raises(ValueError, match="not an IP address, a CIDR network") as caught:
        EgressPolicy.build([entry])
    assert repr(entry) in str(caught.value)


def test_malformed_policies_and_records_from_other_processes_are_refused() -> None:
    with pytest.raises(ValueError, match="malformed egress policy"):
        EgressPolicy.from_wire({"networks": [["not-a-network", "x"]]})
    with pytest.raises(ValueError, match="malformed egress record"):
        EgressRecord.from_dict({"kind": "connect", "destination": "x"}, "agent:1")
    with pytest.raises(ValueError, match="malformed egress record"):
        EgressRecord.from_dict(
            {"kind": "teleport", "destination": "x", "count": 1, "first_seen": 1,
             "last_seen": 2}, "agent:1",
        )  # fmt: skip


def test_the_ledger_counts_by_destination_and_decision_until_drained() -> None:
    ledger = EgressLedger()
    ledger.record("server", "connect", "10.0.0.5", 5432, True, REASON_PRIVATE)
    ledger.record("server", "connect", "10.0.0.5", 5432, True, REASON_PRIVATE)
    ledger.record("server", "resolve", "example.com", 443, False, "denied")
    records = {(r.destination, r.allowed): r for r in ledger.drain()}
    assert records[("10.0.0.5", True)].count == 2
    assert records[("10.0.0.5", True)].first_seen <= records[("10.0.0.5", True)].last_seen
    assert records[("example.com", False)].count == 1
    assert ledger.drain() == []
    # Put back (a failed flush), they add up with what came since.
    ledger.add(records.values())
    ledger.record("server", "connect", "10.0.0.5", 5432, True, REASON_PRIVATE)
    again = {(r.destination, r.allowed): r.count for r in ledger.drain()}
    assert again == {("10.0.0.5", True): 3, ("example.com", False): 1}


def test_a_flood_of_destinations_is_counted_in_bounded_memory() -> None:
    ledger = EgressLedger()
    ledger.MAX_KEYS = 10
    for port in range(1, 101):
        ledger.record("agent:w", "connect", "10.9.9.9", port, False, "denied")
    records = ledger.drain()
    assert len(records) == 11
    assert sum(r.count for r in records) == 100
    assert any(r.destination == "(other destinations)" for r in records)


def test_internal_is_loopback_or_private_whatever_the_allow_list() -> None:
    assert is_internal("127.0.0.1") and is_internal("10.0.0.1") and is_internal("localhost")
    assert not is_internal("203.0.113.7") and not is_internal("idp.corp.internal")


# --- the hook in a real process ----------------------------------------------

_PROBE = textwrap.dedent(
    """
    import asyncio, json, socket, sys, urllib.request
    import httpx
    from stockade import egress
    from stockade.egress import EgressDenied, EgressPolicy

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    egress.install(EgressPolicy.build(sys.argv[1:]), "probe")
    results = {}

    def attempt(name, call):
        try:
            call()
            results[name] = "ok"
        except Exception as exc:
            # httpx and urllib wrap the OSError: look down the chain.
            cause = exc
            while cause is not None and not isinstance(cause, EgressDenied):
                cause = cause.__cause__ or cause.__context__
            if cause is not None:
                results[name] = "denied: " + str(cause)
            elif isinstance(exc, OSError):
                results[name] = "oserror: " + type(exc).__name__
            else:
                results[name] = "error: " + repr(exc)

    def plain(host, port_):
        with socket.create_connection((host, port_), timeout=2):
            pass

    def udp(host):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(b"x", (host, 53))

    async def via_asyncio(host, port_):
        _, writer = await asyncio.open_connection(host, port_)
        writer.close()

    attempt("loopback", lambda: plain("127.0.0.1", port))
    attempt("localhost_name", lambda: plain("localhost", port))
    attempt("public_address", lambda: plain("203.0.113.7", 80))
    attempt("raw_connect", lambda: socket.socket().connect(("203.0.113.8", 80)))
    v6 = socket.socket(socket.AF_INET6)
    attempt("raw_connect_v6", lambda: v6.connect_ex(("2001:db8::1", 80)))
    attempt("link_local_metadata", lambda: plain("169.254.169.254", 80))
    attempt("public_name", lambda: socket.getaddrinfo("example.com", 443))
    attempt("gethostbyname", lambda: socket.gethostbyname("example.com"))
    attempt("udp_public", lambda: udp("203.0.113.9"))
    attempt("asyncio_public", lambda: asyncio.run(via_asyncio("203.0.113.7", 443)))
    attempt("asyncio_loopback", lambda: asyncio.run(via_asyncio("127.0.0.1", port)))
    attempt("httpx_name", lambda: httpx.get("http://updates.example.com/check", timeout=2))
    attempt("urllib_public", lambda: urllib.request.urlopen("http://203.0.113.7/", timeout=2))
    # uvloop connects in C, out of the hook's sight (the namespace has no
    # route: its attempt fails in the kernel); the server's loop checks first.
    import uvloop
    from stockade.server.loop import GuardedLoop

    def on(loop_class, coro):
        loop = loop_class()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.close()

    attempt("bare_uvloop_public", lambda: on(uvloop.Loop, via_asyncio("203.0.113.7", 443)))
    attempt("guarded_uvloop_public", lambda: on(GuardedLoop, via_asyncio("203.0.113.7", 443)))
    attempt("guarded_uvloop_name", lambda: on(GuardedLoop, via_asyncio("example.com", 443)))
    attempt("guarded_uvloop_lookup",
            lambda: on(GuardedLoop, GuardedLoop().getaddrinfo("example.org", 80)))
    attempt("guarded_uvloop_loopback", lambda: on(GuardedLoop, via_asyncio("127.0.0.1", port)))

    async def via_httpx(url):
        async with httpx.AsyncClient() as client:
            await client.get(url, timeout=2)

    attempt("guarded_uvloop_httpx", lambda: on(GuardedLoop, via_httpx("http://203.0.113.7/")))
    # Allowed by the policy; the namespace has no route there, so the
    # kernel's refusal shows that the guard let it through.
    attempt("private_allowed", lambda: plain("10.255.255.1", 9))
    attempt("listed_address", lambda: plain("198.51.100.20", 9))
    # A listed name (in the namespace's own /etc/hosts) on an address no
    # entry covers: reachable by its name, and at the address it resolved to.
    attempt("listed_name", lambda: plain("llm.corp.test", 9))
    attempt("address_of_listed_name", lambda: socket.socket().connect(("203.0.113.50", 9)))
    attempt("unlisted_neighbour", lambda: socket.socket().connect(("203.0.113.51", 9)))
    records = [r.as_dict() for r in egress.ledger().drain()]
    print(json.dumps({"results": results, "records": records}))
    """
)


def _run_probe(hosts: Path, *allow: str) -> dict[str, Any]:
    """The probe in a network namespace of its own (only lo) and a mount
    namespace of its own, whose /etc/hosts is ``hosts``."""
    require("unshare", shutil.which("unshare") is not None, "apt-get install util-linux")
    require("ip", shutil.which("ip") is not None, "apt-get install iproute2")
    setup = f'ip link set lo up && mount --bind {hosts} /etc/hosts && exec "$0" "$@"'
    done = subprocess.run(
        ["unshare", "--net", "--mount", "sh", "-c", setup, sys.executable, "-c", _PROBE, *allow],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_the_hook_refuses_every_library_before_any_packet_and_counts_everything(
    tmp_path: Path,
) -> None:
    started = time.time()
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n203.0.113.50 llm.corp.test\n")
    probe = _run_probe(hosts, "198.51.100.0/24", "llm.corp.test")
    results = probe["results"]
    assert results["loopback"] == "ok"
    assert results["localhost_name"] == "ok"
    assert results["asyncio_loopback"] == "ok"
    assert results["guarded_uvloop_loopback"] == "ok"
    # The boundary the server's loop closes: plain uvloop is not seen.
    assert results["bare_uvloop_public"].startswith("oserror"), results["bare_uvloop_public"]
    for name in ("public_address", "raw_connect", "raw_connect_v6", "link_local_metadata",
                 "public_name", "gethostbyname", "udp_public", "asyncio_public", "httpx_name",
                 "urllib_public", "guarded_uvloop_public", "guarded_uvloop_name",
                 "guarded_uvloop_lookup", "guarded_uvloop_httpx"):  # fmt: skip
        assert results[name].startswith("denied: "), (name, results[name])
    assert "add it to the server's egress_allow setting" in results["public_address"]
    # Allowed, then refused by the kernel (no route in the namespace).
    assert results["private_allowed"].startswith("oserror"), results["private_allowed"]
    assert results["listed_address"].startswith("oserror"), results["listed_address"]
    assert results["listed_name"].startswith("oserror"), results["listed_name"]
    assert results["address_of_listed_name"].startswith("oserror")
    assert results["unlisted_neighbour"].startswith("denied: "), results["unlisted_neighbour"]

    records = {(r["kind"], r["destination"], r["port"]): r for r in probe["records"]}
    denied = {key for key, r in records.items() if not r["allowed"]}
    # create_connection resolves even an address first: refused there.
    assert ("resolve", "203.0.113.7", 80) in denied
    assert ("resolve", "169.254.169.254", 80) in denied
    assert ("connect", "203.0.113.8", 80) in denied
    assert ("connect", "2001:db8::1", 80) in denied
    assert ("resolve", "example.com", 443) in denied
    assert ("resolve", "example.com", 0) in denied  # gethostbyname
    assert ("send", "203.0.113.9", 53) in denied
    assert ("resolve", "updates.example.com", 80) in denied
    assert ("connect", "203.0.113.7", 443) in denied
    allowed = {key: r for key, r in records.items() if r["allowed"]}
    private = allowed[("connect", "10.255.255.1", 9)]
    assert private["reason"] == REASON_PRIVATE and private["component"] == "probe"
    assert allowed[("connect", "198.51.100.20", 9)]["reason"] == "allow-list entry 198.51.100.0/24"
    assert allowed[("connect", "203.0.113.50", 9)]["reason"] == (
        "allow-list entry llm.corp.test (its address)"
    )
    loopback = [r for (kind, dest, _), r in allowed.items() if dest == "127.0.0.1"]
    assert loopback and all(r["reason"] == REASON_LOOPBACK for r in loopback)
    for r in probe["records"]:
        assert started - 1 <= r["first_seen"] <= r["last_seen"] <= time.time() + 1
        assert ipaddress.ip_address(r["destination"]) if r["kind"] != "resolve" else True


def test_denied_is_an_oserror_so_libraries_treat_it_as_a_failed_connection() -> None:
    assert issubclass(EgressDenied, PermissionError)
    error = EgressDenied("connect", "203.0.113.7", 80, "server")
    assert "203.0.113.7:80" in str(error) and "the server" in str(error)
