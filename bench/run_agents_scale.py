"""Agent-scale benchmark: many simulated agents on one or two ``stockade server`` replicas.

1,000 simulated agents (``bench/agent_sim.py``, in separate processes: they
do not share the server's CPU accounting) speak the real agent protocol to
the server, each reporting metadata every 10 s. Measured per scenario: the
server's CPU (cores busy, from /proc/<pid>/stat) and RSS (/proc/<pid>/status)
while the agents only report, the agents' RPC latency (hello -> manifest at
every connect; WebSocket ping -> pong in the steady state, the protocol having
no other request/response), then ``GET /api/v2/workspaces``'s latency from
concurrent clients while the agents keep reporting. Prints a table against
the brief's targets and writes ``bench/results/agents-scale-<time>.json``.

    .venv/bin/python bench/run_agents_scale.py       # sqlite, postgres, 2 replicas: ~7 min
    .venv/bin/python bench/run_agents_scale.py --backend postgres --replicas 2

The workspaces, their start builds and their agents (tokens made by
``AgentService.issue``) are written straight into the server's database
instead of running 1,000 real builds. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from rich.console import Console
from rich.table import Table

from run_api import wait_quiet, write_results
from stockade.devtools.postgres import TempPostgres
from stockade.devtools.server import ServerProcess
from stockade.sdk import Client
from stockade.sdk.templates import build_archive

PASSWORD = "bench-Horse-Battery-42"
TEMPLATE = "bench-agents"
RESULTS_DIR = Path(__file__).parent / "results"
SIMULATOR = Path(__file__).parent / "agent_sim.py"
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Coder's published scale test: about 3 vCPU of coderd for 2,000 agents.
CODER_MILLICORES_PER_AGENT = 3000 / 2000
# After the reconnects stop, before the agents' states are read from the list.
CALM_SECONDS = 3.0
TARGET_CORES = 1.0
TARGET_RSS_MB = 300.0
TARGET_RPC_P95_MS = 60.0
TARGET_LIST_P99_MS = 100.0  # the API target (20 clients, 1,000 rows)
console = Console(width=None if sys.stdout.isatty() else 130)


# --- /proc readings ------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def proc_status(pid: int, key: str) -> float:
    """A ``kB`` field of /proc/<pid>/status (VmRSS, VmHWM), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_files(pid: int) -> tuple[int, int]:
    """(open descriptors now, the soft ``Max open files`` limit)."""
    count = len(os.listdir(f"/proc/{pid}/fd"))
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return count, (10**9 if soft == "unlimited" else int(soft))
    return count, -1


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU seconds of a process tree, the exited children included (the
    PostgreSQL backends come and go with the servers' pools)."""
    if pid is None:
        return 0.0
    root = psutil.Process(pid)
    return float(sum(sum(p.cpu_times()[:4]) for p in [root, *root.children(recursive=True)]))


def machine_busy_seconds() -> float:
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + t.irq + t.softirq)


def quantiles(values: list[float]) -> dict[str, float | int]:
    """n, p50, p95, p99 and max of a list of milliseconds."""
    if not values:
        return {"n": 0}
    if len(values) == 1:
        v = round(values[0], 2)
        return {"n": 1, "p50": v, "p95": v, "p99": v, "max": v}
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return {
        "n": len(values),
        "p50": round(cuts[49], 2),
        "p95": round(cuts[94], 2),
        "p99": round(cuts[98], 2),
        "max": round(max(values), 2),
    }


# --- seeding ---------------------------------------------------------------------


def database_url(server: ServerProcess) -> str:
    """The server's own database URL (as ``Settings.database_url`` makes it)."""
    if server.postgres_url:
        return "postgresql+asyncpg://" + server.postgres_url.split("://", 1)[1]
    return f"sqlite+aiosqlite:///{server.data_dir / 'stockade.db'}"


async def seed_agents(url: str, owner: str, count: int) -> list[str]:
    """``count`` workspaces of the owner from the bench template, each with a
    succeeded start build and a live agent; returns the agents' tokens.
    Written with the server's own models and ``AgentService.issue``; the
    builds carry no built-in worker's name, so the compute reconciler leaves
    these workspaces alone."""
    from sqlalchemy import select

    from stockade.server.agents.service import AgentService
    from stockade.server.db import Database
    from stockade.server.db.models import Template, User, Workspace, WorkspaceBuild, utcnow

    db = Database(url, pool_size=2)
    try:
        async with db.transaction() as session:
            user = (await session.execute(select(User).where(User.username == owner))).scalar_one()
            template = (
                await session.execute(select(Template).where(Template.name == TEMPLATE))
            ).scalar_one()
            assert template.active_version_id is not None
            now = utcnow()
            workspaces = [
                Workspace(
                    owner_id=user.id,
                    name=f"sim-{i:05d}",
                    organization_id=template.organization_id,
                    template_id=template.id,
                    template_version_id=template.active_version_id,
                    backend="local",
                    parameters={},
                    state={},
                    compute_status="running",
                )
                for i in range(count)
            ]
            session.add_all(workspaces)
            await session.flush()
            builds = [
                WorkspaceBuild(
                    workspace_id=ws.id,
                    number=1,
                    transition="start",
                    initiator_id=user.id,
                    template_version_id=template.active_version_id,
                    parameters={},
                    backend="local",
                    status="succeeded",
                    created_at=now,
                    started_at=now,
                    finished_at=now,
                    worker_name="bench-seed",
                )
                for ws in workspaces
            ]
            session.add_all(builds)
            await session.flush()
            return [
                await AgentService.issue(session, ws.id, build.id)
                for ws, build in zip(workspaces, builds, strict=True)
            ]
    finally:
        await db.engine.dispose()


def template_dir(root: Path, items: int, interval: int) -> Path:
    directory = root / TEMPLATE
    directory.mkdir(parents=True, exist_ok=True)
    metadata = "".join(
        f"    - key: m{i}\n      display_name: Metric {i}\n"
        f"      script: cat /proc/loadavg\n      interval: {interval}\n"
        for i in range(items)
    )
    (directory / "stockade.yaml").write_text(
        f"name: {TEMPLATE}\nbackend: local\nagent:\n  startup_script: ''\n"
        + (f"  metadata:\n{metadata}" if items else "")
    )
    return directory


# --- the simulators --------------------------------------------------------------


@dataclass
class Simulator:
    """One ``agent_sim.py`` process and what its status lines said."""

    process: subprocess.Popen[str]
    out: Path
    agents: int
    status: dict[str, Any] = field(default_factory=dict)
    ready_at: float | None = None
    thread: threading.Thread | None = None

    def follow(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                console.print(f"[dim]sim: {line.rstrip()}[/]")
                continue
            if message.get("event") == "ready":
                self.ready_at = float(message["t"])
            else:
                self.status = message

    def stop(self) -> dict[str, Any]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.thread is not None:
            self.thread.join(5)
        if not self.out.exists():
            raise RuntimeError(f"agent_sim exited with {self.process.returncode} and no results")
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result


def start_simulator(
    url: str, tokens: list[str], work: Path, index: int, args: argparse.Namespace, ramp: float
) -> Simulator:
    name = f"sim{index}"
    token_file = work / f"{name}-tokens.json"
    token_file.write_text(json.dumps(tokens))
    out = work / f"{name}-out.json"
    command = [
        sys.executable, str(SIMULATOR), "--url", url, "--tokens", str(token_file),
        "--out", str(out), "--interval", str(args.interval),
        "--ping-interval", str(args.ping_interval), "--ramp-rate", str(ramp),
        "--reconnects", str(args.reconnects / args.replicas), "--seed", str(index),
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1)
    sim = Simulator(process, out, len(tokens))
    sim.thread = threading.Thread(target=sim.follow, daemon=True)
    sim.thread.start()
    return sim


# --- sampling and windows --------------------------------------------------------


class RssSampler:
    """VmRSS of each server once a second, from a thread, for the whole run."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.samples: list[tuple[float, list[float]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.samples.append(
                    (time.monotonic(), [proc_status(p, "VmRSS") for p in self.pids])
                )
            except OSError:
                return

    def window(self, start: float, end: float) -> list[dict[str, float]]:
        """Median and max RSS of each server between ``start`` and ``end``."""
        inside = [values for t, values in self.samples if start <= t <= end]
        out = []
        for i in range(len(self.pids)):
            column = [values[i] for values in inside] or [float("nan")]
            out.append({"median_mb": round(statistics.median(column), 1),
                        "max_mb": round(max(column), 1)})  # fmt: skip
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)


@dataclass
class CpuMark:
    t: float
    servers: list[float]
    db: float
    sims: list[float]
    own: float
    machine: float


def cpu_mark(servers: list[int], db: int | None, sims: list[int]) -> CpuMark:
    return CpuMark(
        time.monotonic(),
        [proc_cpu_seconds(p) for p in servers],
        tree_cpu_seconds(db),
        [proc_cpu_seconds(p) for p in sims],
        time.process_time(),
        machine_busy_seconds(),
    )


def cores(a: CpuMark, b: CpuMark) -> dict[str, Any]:
    """Cores busy between two marks: each server, the database, the
    simulators, this process and the rest of the machine."""
    span = b.t - a.t
    servers = [round((y - x) / span, 3) for x, y in zip(a.servers, b.servers, strict=True)]
    sims = sum(y - x for x, y in zip(a.sims, b.sims, strict=True)) / span
    db = (b.db - a.db) / span
    own = (b.own - a.own) / span
    other = (b.machine - a.machine) / span - sum(servers) - db - sims - own
    return {
        "seconds": round(span, 1),
        "servers": servers,
        "servers_total": round(sum(servers), 3),
        "db": round(db, 3),
        "simulators": round(sims, 3),
        "orchestrator": round(own, 3),
        "other": round(other, 3),
    }


def in_window(sims: list[dict[str, Any]], kind: str, start: float, end: float) -> list[float]:
    return [ms for sim in sims for t, k, ms in sim["samples"] if k == kind and start <= t <= end]


def errors_in(sims: list[dict[str, Any]], start: float, end: float) -> list[str]:
    return [what for sim in sims for t, what in sim["errors"] if start <= t <= end]


# --- profiles ---------------------------------------------------------------------


def start_profiles(
    args: argparse.Namespace, pids: list[int], label: str, phase: str, seconds: float
) -> list[subprocess.Popen[bytes]]:
    """With ``--profile``: py-spy samples each server (``--nonblocking``:
    it does not stop the server to read its stacks) for the window and writes
    collapsed stacks to bench/results/agents-scale-<scenario>-<phase>-<n>.txt."""
    if not args.profile:
        return []
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    name = label.replace(", ", "-").replace(" ", "")
    return [
        subprocess.Popen(
            [
                args.profile,
                "record",
                "--nonblocking",
                "-r",
                "50",
                "-f",
                "raw",
                "-d",
                str(int(seconds) + 1),
                "-p",
                str(pid),
                "-o",
                str(RESULTS_DIR / f"agents-scale-{name}-{phase}-{i}.txt"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for i, pid in enumerate(pids)
    ]


def wait_profiles(profiles: list[subprocess.Popen[bytes]]) -> None:
    for p in profiles:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


# --- the workspace list ------------------------------------------------------------


async def list_load(
    urls: list[str], token: str, clients: int, seconds: float
) -> tuple[list[float], int, int, list[float]]:
    """``clients`` closed-loop clients of ``GET /api/v2/workspaces`` (spread
    over ``urls``) for ``seconds``: (latencies in ms, errors, bytes of the
    last answer, request end times). Answers are not parsed here: the
    client shares the machine's 2 cores with the servers."""
    headers = {"Authorization": f"Bearer {token}"}
    latencies: list[float] = []
    ends: list[float] = []
    errors = 0
    size = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    pools = [
        httpx.AsyncClient(base_url=u, timeout=60.0, trust_env=False, limits=limits) for u in urls
    ]
    deadline = time.monotonic() + seconds

    async def worker(http: httpx.AsyncClient) -> None:
        nonlocal errors, size
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                response = await http.get("/api/v2/workspaces", headers=headers)
            except httpx.HTTPError:
                errors += 1
                continue
            ended = time.monotonic()
            if response.status_code == 200:
                latencies.append((ended - started) * 1000)
                ends.append(ended)
                size = len(response.content)
            else:
                errors += 1

    try:
        # One warm-up request per pool (connection, first-time code paths).
        await asyncio.gather(*(p.get("/api/v2/workspaces", headers=headers) for p in pools))
        await asyncio.gather(*(worker(pools[i % len(pools)]) for i in range(clients)))
    finally:
        for pool in pools:
            await pool.aclose()
    return latencies, errors, size, ends


def freshness(url: str, token: str, interval: float) -> dict[str, Any]:
    """What one workspace list says of the agents: how many it shows
    connected, and how old their newest metadata is (the simulators stamp
    ``collected_at`` as they send; older than the interval plus a little
    means the server is behind on its writes)."""
    started = time.monotonic()
    with Client(url, token) as client:
        listing = client.list_workspaces()
    seconds = time.monotonic() - started
    now = datetime.now(UTC)
    connected = 0
    ages: list[float] = []
    for ws in listing.workspaces:
        agent = ws.agent
        if agent is None:
            continue
        connected += agent.status == "connected"
        stamps = [m.collected_at for m in agent.metadata]
        if stamps:
            ages.append((now - max(stamps)).total_seconds())
    return {
        "workspaces": listing.count,
        "agents_connected": connected,
        "with_metadata": len(ages),
        "metadata_age_s_p50": round(statistics.median(ages), 2) if ages else None,
        "metadata_age_s_max": round(max(ages), 2) if ages else None,
        "stale_agents": sum(a > interval * 1.5 + 2 for a in ages),
        "list_seconds": round(seconds, 3),
    }


# --- one scenario --------------------------------------------------------------------


@contextmanager
def cluster(backend: str) -> Iterator[TempPostgres | None]:
    if backend == "sqlite":
        yield None
        return
    with TempPostgres() as pg:
        yield pg


def wait_all_ready(sims: list[Simulator], timeout: float) -> float:
    """Until every simulator's agents have all had their first manifest;
    returns the monotonic time the last did."""
    deadline = time.monotonic() + timeout
    last_print = 0.0
    while any(s.ready_at is None for s in sims):
        for s in sims:
            if s.process.poll() is not None:
                raise RuntimeError(f"agent_sim exited early with {s.process.returncode}")
        if time.monotonic() > deadline:
            states = [s.status for s in sims]
            raise RuntimeError(f"agents not all connected after {timeout:.0f} s: {states}")
        if time.monotonic() - last_print > 5:
            last_print = time.monotonic()
            done = sum(int(s.status.get("ever_ready", 0)) for s in sims)
            console.print(f"  connecting: {done}/{sum(s.agents for s in sims)}")
        time.sleep(0.2)
    return max(s.ready_at or 0.0 for s in sims)


def run_scenario(backend: str, replicas: int, args: argparse.Namespace) -> dict[str, Any]:
    label = f"{backend}, {replicas} replica{'s' if replicas > 1 else ''}"
    console.rule(label)
    result: dict[str, Any] = {"label": label, "backend": backend, "replicas": replicas}
    with cluster(backend) as pg, tempfile.TemporaryDirectory(prefix="stockade-bench-agents-") as t:
        work = Path(t)
        pg_url = pg.create_database() if pg is not None else ""
        db_pid = None
        if pg is not None:
            db_pid = int((pg.datadir / "postmaster.pid").read_text().split()[0])
        env = {"STOCKADE_AUDIT_KEY": secrets.token_hex(32)}  # shared, as replicas must
        servers: list[ServerProcess] = []
        sims: list[Simulator] = []
        sampler: RssSampler | None = None
        try:
            for i in range(replicas):  # one after another: the first makes the schema
                server = ServerProcess(data_dir=work / f"data-{i}", postgres_url=pg_url, env=env)
                servers.append(server.start(timeout=60))
            pids = [s.process.pid for s in servers if s.process is not None]
            result["idle_rss_mb"] = [round(proc_status(p, "VmRSS"), 1) for p in pids]
            result["nofile"] = [open_files(p)[1] for p in pids]
            per_replica = -(-args.agents // replicas)
            for pid, limit in zip(pids, result["nofile"], strict=True):
                if limit < per_replica + 200:
                    console.print(
                        f"[red]server {pid} may open only {limit} files: too few for "
                        f"{per_replica} agents (raise `ulimit -n`)[/]"
                    )
            with Client(servers[0].url) as client:
                client.create_first_user("owner", "owner@bench.local", PASSWORD)
                token = client.login("owner", PASSWORD).session_token
            with Client(servers[0].url, token) as client:
                client.push_template(
                    TEMPLATE, build_archive(template_dir(work, args.items, args.interval))
                )
            started = time.monotonic()
            tokens = asyncio.run(seed_agents(database_url(servers[0]), "owner", args.agents))
            result["seed_s"] = round(time.monotonic() - started, 2)
            console.print(f"  seeded {len(tokens)} workspaces and agents in {result['seed_s']} s")

            sampler = RssSampler(pids)
            ramp_start = time.monotonic()
            for i, server in enumerate(servers):
                mine = tokens[i::replicas]
                sims.append(
                    start_simulator(server.url, mine, work, i, args, args.ramp_rate / replicas)
                )
            sim_pids = [s.process.pid for s in sims]
            mark0 = cpu_mark(pids, db_pid, sim_pids)  # the simulators' imports count here
            ready = wait_all_ready(sims, timeout=args.agents / args.ramp_rate + 120)
            mark1 = cpu_mark(pids, db_pid, sim_pids)
            result["ramp_s"] = round(ready - ramp_start, 2)
            result["ramp_cpu"] = cores(mark0, mark1)
            console.print(f"  all {args.agents} agents connected in {result['ramp_s']} s")

            time.sleep(args.settle)
            profiles = start_profiles(args, pids, label, "steady", args.duration)
            steady_start = time.monotonic()
            a = cpu_mark(pids, db_pid, sim_pids)
            while time.monotonic() < steady_start + args.duration:
                time.sleep(min(10.0, steady_start + args.duration - time.monotonic()))
                connected = sum(int(s.status.get("connected", 0)) for s in sims)
                elapsed = time.monotonic() - steady_start
                console.print(
                    f"  steady {elapsed:.0f}/{args.duration:.0f} s: {connected} connected"
                )
            b = cpu_mark(pids, db_pid, sim_pids)
            steady_end = time.monotonic()
            wait_profiles(profiles)
            result["steady_cpu"] = cores(a, b)
            result["steady_rss"] = sampler.window(steady_start, steady_end)
            result["steady_fds"] = [open_files(p)[0] for p in pids]
            for sim in sims:  # no more reconnects: every agent should now show connected
                sim.process.send_signal(signal.SIGUSR1)
            time.sleep(CALM_SECONDS)
            result["freshness"] = freshness(servers[0].url, token, args.interval)
            result["freshness"]["agents_connected_per_simulators"] = sum(
                int(s.status.get("connected", 0)) for s in sims
            )
            console.print(f"  after the steady window: {result['freshness']}")

            profiles = start_profiles(args, pids, label, "list", args.list_duration)
            list_start = time.monotonic()
            c = cpu_mark(pids, db_pid, sim_pids)
            latencies, errors, size, _ = asyncio.run(
                list_load([s.url for s in servers], token, args.list_clients, args.list_duration)
            )
            d = cpu_mark(pids, db_pid, sim_pids)
            list_end = time.monotonic()
            wait_profiles(profiles)
            result["list"] = {
                "clients": args.list_clients,
                **quantiles(latencies),
                "errors": errors,
                "req_per_s": round(len(latencies) / (list_end - list_start), 1),
                "bytes": size,
            }
            result["list_cpu"] = cores(c, d)
            result["list_rss"] = sampler.window(list_start, list_end)
            console.print(f"  workspace list: {result['list']}")
        finally:
            sim_results = []
            for sim in sims:
                try:
                    sim_results.append(sim.stop())
                except RuntimeError as exc:
                    console.print(f"[red]{exc}[/]")
            if sampler is not None:
                sampler.stop()
            peaks = []
            for server in servers:
                if server.process is not None and server.process.poll() is None:
                    peaks.append(round(proc_status(server.process.pid, "VmHWM"), 1))
            for server in reversed(servers):
                server.stop()
            result["peak_rss_mb"] = peaks
    if len(sim_results) != len(sims) or "list" not in result:
        raise RuntimeError(f"{label}: the run did not finish; see above")
    result["simulators"] = [
        {k: s[k] for k in ("agents", "nofile", "cpu_seconds", "max_rss_mb", "sent")}
        for s in sim_results
    ]
    windows = {
        "ramp": (ramp_start, ready),
        "steady": (steady_start, steady_end),
        "list": (list_start, list_end),
    }
    for name, (start, end) in windows.items():
        result[f"{name}_latency_ms"] = {
            kind: quantiles(in_window(sim_results, kind, start, end))
            for kind in ("connect", "hello", "ping", "lag")
        }
        errors_seen = errors_in(sim_results, start, end)
        result[f"{name}_errors"] = {"count": len(errors_seen), "first": errors_seen[:5]}
    steady = result["steady_cpu"]
    result["millicores_per_agent"] = round(
        (steady["servers_total"] + steady["db"]) * 1000 / args.agents, 3
    )
    return result


# --- the report ------------------------------------------------------------------------


def fmt_q(q: dict[str, Any], keys: tuple[str, ...] = ("p50", "p95", "p99")) -> str:
    if not q.get("n"):
        return "-"
    return "/".join(f"{q[k]:.1f}" for k in keys) + f" (n={q['n']})"


def rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    steady, lst = r["steady_cpu"], r["list_cpu"]

    def per(values: list[float]) -> str:
        return " + ".join(f"{v:.2f}" for v in values)

    rss = r["steady_rss"]
    fresh = r["freshness"]
    return [
        ("agents connected: per the workspace list (per the simulators)",
         f"{fresh['agents_connected']}/{fresh['workspaces']} "
         f"({fresh['agents_connected_per_simulators']})", ""),
        ("all connected after, s (hello->manifest p50/p95/p99 ms)",
         f"{r['ramp_s']:.1f} ({fmt_q(r['ramp_latency_ms']['hello'])})", ""),
        ("server cores during the connect ramp", per(r["ramp_cpu"]["servers"]), ""),
        ("steady: server cores busy (per replica)", per(steady["servers"]),
         f"< {TARGET_CORES:g} per server"),
        ("steady: database cores (PostgreSQL)", f"{steady['db']:.2f}", ""),
        ("steady: server RSS median (max), MB",
         " + ".join(f"{x['median_mb']:.0f} ({x['max_mb']:.0f})" for x in rss),
         f"< {TARGET_RSS_MB:g}"),
        ("peak RSS over the run (VmHWM), MB", " + ".join(f"{x:.0f}" for x in r["peak_rss_mb"]),
         ""),
        ("server+db millicores per agent", f"{r['millicores_per_agent']:.3f}",
         f"Coder ~{CODER_MILLICORES_PER_AGENT:g}"),
        ("steady: ping->pong p50/p95/p99 ms", fmt_q(r["steady_latency_ms"]["ping"]),
         f"p95 < {TARGET_RPC_P95_MS:g}"),
        ("steady: hello->manifest on reconnect p50/p95/p99 ms",
         fmt_q(r["steady_latency_ms"]["hello"]), f"p95 < {TARGET_RPC_P95_MS:g}"),
        ("steady: newest metadata age p50/max, s (stale agents)",
         f"{fresh['metadata_age_s_p50']}/{fresh['metadata_age_s_max']} ({fresh['stale_agents']})",
         ""),
        ("steady: connection errors", str(r["steady_errors"]["count"]), "0"),
        (f"list ({r['list']['clients']} clients) p50/p95/p99 ms", fmt_q(r["list"]),
         f"p99 < {TARGET_LIST_P99_MS:g}"),
        ("  list req/s, errors, answer size", f"{r['list']['req_per_s']}, "
         f"{r['list']['errors']}, {r['list']['bytes'] / 1e6:.1f} MB", ""),
        ("  server cores (db) during the list load",
         f"{per(lst['servers'])} ({lst['db']:.2f})", ""),
        ("  ping->pong p50/p95/p99 ms during the list load",
         fmt_q(r["list_latency_ms"]["ping"]), ""),
        ("simulator cores (steady), loop lag p99 ms",
         f"{steady['simulators']:.2f}, {r['steady_latency_ms']['lag'].get('p99', '-')}", ""),
        ("other work on the machine, cores (steady)", f"{steady['other']:.2f}", "~0"),
        ("server open files now / limit",
         " + ".join(f"{n}/{lim}" for n, lim in zip(r["steady_fds"], r["nofile"], strict=True)),
         ""),
    ]  # fmt: skip


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    table = Table(
        title=f"{args.agents} agents, metadata every {args.interval:g} s "
        f"({args.items} items), steady window {args.duration:g} s"
    )
    table.add_column("metric")
    for r in results:
        table.add_column(r["label"], justify="right")
    table.add_column("target")
    columns = [rows(r) for r in results]
    for i, (metric, _, target) in enumerate(columns[0]):
        table.add_row(metric, *(c[i][1] for c in columns), target)
    console.print(table)
    console.print(
        "Agent RPC: hello->manifest is the protocol's only request/response; in the "
        "steady state the figure is the WebSocket ping->pong round trip (the agent's "
        "keepalive) on the agents' own connections while metadata flows."
    )


def scenarios(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.backend is None and args.replicas is None:
        return [("sqlite", 1), ("postgres", 1), ("postgres", 2)]
    backend = args.backend or ("postgres" if args.replicas == 2 else "sqlite")
    replicas = args.replicas or 1
    if backend == "sqlite" and replicas > 1:
        sys.exit("two replicas need PostgreSQL: use --backend postgres --replicas 2")
    return [(backend, replicas)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--interval", type=int, default=10, help="metadata interval, s")
    parser.add_argument("--items", type=int, default=2, help="metadata items per agent")
    parser.add_argument("--duration", type=float, default=60.0, help="steady window, s")
    parser.add_argument("--backend", choices=["sqlite", "postgres"], default=None,
                        help="default: sqlite, postgres and postgres with 2 replicas")  # fmt: skip
    parser.add_argument("--replicas", type=int, choices=[1, 2], default=None)
    parser.add_argument("--ramp-rate", type=float, default=100.0, help="agents connecting per s")
    parser.add_argument("--settle", type=float, default=None,
                        help="s between the last connect and the steady window "
                        "(default: interval + 3, past the once-a-connection stats)")  # fmt: skip
    parser.add_argument("--ping-interval", type=float, default=15.0, help="agent keepalive, s")
    parser.add_argument("--reconnects", type=float, default=0.5,
                        help="agent reconnects per s in the steady state, fleet-wide")  # fmt: skip
    parser.add_argument("--list-clients", type=int, default=10)
    parser.add_argument("--list-duration", type=float, default=30.0)
    parser.add_argument("--profile", metavar="PY_SPY", default="",
                        help="path of a py-spy binary: profile each server in each window "
                        "(it costs the server some CPU; not for the figures)")  # fmt: skip
    parser.add_argument("--wait-quiet", type=float, default=60.0, help="max s to wait for idle")
    args = parser.parse_args()
    if args.agents < 1 or args.interval < 1 or args.duration <= 0 or args.ramp_rate <= 0:
        sys.exit("--agents, --interval, --duration and --ramp-rate must be positive")
    if args.settle is None:
        args.settle = max(args.interval, 10) + 3.0
    plan = scenarios(args)
    # The servers inherit this process's limit on open files: raise it to the hard one.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    busy = wait_quiet(args.wait_quiet)
    results = []
    for backend, replicas in plan:
        results.append(run_scenario(backend, replicas, argparse.Namespace(**{
            **vars(args), "replicas": replicas})))  # fmt: skip
    report(results, args)
    write_results("agents-scale", results, args, busy)


if __name__ == "__main__":
    main()
