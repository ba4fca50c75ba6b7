"""Tunnel benchmark: SSH through the control plane vs OpenSSH direct.

Starts a real ``stockade server`` and a real agent process (the benchmark
plays the provisioner, as tests/server/test_tunnel.py does), writes a
``stockade config-ssh`` block into a temp ssh config, and starts a real
OpenSSH ``sshd`` on loopback (temp host key and authorized_keys) to compare
with. Then:

- bulk: ``ssh HOST 'head -c 1G /dev/zero' > /dev/null``, MB/s (median of
  ``--repeat``), through the tunnel and direct, with the config-ssh block's
  cipher (aes128-gcm) and with OpenSSH's default (chacha20-poly1305);
- interactive: 1-byte echo round trips through an ssh session running
  ``cat`` (a driver writes one byte to ssh's stdin and reads it back), p50
  and p99 over ``--round-trips``, through the tunnel and direct;
- port-forward: ``--streams`` concurrent connections through ``stockade
  port-forward`` to an echo server in the workspace, each sending
  ``--stream-bytes`` and checking every byte that comes back: total MB/s and
  per-stream latency (open → first echoed byte, and the whole transfer).

    .venv/bin/python bench/run_tunnel.py [--bytes 1G] [--repeat 3] [--only bulk,echo,forward]
    .venv/bin/python bench/run_tunnel.py --replicas 2      # client on replica A, agent on B

With ``--replicas 2`` the server is two replicas on a throw-away PostgreSQL:
the client (ssh, port-forward) talks to replica A, the agent is connected to
replica B, so every stream crosses the hop between them (B carries the
agent's dial-back to A); the CPU figures add both replicas.

Needs ``/usr/sbin/sshd`` (apt-get install openssh-server) and the OpenSSH
client. Prints a table and writes ``bench/results/tunnel-<time>.json``.
All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from stockade.devtools.ports import free_port
from stockade.devtools.postgres import TempPostgres
from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from stockade.sdk.templates import build_archive

PASSWORD = "bench-Horse-Battery-42"
RESULTS_DIR = Path(__file__).parent / "results"
STOCKADE = str(Path(sys.executable).with_name("stockade"))
SSHD = "/usr/sbin/sshd"
AES = "aes128-gcm@openssh.com"
CHACHA = "chacha20-poly1305@openssh.com"
SUFFIXES = {"K": 1024, "M": 1024**2, "G": 1024**3}

ECHO_SERVER = textwrap.dedent(
    """
    import asyncio, sys

    async def serve(reader, writer):
        while data := await reader.read(262144):
            writer.write(data)
            await writer.drain()
        writer.close()

    async def main():
        server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=512)
        print(server.sockets[0].getsockname()[1], flush=True)
        await server.serve_forever()

    asyncio.run(main())
    """
)


def parse_size(text: str) -> int:
    text = text.strip().upper()
    if text and text[-1] in SUFFIXES:
        return int(float(text[:-1]) * SUFFIXES[text[-1]])
    return int(text)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# --- the deployment under test ---------------------------------------------------------------


@dataclass
class Deployment:
    server: ServerProcess  # the one clients use
    token: str
    config_dir: Path
    ssh_config: Path
    agent: subprocess.Popen[bytes]
    # The replica the agent is connected to, when it is another (--replicas 2).
    agent_server: ServerProcess | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "STOCKADE_URL": self.server.url,
            "STOCKADE_TOKEN": self.token,
            "STOCKADE_CONFIG_DIR": str(self.config_dir),
        }


@contextmanager
def deployment(root: Path, replicas: int = 1) -> Iterator[Deployment]:
    """A server, one workspace ``w`` whose agent runs on this host, and a
    config-ssh block for it. Two replicas: the agent on the second."""
    env = {"STOCKADE_PROVISIONER_WORKERS": "0"}
    postgres: TempPostgres | None = None
    other: ServerProcess | None = None
    url = ""
    if replicas == 2:
        postgres = TempPostgres().start()
        url = postgres.create_database()
        env["STOCKADE_AUDIT_KEY"] = os.urandom(32).hex()
    server = ServerProcess(data_dir=root / "server", postgres_url=url, env=env).start()
    if replicas == 2:
        other = ServerProcess(data_dir=root / "server-b", postgres_url=url, env=env).start()
    agent: subprocess.Popen[bytes] | None = None
    try:
        client = Client(server.url)
        client.create_first_user("owner", "owner@example.com", PASSWORD)
        client.login("owner", PASSWORD)
        template = root / "tpl"
        template.mkdir()
        (template / "stockade.yaml").write_text("name: t\nbackend: local\n")
        client.push_template("t", build_archive(template))
        key = client.create_provisioner_key("bench").key
        client.create_workspace("w", "t")
        with httpx.Client(
            base_url=server.url, headers={"Stockade-Provisioner-Key": key}, trust_env=False
        ) as daemon:
            job = daemon.post(
                "/api/v2/provisionerd/acquire", json={"worker_id": "b", "backends": ["local"]}
            ).json()
            done = daemon.post(
                f"/api/v2/provisionerd/jobs/{job['build_id']}/complete",
                json={"worker_id": "b", "status": "succeeded", "state": {}},
            )
            done.raise_for_status()
        home = root / "home"
        home.mkdir()
        agent = subprocess.Popen(
            [sys.executable, "-m", "stockade.agent"],
            env={
                "PATH": os.environ["PATH"],
                "HOME": str(home),
                "STOCKADE_ACCESS_URL": (other or server).url,
                "STOCKADE_AGENT_TOKEN": str(job["agent_token"]),
            },
            stdout=subprocess.DEVNULL,
            stderr=(root / "agent.log").open("wb"),
        )
        deadline = time.monotonic() + 60
        while True:
            ws = client.get_workspace("owner", "w")
            if ws.agent is not None and ws.agent.lifecycle_state == "ready":
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not become ready within 60 s")
            time.sleep(0.2)
        found = Deployment(
            server, client.token or "", root / "cfg", root / "ssh_config_tunnel", agent, other
        )
        client.close()
        subprocess.run(
            [STOCKADE, "config-ssh", "--ssh-config-file", str(found.ssh_config)],
            env=found.env(),
            check=True,
            capture_output=True,
        )
        yield found
    finally:
        if agent is not None:
            agent.terminate()
            try:
                agent.wait(10)
            except subprocess.TimeoutExpired:
                agent.kill()
                agent.wait()
        if other is not None:
            other.stop()
        server.stop()
        if postgres is not None:
            postgres.stop()


@contextmanager
def direct_sshd(root: Path) -> Iterator[tuple[Path, int]]:
    """A real sshd on loopback for this user; yields an ssh config whose host
    ``direct`` reaches it with a pinned host key, and sshd's pid."""
    directory = root / "sshd"
    directory.mkdir()
    host_key, user_key = directory / "host_ed25519", directory / "user_ed25519"
    for key in (host_key, user_key):
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
            check=True,
            capture_output=True,
        )
    authorized = directory / "authorized_keys"
    shutil.copy(f"{user_key}.pub", authorized)
    authorized.chmod(0o600)
    port = free_port()
    config = directory / "sshd_config"
    config.write_text(
        textwrap.dedent(
            f"""\
            ListenAddress 127.0.0.1
            HostKey {host_key}
            AuthorizedKeysFile {authorized}
            PidFile {directory}/sshd.pid
            PasswordAuthentication no
            KbdInteractiveAuthentication no
            PermitRootLogin prohibit-password
            UsePAM no
            StrictModes no
            Compression no
            """
        )
    )
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
    process = subprocess.Popen(
        [SSHD, "-D", "-e", "-f", str(config), "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=(directory / "sshd.log").open("wb"),
    )
    known = directory / "known_hosts"
    known.write_text(f"[127.0.0.1]:{port} {Path(f'{host_key}.pub').read_text()}")
    client_config = directory / "ssh_config_direct"
    client_config.write_text(
        textwrap.dedent(
            f"""\
            Host direct
              HostName 127.0.0.1
              Port {port}
              User {getpass.getuser()}
              IdentityFile {user_key}
              IdentitiesOnly yes
              UserKnownHostsFile {known}
              GlobalKnownHostsFile /dev/null
              StrictHostKeyChecking yes
              BatchMode yes
              LogLevel ERROR
            """
        )
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            probe = subprocess.run(
                ["ssh", "-F", str(client_config), "direct", "true"],
                capture_output=True,
                check=False,
            )
            if probe.returncode == 0:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                log = (directory / "sshd.log").read_text(errors="replace")
                raise RuntimeError(f"sshd did not serve: {probe.stderr!r} {log}")
            time.sleep(0.1)
        yield client_config, process.pid
    finally:
        process.terminate()
        process.wait()


# --- CPU accounting ---------------------------------------------------------------------------

TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> tuple[float, float]:
    """(own CPU seconds, CPU seconds of its reaped children) of ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    # After the command's ")": state is fields[0]; utime, stime, cutime and
    # cstime are the 14th to 17th fields of the whole line.
    own = (int(fields[11]) + int(fields[12])) / TICKS
    children = (int(fields[13]) + int(fields[14])) / TICKS
    return own, children


def our_children_cpu() -> float:
    """CPU seconds of this process's reaped children (ssh, the ProxyCommand...)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class CpuMeter:
    """CPU seconds each part of a path used during a run: the client side
    (ssh and its ProxyCommand, this process's children), and named
    long-running processes (own time, and their children's apart)."""

    processes: dict[str, int]

    def sample(self) -> dict[str, float]:
        values = {"client (ssh + ProxyCommand)": our_children_cpu()}
        for name, pid in self.processes.items():
            own, children = process_cpu(pid)
            values[name] = own
            values[f"{name}'s children"] = children
        return values

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {name: after[name] - before[name] for name in before}


# --- bulk ----------------------------------------------------------------------------------


def bulk(
    config: Path,
    host: str,
    cipher: str | None,
    size: int,
    env: dict[str, str],
    meter: CpuMeter,
) -> tuple[float, dict[str, float]]:
    """MB/s of one ``head -c SIZE /dev/zero`` through ssh into /dev/null, and
    the CPU seconds per GB each part used."""
    before = meter.sample()
    argv = ["ssh", "-F", str(config), "-o", "BatchMode=yes"]
    if cipher:
        argv += ["-c", cipher]
    argv += [host, f"head -c {size} /dev/zero"]
    started = time.perf_counter()
    done = subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, check=False
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:  # head's exit status: it wrote everything
        raise RuntimeError(
            f"bulk via {host}: exit {done.returncode}: "
            f"{done.stderr.decode(errors='replace')[-500:]}"
        )
    time.sleep(0.5)  # the session's processes are reaped: their CPU is counted
    used = CpuMeter.delta(before, meter.sample())
    return size / elapsed / 1e6, {name: value / (size / 1e9) for name, value in used.items()}


# --- interactive echo ---------------------------------------------------------------------


def echo_round_trips(
    config: Path, host: str, count: int, env: dict[str, str]
) -> tuple[float, float, float]:
    """(p50, p99, mean) in microseconds of one byte through ``cat`` and back."""
    process = subprocess.Popen(
        ["ssh", "-F", str(config), "-o", "BatchMode=yes", host, "cat"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        bufsize=0,
    )
    assert process.stdin is not None and process.stdout is not None
    write_fd, read_fd = process.stdin.fileno(), process.stdout.fileno()
    samples: list[float] = []
    try:
        for i in range(count + 100):  # the first 100 warm up
            byte = bytes([65 + i % 26])
            started = time.perf_counter()
            os.write(write_fd, byte)
            echoed = os.read(read_fd, 1)
            elapsed = time.perf_counter() - started
            if echoed != byte:
                raise RuntimeError(f"echo via {host}: sent {byte!r}, got {echoed!r}")
            if i >= 100:
                samples.append(elapsed * 1e6)
    finally:
        process.stdin.close()
        process.wait(30)
    return percentile(samples, 50), percentile(samples, 99), statistics.fmean(samples)


# --- port forwarding ----------------------------------------------------------------------


async def _forward_stream(port: int, payload: bytes) -> tuple[float, float]:
    """One connection: send ``payload``, read it back, check it. Returns
    (seconds to the first echoed byte, seconds for the whole transfer)."""
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for offset in range(0, len(payload), 65536):
            writer.write(payload[offset : offset + 65536])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    digest = hashlib.sha256()
    received = 0
    first = 0.0
    while received < len(payload):
        data = await reader.read(262144)
        if not data:
            break
        if not first:
            first = time.perf_counter() - started
        digest.update(data)
        received += len(data)
    await sender
    writer.close()
    if received != len(payload) or digest.digest() != hashlib.sha256(payload).digest():
        raise RuntimeError(f"port-forward: {received} of {len(payload)} bytes, or not intact")
    return first, time.perf_counter() - started


async def _open_latencies(port: int, count: int) -> list[float]:
    """Milliseconds from connecting to the forwarded port to the echo of one
    byte, one fresh stream after another: what opening a stream costs."""
    latencies = []
    for _ in range(count):
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"x")
        if await reader.readexactly(1) != b"x":
            raise RuntimeError("port-forward: the echo was not the byte sent")
        latencies.append((time.perf_counter() - started) * 1000)
        writer.close()
    return latencies


async def _stream_round_trips(port: int, count: int) -> list[float]:
    """Microseconds of 1-byte round trips on one open connection to ``port``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    samples = []
    try:
        for i in range(count + 100):  # the first 100 warm up
            started = time.perf_counter()
            writer.write(b"x")
            if await reader.readexactly(1) != b"x":
                raise RuntimeError("echo: the byte that came back was not the one sent")
            if i >= 100:
                samples.append((time.perf_counter() - started) * 1e6)
    finally:
        writer.close()
    return samples


async def _forward_all(port: int, streams: int, size: int) -> tuple[float, list[Any]]:
    payloads = [os.urandom(size) for _ in range(streams)]
    started = time.perf_counter()
    results = await asyncio.gather(*(_forward_stream(port, p) for p in payloads))
    return time.perf_counter() - started, list(results)


def port_forward(deployment: Deployment, streams: int, size: int) -> dict[str, float]:
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER], stdout=subprocess.PIPE, text=True)
    forwarder: subprocess.Popen[str] | None = None
    try:
        assert echo.stdout is not None
        remote = int(echo.stdout.readline())
        forwarder = subprocess.Popen(
            [STOCKADE, "port-forward", "w", "--tcp", f"0:{remote}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=deployment.env(),
            text=True,
        )
        assert forwarder.stdout is not None
        line = forwarder.stdout.readline()
        match = re.search(r"127\.0\.0\.1:(\d+)", line)
        if not match:
            raise RuntimeError(f"stockade port-forward said: {line!r}")
        local = int(match.group(1))
        opens = asyncio.run(_open_latencies(local, 20))
        # The relays alone (no SSH): one byte through an open stream, and
        # the same echo server reached directly.
        relayed = asyncio.run(_stream_round_trips(local, 2000))
        plain = asyncio.run(_stream_round_trips(remote, 2000))
        wall, results = asyncio.run(_forward_all(local, streams, size))
        firsts = [r[0] * 1000 for r in results]
        totals = [r[1] * 1000 for r in results]
        return {
            "streams": streams,
            "bytes_per_stream": size,
            "wall_seconds": wall,
            # Bytes each way over wall time (every byte also came back).
            "mb_per_s_each_way": streams * size / wall / 1e6,
            "echo_us_through_stream_p50": percentile(relayed, 50),
            "echo_us_through_stream_p99": percentile(relayed, 99),
            "echo_us_direct_p50": percentile(plain, 50),
            "open_one_ms_p50": percentile(opens, 50),
            "open_one_ms_max": max(opens),
            "first_byte_ms_p50": percentile(firsts, 50),
            "first_byte_ms_p99": percentile(firsts, 99),
            "stream_ms_p50": percentile(totals, 50),
            "stream_ms_p99": percentile(totals, 99),
        }
    finally:
        for process in (forwarder, echo):
            if process is not None:
                process.terminate()
                with suppress(subprocess.TimeoutExpired):
                    process.wait(10)


# --- main ------------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} (min {min(values):.0f}, max {max(values):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes", default="1G", help="bulk transfer size (1G, 256M...)")
    parser.add_argument("--repeat", type=int, default=3, help="bulk runs per case (median)")
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--stream-bytes", default="1M")
    parser.add_argument("--only", default="bulk,echo,forward", help="which parts to run")
    parser.add_argument(
        "--replicas", type=int, choices=(1, 2), default=1, help="2: client on A, agent on B"
    )
    args = parser.parse_args()
    parts = set(args.only.split(","))
    size = parse_size(args.bytes)
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is missing: apt-get install openssh-client")
    if not os.path.exists(SSHD):
        sys.exit("sshd is missing: apt-get install openssh-server")

    results: dict[str, Any] = {
        "started": datetime.now().isoformat(timespec="seconds"),
        "replicas": args.replicas,
    }
    with tempfile.TemporaryDirectory(prefix="stockade-bench-tunnel-") as tmp:
        root = Path(tmp)
        with (
            deployment(root, args.replicas) as deploy,
            direct_sshd(root) as (direct_config, sshd_pid),
        ):
            env = deploy.env()
            tunnel = (deploy.ssh_config, "stockade.w")
            direct = (direct_config, "direct")
            assert deploy.server.process is not None
            pids = {"server": deploy.server.process.pid, "agent": deploy.agent.pid}
            if deploy.agent_server is not None and deploy.agent_server.process is not None:
                pids["server B"] = deploy.agent_server.process.pid
            tunnel_meter = CpuMeter(pids)
            direct_meter = CpuMeter({"sshd": sshd_pid})
            if "bulk" in parts:
                cases = {
                    "tunnel aes128-gcm (config-ssh default)": (*tunnel, None, tunnel_meter),
                    "tunnel chacha20": (*tunnel, CHACHA, tunnel_meter),
                    "direct aes128-gcm": (*direct, AES, direct_meter),
                    "direct default (chacha20)": (*direct, None, direct_meter),
                }
                runs: dict[str, list[float]] = {name: [] for name in cases}
                cpu: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
                for _ in range(args.repeat):  # interleaved: machine noise hits all alike
                    for name, (config, host, cipher, meter) in cases.items():
                        rate, used = bulk(config, host, cipher, size, env, meter)
                        runs[name].append(rate)
                        cpu[name].append(used)
                        print(
                            f"  bulk {name}: {rate:.0f} MB/s, {sum(used.values()):.2f} CPU s/GB",
                            flush=True,
                        )
                results["bulk_mb_per_s"] = {
                    name: {"median": statistics.median(v), "runs": v} for name, v in runs.items()
                }
                results["bulk_cpu_seconds_per_gb"] = {
                    name: {
                        part: statistics.median(run[part] for run in samples) for part in samples[0]
                    }
                    for name, samples in cpu.items()
                }
            if "echo" in parts:
                results["echo_us"] = {}
                for name, (config, host) in {"tunnel": tunnel, "direct": direct}.items():
                    p50, p99, mean = echo_round_trips(config, host, args.round_trips, env)
                    results["echo_us"][name] = {"p50": p50, "p99": p99, "mean": mean}
                    print(f"  echo {name}: p50 {p50:.0f} us, p99 {p99:.0f} us", flush=True)
            if "forward" in parts:
                results["port_forward"] = port_forward(
                    deploy, args.streams, parse_size(args.stream_bytes)
                )

    print()
    if "bulk_mb_per_s" in results:
        bulk_results = results["bulk_mb_per_s"]
        print(f"Bulk, {size / 1e6:.0f} MB, MB/s, median of {args.repeat} (min, max):")
        for name, value in bulk_results.items():
            print(f"  {name:42} {spread(value['runs'])}")
        tunnel_aes = bulk_results["tunnel aes128-gcm (config-ssh default)"]["median"]
        direct_aes = bulk_results["direct aes128-gcm"]["median"]
        direct_default = bulk_results["direct default (chacha20)"]["median"]
        print("CPU seconds per GB (median), by part:")
        for name, parts_used in results["bulk_cpu_seconds_per_gb"].items():
            detail = ", ".join(f"{part} {value:.2f}" for part, value in parts_used.items())
            print(f"  {name:42} {sum(parts_used.values()):.2f} = {detail}")
        print(
            f"  tunnel (config-ssh default) / direct: {tunnel_aes / direct_aes:.0%} of "
            f"aes128-gcm, {tunnel_aes / direct_default:.0%} of OpenSSH's default "
            "(target: at least 50%)"
        )
    if "echo_us" in results:
        echo = results["echo_us"]
        print(f"Echo round trip, 1 byte, {args.round_trips} round trips, microseconds:")
        for name, value in echo.items():
            print(f"  {name:8} p50 {value['p50']:7.0f}   p99 {value['p99']:7.0f}")
        added = echo["tunnel"]["p50"] - echo["direct"]["p50"]
        print(f"  added by the tunnel at p50: {added:.0f} us (target: under 1000)")
    if "port_forward" in results:
        fwd = results["port_forward"]
        print(
            f"Port-forward, {fwd['streams']} concurrent streams x "
            f"{fwd['bytes_per_stream'] / 1e6:.1f} MB echoed and verified:"
        )
        print(
            f"  1-byte echo on an open stream: p50 {fwd['echo_us_through_stream_p50']:.0f} us, "
            f"p99 {fwd['echo_us_through_stream_p99']:.0f} us (the echo server directly: p50 "
            f"{fwd['echo_us_direct_p50']:.0f} us): the relays' share of the ssh echo"
        )
        print(
            f"  one stream at a time, connect to 1-byte echo: p50 {fwd['open_one_ms_p50']:.0f} "
            f"ms (max {fwd['open_one_ms_max']:.0f} ms)"
        )
        print(
            f"  {fwd['mb_per_s_each_way']:.0f} MB/s each way in total; per stream: first "
            f"byte p50 {fwd['first_byte_ms_p50']:.0f} ms / p99 {fwd['first_byte_ms_p99']:.0f} "
            f"ms, whole transfer p50 {fwd['stream_ms_p50']:.0f} ms / p99 "
            f"{fwd['stream_ms_p99']:.0f} ms"
        )
    RESULTS_DIR.mkdir(exist_ok=True)
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    ).stdout.strip()
    results["commit"] = commit
    name = "tunnel" if args.replicas == 1 else "tunnel-replicas"
    path = RESULTS_DIR / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"\nwritten to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
