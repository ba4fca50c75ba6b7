"""A network with no way out, and a witness that nothing tried to leave.

Two network namespaces made for one test session, named with a random suffix:

* ``stk-iso-XXXXXX``, where the deployment runs (server, CLI, ssh, workspaces, a
  dockerd of its own);
* ``stk-sink-XXXXXX``, the "outside world": one end of a veth pair whose other
  end is stk-iso's only link. stk-iso's default routes (IPv4 and IPv6) point
  at the sink, so a packet to any address that is not stk-iso's own goes to
  the sink, and nowhere else: the sink forwards nothing (``ip_forward=0``, IPv6
  forwarding off, read back) and has no other interface. Nothing can leave
  the machine, and everything that tries is seen.

The pair has a random /30 of 169.254.0.0/16 (link-local: it exists only in
these two namespaces; 169.254.0.0/24, 169.254.255.0/24 and the metadata
service's 169.254.169.0/24 are avoided so that no address looks like anything
else) and the IPv6 link-local addresses the kernel gives each end. Every
address is read back from ``ip -j`` rather than trusted.

IPv6 stays on, with a default route via the sink's link-local address, so that
an IPv6 attempt is caught like an IPv4 one (turning IPv6 off would make such
an attempt fail inside stk-iso, unseen). The link is made silent instead: both
ends are ``NOARP`` with permanent neighbour entries for each other, router
solicitations and router advertisements are off and duplicate address
detection too. With ``NOARP`` the kernel does not join the solicited-node
multicast groups (so it sends no MLD report), runs no DAD and sends no ARP or
neighbour solicitation. Measured here: not one packet in the 10 s after
link-up, where with the kernel's defaults the same link carried 14 in 7 s
(MLD reports, DAD's neighbour solicitations, and router solicitations, which
repeat with back-off for as long as the link is up). So nothing needs
filtering: the capture (on the sink's end, inbound only: what stk-iso sent)
must be empty, and any packet in it is an egress attempt. (Where the machine
has IPv6 off, stk-iso cannot send IPv6 at all.)

``Capture`` runs tcpdump in the sink; ``NamespacedDockerd`` runs a second Docker
daemon inside stk-iso (its own containerd, data and exec roots, socket; its
bridges and iptables rules exist only in stk-iso); ``NamespacedServer`` is the
real ``stockade server`` started with ``ip netns exec``. Everything here needs
root.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stockade.devtools.server import ServerProcess

NETNS_DIR = Path("/run/netns")
# The /30s the pair may get: 169.254.1.0 - 169.254.254.255 but 169.254.169.0/24.
_LINK_LOCAL = ipaddress.IPv4Network("169.254.0.0/16")
_AVOID = [
    ipaddress.IPv4Network(net) for net in ("169.254.0.0/24", "169.254.169.0/24", "169.254.255.0/24")
]

# Set on both ends before they go up (see the module docstring).
_SILENT_LINK_SYSCTLS = {"accept_ra": "0", "router_solicitations": "0", "accept_dad": "0"}


def missing_tools(*tools: str) -> list[str]:
    """The tools (executables on PATH) that are not installed."""
    return [tool for tool in tools if shutil.which(tool) is None]


def _run(args: Sequence[str], *, timeout: float = 30, check: bool = True, **kwargs: Any) -> str:
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False, **kwargs
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited with {result.returncode}: {result.stderr}")
    return str(result.stdout)


def _netns_inode(pid: int | str) -> int:
    """The inode of a process's network namespace (``pid`` may be ``self``)."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


@dataclass(frozen=True)
class LinkEnd:
    """One end of the veth pair, as ``ip -j addr`` shows it."""

    namespace: str
    name: str
    mac: str
    ipv4: str
    ipv6: str | None  # the link-local address; None where the kernel has no IPv6


@dataclass(frozen=True)
class IsolatedNetwork:
    """The two namespaces and the link between them."""

    iso: str
    sink: str
    inside: LinkEnd  # stk-iso's end
    outside: LinkEnd  # the sink's end

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.iso

    def prefix(self) -> list[str]:
        """Run a command inside stk-iso (``ip netns exec`` execs it: its pid is
        the command's)."""
        return ["ip", "netns", "exec", self.iso]

    def run(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        timeout: float = 120,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``args`` inside stk-iso; stdout and stderr captured."""
        return subprocess.run(
            [*self.prefix(), *args],
            capture_output=True, text=True, env=env, timeout=timeout, check=False,
            input=input, stdin=None if input is not None else subprocess.DEVNULL,
        )  # fmt: skip

    def pids(self, namespace: str | None = None) -> list[int]:
        """The processes in a namespace (stk-iso by default)."""
        out = _run(["ip", "netns", "pids", namespace or self.iso], check=False)
        return [int(pid) for pid in out.split()]

    def runs_inside(self, pid: int) -> bool:
        """Whether process ``pid`` is in stk-iso's network namespace."""
        return _netns_inode(pid) == self.netns_path.stat().st_ino


def _random_slash30() -> ipaddress.IPv4Network:
    while True:
        offset = secrets.randbelow(_LINK_LOCAL.num_addresses // 4) * 4
        net = ipaddress.IPv4Network((int(_LINK_LOCAL.network_address) + offset, 30))
        if not any(net.subnet_of(avoid) for avoid in _AVOID):
            return net


def _write_sysctls(namespace: str, values: dict[str, str]) -> None:
    """Write /proc/sys keys (``net/ipv4/ip_forward``...) inside ``namespace``
    and read them back (no dependency on procps' sysctl)."""
    script = " && ".join(f"echo {v} > /proc/sys/{k}" for k, v in values.items())
    _run(["ip", "netns", "exec", namespace, "sh", "-c", script])
    for key, value in values.items():
        got = _run(["ip", "netns", "exec", namespace, "cat", f"/proc/sys/{key}"]).strip()
        if got != value:
            raise RuntimeError(f"{key} in {namespace} is {got}, not {value}")


def _ipv6_on(namespace: str, name: str) -> bool:
    """Whether the kernel does IPv6 on this interface (not at all without the
    module; ``disable_ipv6`` where the machine turns it off by default)."""
    if not Path("/proc/sys/net/ipv6").is_dir():
        return False
    key = f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6"
    return _run(["ip", "netns", "exec", namespace, "cat", key]).strip() == "0"


def _link_end(namespace: str, name: str, timeout: float = 5.0) -> LinkEnd:
    """Read an end back, waiting for its IPv6 link-local address (which comes
    once the link has a carrier) where the kernel does IPv6."""
    has_ipv6 = _ipv6_on(namespace, name)
    deadline = time.monotonic() + timeout
    while True:
        (info,) = json.loads(_run(["ip", "-j", "-n", namespace, "addr", "show", "dev", name]))
        ipv4 = [a["local"] for a in info["addr_info"] if a["family"] == "inet"]
        ipv6 = [
            a["local"]
            for a in info["addr_info"]
            if a["family"] == "inet6" and a.get("scope") == "link" and not a.get("tentative")
        ]
        if len(ipv4) == 1 and (ipv6 or not has_ipv6):
            if "NOARP" not in info["flags"] or "UP" not in info["flags"]:
                raise RuntimeError(f"{name} in {namespace} is not up and NOARP: {info['flags']}")
            return LinkEnd(namespace, name, info["address"], ipv4[0], ipv6[0] if ipv6 else None)
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} in {namespace} has no addresses yet: {info}")
        time.sleep(0.05)


def create_isolated_network() -> IsolatedNetwork:
    """Make the two namespaces and the link; see the module docstring."""
    suffix = secrets.token_hex(3)
    iso, sink = f"stk-iso-{suffix}", f"stk-sink-{suffix}"
    iso_if, sink_if = f"stk-i-{suffix}", f"stk-s-{suffix}"  # 15 characters at most
    made: list[str] = []
    try:
        for namespace in (iso, sink):
            _run(["ip", "netns", "add", namespace])
            made.append(namespace)
        # Made inside the namespaces directly: never an interface in the root one.
        _run(["ip", "link", "add", iso_if, "netns", iso, "type", "veth",
              "peer", "name", sink_if, "netns", sink])  # fmt: skip
        _write_sysctls(sink, {"net/ipv4/ip_forward": "0"})
        if _ipv6_on(iso, iso_if):
            _write_sysctls(sink, {"net/ipv6/conf/all/forwarding": "0"})
            for namespace, name in ((iso, iso_if), (sink, sink_if)):
                _write_sysctls(
                    namespace,
                    {f"net/ipv6/conf/{name}/{k}": v for k, v in _SILENT_LINK_SYSCTLS.items()},
                )
        subnet = _random_slash30()
        sink_addr, iso_addr = list(subnet.hosts())
        for namespace, name, address in ((sink, sink_if, sink_addr), (iso, iso_if, iso_addr)):
            _run(["ip", "-n", namespace, "link", "set", "lo", "up"])
            _run(["ip", "-n", namespace, "link", "set", name, "arp", "off"])
            _run(["ip", "-n", namespace, "addr", "add", f"{address}/30", "dev", name])
            _run(["ip", "-n", namespace, "link", "set", name, "up"])
        inside, outside = _link_end(iso, iso_if), _link_end(sink, sink_if)
        # NOARP: each end knows the other's MAC address for good, so neither
        # ever asks (no ARP, no neighbour solicitation on the wire).
        for here, there in ((inside, outside), (outside, inside)):
            for neighbour in (there.ipv4, there.ipv6):
                if neighbour:
                    _run(["ip", "-n", here.namespace, "neigh", "replace", neighbour,
                          "lladdr", there.mac, "dev", here.name, "nud", "permanent"])  # fmt: skip
        _run(["ip", "-n", iso, "route", "add", "default", "via", outside.ipv4])
        if outside.ipv6:
            _run(["ip", "-n", iso, "-6", "route", "add", "default",
                  "via", outside.ipv6, "dev", iso_if])  # fmt: skip
        network = IsolatedNetwork(iso=iso, sink=sink, inside=inside, outside=outside)
        _check_routes(network)
        return network
    except BaseException:
        for namespace in made:
            _run(["ip", "netns", "del", namespace], check=False)
        raise


def _check_routes(network: IsolatedNetwork) -> None:
    """stk-iso's routes, read back: its link's subnet, and defaults via the sink."""
    families = [("-4", network.outside.ipv4)]
    if network.outside.ipv6:
        families.append(("-6", network.outside.ipv6))
    for family, gateway in families:
        routes = json.loads(_run(["ip", "-j", family, "-n", network.iso, "route", "show"]))
        defaults = [r for r in routes if r["dst"] == "default"]
        if [(r.get("gateway"), r.get("dev")) for r in defaults] != [(gateway, network.inside.name)]:
            raise RuntimeError(f"stk-iso's {family} default routes are not via the sink: {routes}")
        devices = {r.get("dev") for r in routes}
        if devices != {network.inside.name}:
            raise RuntimeError(f"stk-iso has {family} routes beyond its link: {routes}")


def destroy_isolated_network(network: IsolatedNetwork) -> None:
    """Kill what still runs in the namespaces (the test's own processes:
    nothing else can be in them) and delete them, which deletes the pair."""
    for namespace in (network.iso, network.sink):
        for pid in network.pids(namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _run(["ip", "netns", "del", namespace], check=False)


@contextlib.contextmanager
def isolated_network() -> Iterator[IsolatedNetwork]:
    network = create_isolated_network()
    try:
        yield network
    finally:
        destroy_isolated_network(network)


# --- the capture ----------------------------------------------------------------------------


class Capture:
    """tcpdump on the sink's end of the link, inbound only: every packet that
    stk-iso sent towards the outside world. The sink's own answers (a reset
    when something connects to the sink's address) are not recorded."""

    def __init__(self, network: IsolatedNetwork, path: Path) -> None:
        self.network = network
        self.path = path
        self.log_path = path.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Capture:
        """Start tcpdump and return once it is capturing."""
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["ip", "netns", "exec", self.network.sink, "tcpdump",
                 "-i", self.network.outside.name, "-Q", "in", "-n",
                 # -U: each packet is written as it comes (a killed tcpdump
                 # loses nothing); -Z root: Debian's tcpdump otherwise writes
                 # the file as the tcpdump user, who cannot enter pytest's dirs.
                 "-U", "-Z", "root", "-w", str(self.path)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while "listening on" not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tcpdump did not start: {self.log_path.read_text()}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Stop tcpdump (SIGINT: it flushes and closes the file)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def packets(self) -> list[str]:
        """Every captured packet, one line each (``tcpdump -r -n -e -tt``:
        time, MAC addresses, ethertype, addresses and ports)."""
        out = _run(["tcpdump", "-r", str(self.path), "-n", "-e", "-tt"])
        return [line for line in out.splitlines() if line.strip()]

    def __enter__(self) -> Capture:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- a Docker daemon inside stk-iso ---------------------------------------------------------


class NamespacedDockerd:
    """A second dockerd, in stk-iso's network namespace: its own containerd,
    data root, exec root, pid file and socket, with no default bridge (the
    docker backend makes its deployment's network). Its bridges, veths and
    iptables rules exist only in stk-iso, so its containers reach stk-iso's
    addresses and, through its NAT and stk-iso's default route, the sink.

    It is started with ``nsenter --net`` rather than ``ip netns exec``: the
    latter also gives the command a mount namespace with a fresh /sys, where
    the cgroup hierarchies are not mounted, and dockerd then refuses to start
    ("Devices cgroup isn't mounted"). Only the network namespace matters here.

    The test process stays in the root namespace and talks to it over its unix
    socket, which belongs to no network namespace."""

    def __init__(self, network: IsolatedNetwork) -> None:
        self.network = network
        # Short: the socket path (and containerd's, under the exec root) must
        # fit a sockaddr_un's 108 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="stk-dockerd-"))
        self.socket = self.root / "docker.sock"
        self.host = f"unix://{self.socket}"
        self.log_path = self.root / "dockerd.log"
        self.process: subprocess.Popen[bytes] | None = None

    def docker(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """The docker CLI against this daemon."""
        result = subprocess.run(
            ["docker", "-H", self.host, *args],
            capture_output=True, text=True, timeout=timeout, check=False, env=_host_docker_env(),
        )  # fmt: skip
        if check and result.returncode != 0:
            raise RuntimeError(f"docker {' '.join(args)}: {result.stderr}")
        return result

    def start(self, timeout: float = 60.0) -> NamespacedDockerd:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                ["nsenter", f"--net={self.network.netns_path}", "dockerd",
                 "--data-root", str(self.root / "data"), "--exec-root", str(self.root / "exec"),
                 "--pidfile", str(self.root / "docker.pid"), "-H", self.host, "--bridge", "none"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                # Its own process group, with the containerd it starts: the
                # group is killed if dockerd will not stop.
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dockerd in {self.network.iso} exited: {self.logs()}")
            if self.docker("version", timeout=10, check=False).returncode == 0:
                break
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dockerd in {self.network.iso} did not answer: {self.logs()}")
            time.sleep(0.1)
        if not self.network.runs_inside(self.process.pid):
            self.stop()
            raise RuntimeError(f"dockerd is not in {self.network.iso}'s network namespace")
        return self

    def load_image(self, image: str) -> None:
        """Copy ``image`` from the host's daemon (never pulled)."""
        save = subprocess.Popen(
            ["docker", "save", image], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=_host_docker_env(),
        )  # fmt: skip
        assert save.stdout is not None
        try:
            load = subprocess.run(
                ["docker", "-H", self.host, "load", "-q"],
                stdin=save.stdout, capture_output=True, text=True, timeout=300, check=False,
            )  # fmt: skip
        finally:
            save.stdout.close()
            _, save_err = save.communicate(timeout=60)
        if save.returncode != 0 or load.returncode != 0:
            raise RuntimeError(f"copying {image}: {save_err.decode(errors='replace')}{load.stderr}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Remove its containers, stop it (and its containerd), unmount what it
        left mounted and delete its directories."""
        if self.process is not None and self.process.poll() is None:
            listed = self.docker("ps", "-aq", timeout=30, check=False).stdout.split()
            if listed:
                self.docker("rm", "-f", *listed, timeout=120, check=False)
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for mount_point in reversed(_mounts_under(self.root)):
            _run(["umount", "-l", mount_point], check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> NamespacedDockerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _host_docker_env() -> dict[str, str]:
    # The host's daemon for `docker save`; -H names ours explicitly.
    return {k: v for k, v in os.environ.items() if k not in ("DOCKER_HOST", "DOCKER_CONTEXT")}


def _mounts_under(root: Path) -> list[str]:
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        mount_point = line.split()[4].replace("\\040", " ")
        if mount_point == str(root) or mount_point.startswith(f"{root}/"):
            found.append(mount_point)
    return found


# --- the server -----------------------------------------------------------------------------


class NamespacedServer(ServerProcess):
    """``stockade server`` started inside stk-iso with ``ip netns exec``. Its
    readiness probe runs in there too (curl), since the test process, in the
    root namespace, cannot reach stk-iso's loopback."""

    def __init__(self, network: IsolatedNetwork, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.network = network

    def command(self) -> list[str]:
        return [*self.network.prefix(), *super().command()]

    def start(self, timeout: float = 60.0) -> NamespacedServer:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
        env.update(self.extra_env)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                stdin=subprocess.DEVNULL,
            )  # fmt: skip
        probe = ["curl", "-fsS", "-o", "/dev/null", "--max-time", "2", f"{self.url}/healthz"]
        while time.perf_counter() < started + timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.logs()}")
            if self.network.run(probe, timeout=10).returncode == 0:
                self.ready_seconds = time.perf_counter() - started
                if not self.network.runs_inside(self.process.pid):
                    raise RuntimeError(f"the server is not in {self.network.iso}")
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s: {self.logs()}")
