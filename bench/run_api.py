"""API benchmark for ``stockade server`` on SQLite and PostgreSQL.

Measures, per backend: server start time (spawn to first 200 from /healthz,
median of 5 starts on a fresh data dir / database), idle RSS, then, with 1,000
users, login and user-list latency (p50/p95/p99) and throughput under 20
concurrent clients, and RSS after each load. Prints a table against the
targets in the design brief and writes ``bench/results/api-<time>.json``.

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
import signal
import statistics
import subprocess
import sys
import tempfile
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
# Servers keep their bytecode here, as an installed package would have it even
# where PYTHONDONTWRITEBYTECODE is set (it is on the dev machines).
PYCACHE = Path(tempfile.gettempdir()) / "stockade-bench-pycache"
console = Console(width=None if sys.stdout.isatty() else 110)

Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


@dataclass
class Load:
    """One load scenario: latencies of the successful requests, CPU in cores."""

    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    req_per_s: float
    server_cpu_cores: float
    db_cpu_cores: float  # the PostgreSQL cluster (0 on SQLite)
    client_cpu_cores: float  # this load generator
    other_cpu_cores: float  # the rest of the machine: near 0 on a quiet machine
    rss_after_mb: float


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) < 2:
        value = samples[0] if samples else float("nan")
        return value, value, value
    cuts = statistics.quantiles(samples, n=100, method="inclusive")
    return cuts[49], cuts[94], cuts[98]


def _tree(pid: int) -> list[psutil.Process]:
    proc = psutil.Process(pid)
    return [proc, *proc.children(recursive=True)]


def rss_mb(pid: int) -> float:
    """Resident memory of the process and all its children, in MB."""
    return float(sum(p.memory_info().rss for p in _tree(pid))) / 1e6


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds of the process and its descendants, the exited ones included
    (PostgreSQL backends come and go with the server's pool overflow)."""
    if pid is None:
        return 0.0
    return float(sum(sum(p.cpu_times()[:4]) for p in _tree(pid)))  # user, system, children's


def cpu_snapshot(server: int, db: int | None) -> tuple[float, float, float, float]:
    """CPU seconds so far: server, database, this process, the whole machine."""
    t = psutil.cpu_times()
    busy = float(t.user + t.nice + t.system + t.irq + t.softirq)  # guest is inside user
    own = sum(psutil.Process().cpu_times()[:2])  # not its children: the server is one
    return cpu_seconds(server), cpu_seconds(db), float(own), busy


def start_timed(server: ServerProcess, timeout: float = 30.0) -> float:
    """Start ``server`` like ``ServerProcess.start`` and return spawn-to-200 in
    seconds. Polls with one reused client: the helper's per-poll ``httpx.get``
    builds a TLS context each time (~60 ms), which would blur the figure."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env.update(server.extra_env, PYTHONPYCACHEPREFIX=str(PYCACHE))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
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


def stop_and_clean(server: ServerProcess) -> None:
    code = server.stop()
    if code not in (0, -signal.SIGTERM, None):  # uvicorn re-raises SIGTERM once stopped
        console.print(f"[yellow]server exited with {code}; log tail:[/]\n{server.logs()[-2000:]}")
    shutil.rmtree(server.data_dir, ignore_errors=True)


@contextmanager
def backend(name: str) -> Iterator[tuple[Callable[[], ServerProcess], int | None]]:
    """A factory of unstarted servers, each on a fresh data dir (on PostgreSQL
    also a fresh database in one throw-away cluster), and the cluster's pid."""
    if name == "sqlite":
        yield (lambda: ServerProcess(env=NO_RATE_LIMITS)), None
        return
    with TempPostgres() as pg:
        postmaster = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        yield (
            (lambda: ServerProcess(postgres_url=pg.create_database(), env=NO_RATE_LIMITS)),
            postmaster,
        )


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


def login_as_users(users: int) -> Send:
    async def send(http: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"username": f"user{1 + i % (users - 1):04d}", "password": PASSWORD}
        return await http.post("/api/v2/users/login", json=body)

    return send


def list_users(token: str, limit: int) -> Send:
    headers = {"Authorization": f"Bearer {token}"}

    async def send(http: httpx.AsyncClient, i: int) -> httpx.Response:
        return await http.get("/api/v2/users", params={"limit": limit}, headers=headers)

    return send


def users_page(token: str, limit: int) -> Send:
    """The dashboard's users page, as a browser asks for it: the session
    cookie, HTML rendered on the server."""
    headers = {"cookie": f"stockade_session={token}"}

    async def send(http: httpx.AsyncClient, i: int) -> httpx.Response:
        return await http.get("/admin/users", params={"limit": limit}, headers=headers)

    return send


async def load(
    url: str, pids: tuple[int, int | None], send: Send, args: argparse.Namespace
) -> Load:
    """``args.requests`` requests from ``args.clients`` concurrent tasks sharing
    as many keep-alive connections (after a warm-up), stopping early after
    ``args.time_limit`` seconds."""
    clients, total, limit = args.clients, args.requests, args.time_limit
    latencies: list[float] = []
    errors = 0
    pool = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=pool, timeout=30.0, trust_env=False) as http:
        http.cookies.jar.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # keep no cookies
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

        before, started = cpu_snapshot(*pids), time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(clients))), limit + 35)
        elapsed = time.perf_counter() - started
        server, db, client, machine = (
            b - a for a, b in zip(before, cpu_snapshot(*pids), strict=True)
        )
    p50, p95, p99 = (round(p, 1) for p in percentiles(latencies))
    server, db, client, other = (
        round(c / elapsed, 2) for c in (server, db, client, machine - server - db - client)
    )
    n, rss = len(latencies), round(rss_mb(pids[0]), 1)
    rate = round(n / elapsed, 1)
    return Load(n, errors, round(elapsed, 3), p50, p95, p99, rate, server, db, client, other, rss)


def bench_backend(name: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}
    with backend(name) as (new_server, db_pid):
        starts = []
        for _ in range(1 + STARTS):  # the first, unmeasured, fills the bytecode cache
            server = new_server()
            starts.append(start_timed(server))
            stop_and_clean(server)
        starts = starts[1:]
        result["ready_s"] = {
            "median": round(statistics.median(starts), 3),
            "min": round(min(starts), 3),
            "max": round(max(starts), 3),
            "all": [round(s, 3) for s in starts],
        }
        console.print(f"{name}: ready in {result['ready_s']['all']} s")

        server = new_server()
        start_timed(server)
        assert server.process is not None
        pid = server.process.pid
        try:
            time.sleep(IDLE_SECONDS)
            result["idle_rss_mb"] = round(rss_mb(pid), 1)
            token, seconds = seed(server.url, args.users)
            result["seed_s"] = round(seconds, 2)
            console.print(
                f"{name}: idle RSS {result['idle_rss_mb']} MB; seeded in {result['seed_s']:.1f} s"
            )
            with Client(server.url, token) as admin:
                count = admin.list_users(limit=1).count
            if count != args.users:
                raise RuntimeError(f"expected {args.users} users, the server lists {count}")
            scenarios = {
                "login": login_as_users(args.users),
                "list_1000": list_users(token, 1000),
                "list_100": list_users(token, 100),
                "users_page_100": users_page(token, 100),
            }
            for scenario, send in scenarios.items():
                figures = asyncio.run(load(server.url, (pid, db_pid), send, args))
                result[scenario] = asdict(figures)
                console.print(f"{name} {scenario}: {figures}")
                if figures.other_cpu_cores > 0.2:
                    console.print("[yellow]other work ran meanwhile: figures will suffer[/]")
        finally:
            stop_and_clean(server)
    return result


def cells(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(metric, value, target) rows of one backend's results."""
    ready = r["ready_s"]
    rows = [
        ("server ready, s: median of 5 (min-max)",
         f"{ready['median']:.2f} ({ready['min']:.2f}-{ready['max']:.2f})", "< 1 s (SQLite)"),
        ("idle RSS, MB", f"{r['idle_rss_mb']:.0f}", "< 120"),
        ("seed users via API, s", f"{r['seed_s']:.1f}", ""),
    ]  # fmt: skip
    for key, label, target in [
        ("login", "login", "p99 < 300 ms"),
        ("list_1000", "list users limit=1000", "p99 < 100 ms"),
        ("list_100", "list users limit=100", "p99 < 100 ms"),
        ("users_page_100", "dashboard users page, 100 rows", "p99 < 100 ms"),
    ]:
        c = r[key]
        busy = c["server_cpu_cores"] + c["db_cpu_cores"]
        rows += [
            (f"{label} p50/p95/p99, ms", f"{c['p50_ms']:.0f}/{c['p95_ms']:.0f}/{c['p99_ms']:.0f}",
             target),
            ("  req/s (server+db cores busy)", f"{c['req_per_s']:.0f} ({busy:.2f})", ""),
            ("  ok/errors", f"{c['requests']}/{c['errors']}", "0 errors"),
            ("  RSS after, MB", f"{c['rss_after_mb']:.0f}", ""),
        ]  # fmt: skip
    return rows


def report(results: dict[str, dict[str, Any]]) -> None:
    table = Table(title="Stockade API benchmark")
    table.add_column("metric")
    for name in results:
        table.add_column(name, justify="right")
    table.add_column("target")
    columns = [cells(r) for r in results.values()]
    for i, (metric, _, target) in enumerate(columns[0]):
        table.add_row(metric, *(column[i][1] for column in columns), target)
    console.print(table)


def wait_quiet(patience: float, threshold: float = 10.0) -> float:
    """Wait until the machine is under ``threshold`` percent busy (at most
    ``patience`` seconds); returns the last reading. Other work skews every figure."""
    deadline = time.monotonic() + patience
    while (busy := float(psutil.cpu_percent(interval=2.0))) > threshold:
        if time.monotonic() > deadline:
            console.print(f"[yellow]the machine is {busy:.0f}% busy: figures will suffer[/]")
            break
        console.print(f"the machine is {busy:.0f}% busy with other work: waiting")
        time.sleep(3)
    return busy


def revision() -> str:
    """The commit measured, ``-dirty`` when the work tree has changes."""
    git = ["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty"]
    result = subprocess.run(git, capture_output=True, text=True, check=False)
    return result.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--users", type=int, default=1000, help="users, owner included")
    parser.add_argument("--clients", type=int, default=20, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=400, help="requests per scenario")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per scenario")
    parser.add_argument("--wait-quiet", type=float, default=60.0, help="max s to wait for idle")
    args = parser.parse_args()
    busy = wait_quiet(args.wait_quiet)
    names = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    results = {name: bench_backend(name, args) for name in names}
    report(results)
    write_results("api", results, args, busy)


def write_results(name: str, results: Any, args: argparse.Namespace, busy: float) -> Path:
    """Write ``results`` with the machine, the commit and the options to
    ``bench/results/NAME-<time>.json`` and say where."""
    stamp = datetime.now().astimezone()
    meta = {
        "time": stamp.isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "busy_percent_before": busy,
        "revision": revision(),
        "params": vars(args),
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}-{stamp:%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    console.print(f"results written to {out}")
    return out


if __name__ == "__main__":
    main()
