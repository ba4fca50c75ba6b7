"""API benchmark for ``stockade server`` on SQLite and PostgreSQL.

Measures, per backend: server start time (spawn to first 200 from /healthz,
median of 5 starts on a fresh data dir / database), idle RSS, login and
user-list latency (p50/p95/p99) and throughput under concurrent clients with
1,000 users, and RSS after the load. Prints a table against the targets in
the design brief and writes the figures to ``bench/results/api-<time>.json``.

    .venv/bin/python bench/run_api.py [--backend sqlite|postgres|both]

All traffic goes to the server under test on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime
from http.cookiejar import DefaultCookiePolicy
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from stockade.devtools.postgres import TempPostgres
from stockade.devtools.server import ServerProcess
from stockade.sdk import Client

NO_RATE_LIMITS = {
    "STOCKADE_LOGIN_RATE_PER_IP": "1000000",
    "STOCKADE_LOGIN_FAILURES_PER_USER": "1000000",
}
PASSWORD = "bench-Horse-Battery-42"
STARTS = 5
WARMUP = 20
IDLE_SECONDS = 2.0
RESULTS_DIR = Path(__file__).parent / "results"
console = Console()


@dataclass
class Load:
    """One load scenario: latencies of the successful requests, in ms."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    req_per_s: float
    server_cpu_cores: float  # server CPU seconds / wall seconds during the scenario


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) < 2:
        value = samples[0] if samples else float("nan")
        return value, value, value
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[94], cuts[98]


def rss_mb(pid: int) -> float:
    """Resident memory of the process and all its children, in MB."""
    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return sum(p.memory_info().rss for p in procs) / 1e6


def cpu_seconds(pid: int) -> float:
    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        times = p.cpu_times()
        total += times.user + times.system
    return total


def start_timed(server: ServerProcess, timeout: float = 30.0) -> float:
    """Start ``server`` like ``ServerProcess.start`` and return spawn-to-200 in
    seconds. Polls with one reused client: the helper's per-poll ``httpx.get``
    builds a TLS context each time (~60 ms), which would blur the figure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env.update(server.extra_env)
    server.data_dir.mkdir(parents=True, exist_ok=True)
    with httpx.Client(trust_env=False, timeout=1.0) as http, server.log_path.open("ab") as log:
        started = time.perf_counter()
        server.process = subprocess.Popen(
            server.command(), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        while time.perf_counter() - started < timeout:
            if server.process.poll() is not None:
                raise RuntimeError(f"server exited: {server.logs()}")
            try:
                if http.get(f"{server.url}/healthz").status_code == 200:
                    server.ready_seconds = time.perf_counter() - started
                    return server.ready_seconds
            except httpx.TransportError:
                pass
            time.sleep(0.005)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout}s: {server.logs()}")


@contextmanager
def backend_servers(backend: str) -> Iterator[Callable[[], ServerProcess]]:
    """Yields a factory of unstarted servers, each on a fresh data dir (and, on
    PostgreSQL, a fresh database in one throw-away cluster)."""
    if backend == "sqlite":
        yield lambda: ServerProcess(env=NO_RATE_LIMITS)
        return
    with TempPostgres() as pg:
        yield lambda: ServerProcess(postgres_url=pg.create_database(), env=NO_RATE_LIMITS)


def stop_and_clean(server: ServerProcess) -> None:
    code = server.stop()
    if code not in (0, None):
        console.print(f"[yellow]server exited with {code}; log tail:[/]\n{server.logs()[-2000:]}")
    shutil.rmtree(server.data_dir, ignore_errors=True)


def seed(url: str, users: int, workers: int = 4) -> tuple[str, float]:
    """An owner plus ``users - 1`` users; returns the owner's session token and
    the seconds the seeding took."""
    with Client(url) as admin:
        admin.create_first_user("admin", "admin@bench.local", PASSWORD)
        token = admin.login("admin", PASSWORD).session_token

    def create(chunk: range) -> None:
        with Client(url, token) as client:
            for i in chunk:
                client.create_user(f"user{i:04d}", f"user{i:04d}@bench.local", PASSWORD)

    started = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(create, [range(1 + w, users, workers) for w in range(workers)]))
    return token, time.perf_counter() - started


Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


async def load(url: str, pid: int, send: Send, clients: int, total: int, limit: float) -> Load:
    """``total`` requests from ``clients`` concurrent tasks (after a warm-up),
    stopping early at ``limit`` seconds."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=30.0, trust_env=False
    ) as http:
        http.cookies.jar.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # no session cookie
        await asyncio.gather(*(send(http, i) for i in range(min(WARMUP, clients))))
        counter = itertools.count()
        deadline = time.perf_counter() + limit

        async def worker() -> None:
            nonlocal errors
            while (i := next(counter)) < total and time.perf_counter() < deadline:
                t0 = time.perf_counter()
                try:
                    response = await send(http, i)
                except httpx.HTTPError:
                    errors += 1
                    continue
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - t0) * 1000)
                else:
                    errors += 1

        cpu0, started = cpu_seconds(pid), time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), limit + 35)
        elapsed, cpu = time.perf_counter() - started, cpu_seconds(pid) - cpu0
    p50, p95, p99 = percentiles(latencies)
    return Load(len(latencies), errors, round(elapsed, 3), round(p50, 1), round(p95, 1),
                round(p99, 1), round(len(latencies) / elapsed, 1), round(cpu / elapsed, 2))  # fmt: skip


def bench_backend(backend: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with backend_servers(backend) as new_server:
        starts = []
        for _ in range(STARTS):
            server = new_server()
            starts.append(start_timed(server))
            stop_and_clean(server)
        result["ready_s"] = {"median": round(statistics.median(starts), 3),
                             "min": round(min(starts), 3), "max": round(max(starts), 3)}  # fmt: skip
        console.print(f"[{backend}] ready: {[round(s, 3) for s in starts]}")

        server = new_server()
        start_timed(server)
        assert server.process is not None
        pid = server.process.pid
        try:
            time.sleep(IDLE_SECONDS)
            result["idle_rss_mb"] = round(rss_mb(pid), 1)
            token, seeded = seed(server.url, args.users)
            result["seed_s"] = round(seeded, 2)
            console.print(f"[{backend}] idle RSS {result['idle_rss_mb']} MB; seeded "
                          f"{args.users} users in {seeded:.1f} s")  # fmt: skip
            with Client(server.url, token) as admin:
                count = admin.list_users(limit=1).count
            if count != args.users:
                raise RuntimeError(f"expected {args.users} users, the server lists {count}")

            async def login(http: httpx.AsyncClient, i: int) -> httpx.Response:
                name = f"user{1 + i % (args.users - 1):04d}"
                body = {"username": name, "password": PASSWORD}
                return await http.post("/api/v2/users/login", json=body)

            def lister(limit: int) -> Send:
                headers = {"Authorization": f"Bearer {token}"}

                async def send(http: httpx.AsyncClient, i: int) -> httpx.Response:
                    return await http.get("/api/v2/users", params={"limit": limit},
                                          headers=headers)  # fmt: skip

                return send

            scenarios: dict[str, Send] = {
                "login": login,
                "list_1000": lister(1000),
                "list_100": lister(100),
            }
            for name, send in scenarios.items():
                figures = asyncio.run(
                    load(server.url, pid, send, args.clients, args.requests, args.time_limit)
                )
                result[name] = asdict(figures)
                console.print(f"[{backend}] {name}: {figures}")
            result["loaded_rss_mb"] = round(rss_mb(pid), 1)
        finally:
            stop_and_clean(server)
    return result


def report(results: dict[str, dict[str, Any]]) -> None:
    backends = list(results)
    table = Table(title="Stockade API benchmark")
    for column in ["metric", *backends, "target"]:
        table.add_column(column, justify="left" if column in ("metric", "target") else "right")

    def row(metric: str, target: str, cell: Callable[[dict[str, Any]], str]) -> None:
        table.add_row(metric, *(cell(results[b]) for b in backends), target)

    row("server ready, s (median of 5; min-max)", "< 1 s (SQLite)",
        lambda r: f"{r['ready_s']['median']:.3f} ({r['ready_s']['min']:.2f}-"
                  f"{r['ready_s']['max']:.2f})")  # fmt: skip
    row("idle RSS, MB", "< 120", lambda r: f"{r['idle_rss_mb']:.0f}")
    row("seed users via API, s", "", lambda r: f"{r['seed_s']:.1f}")
    for key, label, target in [
        ("login", "login", "p99 < 300 ms"),
        ("list_1000", "list users limit=1000", "p99 < 100 ms"),
        ("list_100", "list users limit=100", "p99 < 100 ms"),
    ]:
        row(f"{label} p50/p95/p99, ms", target,
            lambda r, k=key: f"{r[k]['p50_ms']:.0f}/{r[k]['p95_ms']:.0f}/{r[k]['p99_ms']:.0f}")  # fmt: skip
        row(f"{label} req/s (server cores busy)", "",
            lambda r, k=key: f"{r[k]['req_per_s']:.0f} ({r[k]['server_cpu_cores']:.2f})")  # fmt: skip
        row(f"{label} ok/errors", "0 errors",
            lambda r, k=key: f"{r[k]['requests']}/{r[k]['errors']}")  # fmt: skip
    row("RSS after load, MB", "", lambda r: f"{r['loaded_rss_mb']:.0f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--users", type=int, default=1000, help="users to create (with owner)")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=400, help="requests per scenario")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per scenario")
    args = parser.parse_args()
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    results = {backend: bench_backend(backend, args) for backend in backends}
    report(results)
    stamp = datetime.now().astimezone()
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"api-{stamp:%Y%m%d-%H%M%S}.json"
    meta = {"time": stamp.isoformat(timespec="seconds"), "cpus": os.cpu_count(),
            "python": sys.version.split()[0], "platform": platform.platform(),
            "params": vars(args)}  # fmt: skip
    out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    console.print(f"results written to {out}")


if __name__ == "__main__":
    main()
