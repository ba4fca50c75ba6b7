"""Zero egress, proven on the wire: the main flow runs in a network namespace
whose only way out leads into a sink that records every packet and forwards
none (isolation.py), and not one packet may reach the sink.

The flow, every command started inside stk-iso: ``stockade server`` (with a
dockerd of its own in stk-iso for docker workspaces), the first user, a
``local``, a ``docker`` and a ``terraform`` template from ``stockade templates
init`` and a Terraform template that runs a container through the docker CLI,
each with an app added, a workspace of each (``create`` waits for its agent),
a command in each through ``stockade ssh`` (the real OpenSSH client), each app
fetched through the app proxy, then stop (and for the Terraform container a
start again, its home kept) and delete, and ``stockade egress report``
(nothing denied). The capture covers all of it, from dockerd's start to the
server's exit.

The instrument is tested too: a canary test first shows that the capture sees
SYNs from stk-iso (IPv4 and IPv6), and after the flow a container on the
workspaces' network sends one, seen in a second capture that also covers
dockerd's shutdown."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import OWNER_PASSWORD, require
from tests.e2e.conftest import require_tools
from tests.e2e.isolation import Capture, IsolatedNetwork, NamespacedDockerd, NamespacedServer
from tests.provisioner.conftest import BASE_IMAGE, image_present, stop_local_workspaces
from tests.provisioner.test_terraform import TEMPLATES as TERRAFORM_TEMPLATES
from tests.provisioner.test_terraform import TERRAFORM_IN_SERVER, kill_sandboxes

TERRAFORM_DOCKER = TERRAFORM_TEMPLATES / "docker"

# A SYN as tcpdump -n prints it: "SRC.PORT > DST.PORT: Flags [S]".
SYN = re.compile(
    r", length \d+: (?P<src>[0-9a-f:.]+)\.\d+ > (?P<dst>[0-9a-f:.]+)\.(?P<port>\d+): Flags \[S\]"
)

# Tries each HOST PORT pair with a short timeout; prints what happened.
PROBE = r"""
import socket, sys
args = sys.argv[1:]
for host, port in zip(args[::2], args[1::2]):
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        print(host, "connected")
    except ConnectionRefusedError:
        print(host, "refused")
    except OSError as exc:
        print(host, type(exc).__name__, exc.errno)
"""


def test_the_capture_sees_what_tries_to_leave(isolated: IsolatedNetwork, tmp_path: Path) -> None:
    """The capture can fail the main test: one SYN from stk-iso to the sink's
    own address and one to an address beyond it are both captured, and
    nothing else is (the link itself is silent)."""
    inside, outside = isolated.inside, isolated.outside
    # 192.0.2.1 (TEST-NET-1) stands for "anything on the internet". It is safe
    # here ONLY because the SYN is sent from inside stk-iso, whose only route
    # leads into stk-sink, which forwards nothing: the packet cannot leave the
    # pair. Never send to it from the root namespace.
    beyond = "192.0.2.1"
    targets = [(outside.ipv4, 9), (beyond, 443)]
    if outside.ipv6:
        # The same for IPv6: the sink's link-local address, and one of the
        # documentation prefix (2001:db8::/32) that only the sink can see.
        targets += [(f"{outside.ipv6}%{inside.name}", 9), ("2001:db8::1", 443)]
    args = [str(part) for target in targets for part in target]
    with Capture(isolated, tmp_path / "canary.pcap") as capture:
        probed = isolated.run([sys.executable, "-c", PROBE, *args], timeout=30)
    assert probed.returncode == 0, probed.stderr
    outcomes = dict(line.split(" ", 1) for line in probed.stdout.splitlines())
    # The sink's kernel got the SYN and said no: the link and the route work.
    assert outcomes[outside.ipv4] == "refused", outcomes

    assert_only_syns(isolated, capture, {(host.split("%")[0], port) for host, port in targets})


def assert_only_syns(
    network: IsolatedNetwork, capture: Capture, expected: set[tuple[str, int]]
) -> None:
    """The capture holds SYNs (retransmissions too) from stk-iso to each of
    ``expected`` (address, port), and nothing else."""
    packets = capture.packets()
    seen: set[tuple[str, int]] = set()
    for line in packets:
        syn = SYN.search(line)
        assert syn is not None, f"not one of the canary's SYNs: {line}\nall: {packets}"
        assert f"{network.inside.mac} > {network.outside.mac}," in line, line
        assert syn["src"] in (network.inside.ipv4, network.inside.ipv6), line
        seen.add((syn["dst"], int(syn["port"])))
    assert seen == expected, f"captured {seen}, sent {expected}: {packets}"


# --- the main flow ---------------------------------------------------------------------------

APP = r"""
import http.server, os, socketserver, sys

# socketserver's TCPServer, not http.server's: HTTPServer looks up the name of
# its address (getfqdn), which can ask the DNS server; the capture would say so.
class Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("hello from " + sys.argv[2] + " at " + self.path).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

socketserver.TCPServer.allow_reuse_address = True
server = socketserver.TCPServer(("127.0.0.1", int(sys.argv[1])), Hello)
open(os.environ["HOME"] + "/hello.ready", "w").close()
server.serve_forever()
"""


def add_app(directory: Path, port: int) -> str:
    """Give the starter ``stockade templates init`` wrote a web app (started by
    the startup script, which waits until it listens); returns its marker."""
    path = directory / "stockade.yaml"
    manifest: dict[str, Any] = yaml.safe_load(path.read_text())
    marker = f"{manifest['name']}-{secrets.token_hex(4)}"
    manifest["apps"] = [{"slug": "hello", "display_name": "Hello", "port": port}]
    manifest["agent"]["startup_script"] += (
        f"cat > \"$HOME/hello.py\" <<'EOF'\n{APP}\nEOF\n"
        'rm -f "$HOME/hello.ready"\n'
        f'nohup python3 "$HOME/hello.py" {port} {marker} > "$HOME/hello.log" 2>&1 < /dev/null &\n'
        'for _ in $(seq 200); do [ -f "$HOME/hello.ready" ] && break; sleep 0.05; done\n'
        '[ -f "$HOME/hello.ready" ]\n'
    )
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    return marker


@dataclass
class Flow:
    """The CLI as a user runs it, inside stk-iso, with its own HOME and config."""

    network: IsolatedNetwork
    home: Path
    timings: dict[str, float]

    @property
    def config_dir(self) -> Path:
        return self.home / ".config" / "stockade"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STOCKADE_", "DOCKER_"))}
        env.update(HOME=str(self.home), STOCKADE_CONFIG_DIR=str(self.config_dir), COLUMNS="200")
        return env

    def run(self, *args: str, ok: bool = True, timeout: float = 300, label: str = "") -> str:
        started = time.perf_counter()
        result = self.network.run([*args], env=self.env(), timeout=timeout)
        label = label or " ".join(args[:2])
        spent = time.perf_counter() - started + self.timings.get(label, 0)
        self.timings[label] = round(spent, 2)
        if ok:
            assert result.returncode == 0, (
                f"{shlex.join(args)} exited with {result.returncode}:\n"
                f"{result.stdout}\n{result.stderr}"
            )
        return result.stdout

    def stockade(self, *args: str, ok: bool = True, timeout: float = 300) -> str:
        words = args[:2] if args[0] in ("templates", "egress") else args[:1]
        command = [sys.executable, "-m", "stockade", *args]
        return self.run(*command, ok=ok, timeout=timeout, label="stockade " + " ".join(words))

    def token(self) -> str:
        token: str = json.loads((self.config_dir / "session.json").read_text())["token"]
        return token


@pytest.fixture
def docker_tools() -> None:
    require_tools("docker", "dockerd", "nsenter")
    present = image_present(BASE_IMAGE)
    require(f"the base image {BASE_IMAGE}", present, "run scripts/build-base-image.sh")


@pytest.fixture
def flow(isolated: IsolatedNetwork, tmp_path: Path) -> Iterator[Flow]:
    home = tmp_path / "home"
    home.mkdir()
    timings: dict[str, float] = {}
    yield Flow(isolated, home, timings)
    print("timings (s):", json.dumps(timings))


def test_the_main_flow_sends_nothing_out(
    isolated: IsolatedNetwork, flow: Flow, docker_tools: None, tmp_path: Path
) -> None:
    """Nothing from dockerd's start to the server's exit reaches the sink;
    then a container on the workspaces' network does reach it (SYN to
    192.0.2.1, safe here for the reason the first test gives), in a second
    capture that also covers dockerd's shutdown."""
    capture = Capture(isolated, tmp_path / "flow.pcap")
    canary = Capture(isolated, tmp_path / "container-canary.pcap")
    server: NamespacedServer | None = None
    with ExitStack() as outer:
        outer.callback(canary.stop)
        outer.callback(capture.stop)
        capture.start()
        started = time.perf_counter()
        dockerd = outer.enter_context(NamespacedDockerd(isolated))
        flow.timings["dockerd ready"] = round(time.perf_counter() - started, 2)
        copying = time.perf_counter()
        dockerd.load_image(BASE_IMAGE)
        flow.timings["base image copied"] = round(time.perf_counter() - copying, 2)
        with ExitStack() as stack:
            server = NamespacedServer(
                isolated,
                data_dir=tmp_path / "server",
                env={**TERRAFORM_IN_SERVER, "DOCKER_HOST": dockerd.host},
            )
            stack.callback(stop_local_workspaces, tmp_path / "server" / "workspaces")
            stack.callback(kill_sandboxes, tmp_path / "server")
            stack.callback(server.stop)
            server.start()
            flow.timings["server ready"] = round(server.ready_seconds or 0, 2)
            run_flow(flow, server.url)
        flow.timings["whole flow"] = round(time.perf_counter() - started, 2)
        capture.stop()

        canary.start()
        networks = dockerd.docker(
            "network", "ls", "-q", "--filter", "label=stockade.deployment"
        ).stdout.split()
        assert len(networks) == 1, f"the workspaces' network: {networks}"
        probed = dockerd.docker(
            "run", "--rm", "--network", networks[0], BASE_IMAGE,
            "python3", "-c", PROBE, "192.0.2.1", "443",
        ).stdout  # fmt: skip
        assert probed.split()[:2] == ["192.0.2.1", "TimeoutError"], probed
        dockerd.stop()
        canary.stop()

    # The instrument first: a container's SYN, translated to stk-iso's address
    # by the namespaced dockerd's NAT, reached the sink, and nothing else did.
    assert_only_syns(isolated, canary, {("192.0.2.1", 443)})
    packets = capture.packets()
    assert not packets, (
        f"{len(packets)} packets tried to leave stk-iso:\n" + "\n".join(packets[:50])
        + f"\n\nserver log:\n{server.logs()[-3000:]}"
    )  # fmt: skip


def run_flow(flow: Flow, url: str) -> None:
    """Everything a new deployment's first day does, command by command."""
    flow.stockade("login", url, "--first-user", "--username", "admin",
                  "--email", "admin@example.com", "--password", OWNER_PASSWORD)  # fmt: skip
    markers: dict[str, str] = {}
    for backend in ("local", "docker", "terraform"):
        name = f"e2e-{backend}"
        directory = flow.home / name
        flow.stockade("templates", "init", str(directory), "--backend", backend, "--name", name)
        markers[name] = add_app(directory, port=8000 + secrets.randbelow(20000))
        flow.stockade("templates", "push", name, "-d", str(directory))
    # A platform team's Terraform template: a container started through the
    # docker CLI (the namespaced dockerd, by DOCKER_HOST), the agent inside.
    directory = flow.home / "e2e-tf-docker"
    shutil.copytree(TERRAFORM_DOCKER, directory)
    manifest = directory / "stockade.yaml"
    manifest.write_text(manifest.read_text().replace("name: tf-docker", "name: e2e-tf-docker"))
    markers["e2e-tf-docker"] = add_app(directory, port=8000 + secrets.randbelow(20000))
    flow.stockade("templates", "push", "e2e-tf-docker", "-d", str(directory))

    flow.stockade("create", "e2e-local", "--template", "e2e-local")
    flow.stockade("create", "e2e-docker", "--template", "e2e-docker",
                  "--parameter", "cpu=1", "--parameter", "memory=2GiB")  # fmt: skip
    flow.stockade("create", "e2e-terraform", "--template", "e2e-terraform")
    flow.stockade("create", "e2e-tf-docker", "--template", "e2e-tf-docker")
    token = flow.token()
    for name, marker in markers.items():
        said = flow.stockade("ssh", name, "--", "echo", f"ssh-{marker}", "&&", "hostname")
        assert said.splitlines()[0] == f"ssh-{marker}", said
        app = flow.run(
            "curl", "-sS", "--fail-with-body", "--max-time", "30",
            "-H", f"Authorization: Bearer {token}", f"{url}/@admin/{name}/apps/hello/x?y=1",
            label="app through the proxy",
        )  # fmt: skip
        assert app == f"hello from {marker} at /x?y=1", app

    flow.stockade("stop", "e2e-docker")
    # Terraform stops what is counted on the start and keeps the home volume.
    flow.stockade("stop", "e2e-tf-docker")
    flow.stockade("start", "e2e-tf-docker")
    said = flow.stockade("ssh", "e2e-tf-docker", "--", "cat", "starts")
    assert len(said.splitlines()) == 2, said
    for name in markers:
        flow.stockade("delete", name, "--yes")
    assert json.loads(flow.stockade("list", "--output", "json")) == []

    # Exits 1 when the egress guard denied anything (or, --strict, allowed
    # anything external) in the server or any agent.
    report = flow.stockade("egress", "report", "--strict", "--output", "json")
    print("egress report:", report)
    result = json.loads(report)
    assert result["denied"] == 0 and result["external_allowed"] == 0, report
    assert all(row["allowed"] for row in result["destinations"]), report
