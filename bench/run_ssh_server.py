"""Benchmark: the agent's SSH server (stockade.agent.ssh, in a process of its
own as in tests/agent/ssh_harness.py) against OpenSSH's sshd, over loopback.

    .venv/bin/python bench/run_ssh_server.py [--mb 1024] [--echoes 2000] [--runs 3]

Bulk: ``ssh -c CIPHER host 'head -c <mb>M /dev/zero' > /dev/null`` with the
real OpenSSH client, for aes128-gcm and chacha20-poly1305 (MB/s, best and
median of ``--runs``). Echo: one byte written to ``cat`` over an open session
and read back, ``--echoes`` times (asyncssh's client for both servers, so the
client is the same): p50/p99 in µs. sshd runs when /usr/sbin/sshd exists
(``apt-get install openssh-server``), on a temp config, host key and
authorized_keys. Only loopback is used; every process it starts it stops.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncssh

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.agent.sshtools import (  # noqa: E402
    SSHTarget,
    make_host_key,
    start_harness,
    write_known_hosts,
)

CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com")
SSHD = "/usr/sbin/sshd"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bulk(target: SSHTarget, cipher: str, mb: int, runs: int) -> list[float]:
    rates = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(
            target.ssh_argv("-c", cipher, target.host, f"head -c {mb}M /dev/zero"),
            stdout=subprocess.DEVNULL,
            check=True,
        )
        rates.append(mb * 1.048576 / (time.perf_counter() - started))
    return rates


async def echo(target: SSHTarget, count: int, client_key: str | None) -> list[float]:
    async with asyncssh.connect(
        target.host,
        target.port,
        known_hosts=str(target.known_hosts),
        username=os.environ.get("USER", "root"),
        client_keys=[client_key] if client_key else None,
        agent_path=None,
        config=None,
        encryption_algs=["aes128-gcm@openssh.com"],
    ) as conn:
        process = await conn.create_process("cat", encoding=None)
        times = []
        for _ in range(count):
            started = time.perf_counter()
            process.stdin.write(b"x")
            await process.stdout.readexactly(1)
            times.append((time.perf_counter() - started) * 1e6)
        process.stdin.write_eof()
        await process.wait()
        return times


def start_sshd(d: Path, user_pub: str) -> tuple[subprocess.Popen[bytes], int, str]:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "sshd_key")], check=True
    )
    (d / "authorized_keys").write_text(user_pub)
    port = free_port()
    config = d / "sshd_config"
    config.write_text(
        f"HostKey {d / 'sshd_key'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
        "PermitRootLogin yes\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        f"PidFile {d / 'sshd.pid'}\nListenAddress 127.0.0.1\n"
    )
    Path("/run/sshd").mkdir(exist_ok=True)
    process = subprocess.Popen(
        [SSHD, "-D", "-f", str(config), "-p", str(port), "-o", "LogLevel=QUIET"]
    )
    time.sleep(0.5)
    return process, port, (d / "sshd_key.pub").read_text().split(" ", 2)[:2]  # type: ignore[return-value]


def report(name: str, target: SSHTarget, args: argparse.Namespace, key: str | None) -> None:
    for cipher in CIPHERS:
        rates = bulk(target, cipher, args.mb, args.runs)
        print(
            f"{name:10} bulk {cipher:32} best {max(rates):7.0f} MB/s"
            f"  median {statistics.median(rates):7.0f} MB/s"
        )
    times = sorted(asyncio.run(echo(target, args.echoes, key)))
    p50 = times[len(times) // 2]
    p99 = times[int(len(times) * 0.99)]
    print(f"{name:10} echo 1 byte (aes128-gcm)            p50 {p50:6.0f} µs  p99 {p99:6.0f} µs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=1024)
    parser.add_argument("--echoes", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        home = d / "home"
        home.mkdir()
        key_file, public = make_host_key(d)
        harness = start_harness(key_file, home, d / "server.log")
        try:
            known = d / "known_hosts"
            write_known_hosts(known, "127.0.0.1", harness.port, public)
            report("stockade", SSHTarget("127.0.0.1", harness.port, known, home), args, None)
        finally:
            harness.stop()
        if not os.path.exists(SSHD):
            print("sshd: not installed (apt-get install openssh-server): no comparison")
            return 0
        user_key = d / "user_key"
        subprocess.run(
            ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(user_key)], check=True
        )
        sshd, port, host_pub = start_sshd(d, (d / "user_key.pub").read_text())
        try:
            known = d / "known_hosts_sshd"
            write_known_hosts(known, "127.0.0.1", port, " ".join(host_pub))
            target = SSHTarget("127.0.0.1", port, known, home, extra=["-i", str(user_key)])
            report("openssh", target, args, str(user_key))
        finally:
            sshd.terminate()
            sshd.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
