"""Workspace benchmark: create -> agent ready, on the local, docker and terraform backends.

For each backend: 20 workspaces created one after another (each one's time
from the create request to its agent's lifecycle ``ready``, as the client sees
it by following the build log and then polling the workspace every 20 ms, and
as the agent stamped it (``ready_at`` - ``created_at``); also the start
build's end), then 20 created at once. Prints p50/p95/max against the brief's
targets and writes ``bench/results/workspaces-<time>.json``.

    .venv/bin/python bench/run_workspaces.py [--backend local|docker|terraform|both|all]
        [--count 20]

The docker backend needs dockerd and the base image (scripts/build-base-image.sh).
The terraform backend runs the starter of `stockade templates init --backend
terraform` (a bubblewrap sandbox made by terraform_data + local-exec) and
also times the same init + plan + apply run by hand with the Terraform CLI,
so that Stockade's share of a build shows.
"Ready" is the agent's lifecycle state once the template's startup script
(here: `true`) has run: the compute runs, the bootstrap fetched (first start)
or found the agent bundle, the agent connected and got its manifest.
All traffic goes to the server under test on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from stockade.devtools.server import ServerProcess
from stockade.provisioner.terraform.cli import base_environment, cli_config
from stockade.sdk import Client
from stockade.sdk.starters import write_starter
from stockade.sdk.templates import build_archive

PASSWORD = "bench-Horse-Battery-42"
BASE_IMAGE = "stockade-base:bookworm"
TARGETS = {"local": 1.0, "docker": 1.5}
RESULTS_DIR = Path(__file__).parent / "results"
console = Console(width=None if sys.stdout.isatty() else 110)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def push_template(client: Client, backend: str, root: Path) -> str:
    name = f"bench-{backend}"
    directory = root / name
    if backend == "terraform":
        write_starter(directory, "terraform", name)
        starter = directory / "stockade.yaml"
        # The same work after the agent connects as the other backends.
        starter.write_text(
            starter.read_text().split("agent:")[0] + "agent:\n  startup_script: 'true'\n"
        )
        client.push_template(name, build_archive(directory))
        return name
    directory.mkdir()
    compute = f"compute:\n  image: {BASE_IMAGE}\n  cpu: 1\n  memory: 512MiB\n"
    manifest = f"name: {name}\nbackend: {backend}\nagent:\n  startup_script: 'true'\n"
    if backend == "docker":
        manifest += compute
    (directory / "stockade.yaml").write_text(manifest)
    client.push_template(name, build_archive(directory))
    return name


AGENT_POLL_SECONDS = 0.02
AGENT_TIMEOUT = 120.0


def create_until_running(url: str, token: str, template: str, name: str) -> dict[str, Any]:
    """One workspace: create, follow its first build's log to the end, then
    wait for its agent to be ready."""
    with Client(url, token) as client:
        started = time.perf_counter()
        ws = client.create_workspace(name, template)
        end: dict[str, Any] = {}
        for event in client.follow_build_logs(ws.owner_name, name, build=1):
            if event["type"] == "end":
                end = event
        built = time.perf_counter() - started
        lifecycle = None
        agent = None
        deadline = time.monotonic() + AGENT_TIMEOUT
        while end.get("status") == "succeeded" and time.monotonic() < deadline:
            agent = client.get_workspace(ws.owner_name, name).agent
            lifecycle = agent.lifecycle_state if agent is not None else None
            if lifecycle in ("ready", "start_error", "start_timeout"):
                break
            time.sleep(AGENT_POLL_SECONDS)
        seen = time.perf_counter() - started
        build = client.get_build(ws.owner_name, name, 1)
    server_seconds = None
    if build.finished_at is not None:
        server_seconds = (build.finished_at - ws.created_at).total_seconds()
    queued = None
    if build.started_at is not None:
        queued = (build.started_at - ws.created_at).total_seconds()
    ready_seconds = None
    if agent is not None and agent.ready_at is not None:
        ready_seconds = (agent.ready_at - ws.created_at).total_seconds()
    connected_seconds = None
    if agent is not None and agent.first_connected_at is not None:
        connected_seconds = (agent.first_connected_at - ws.created_at).total_seconds()
    return {
        "name": name,
        "status": "succeeded" if lifecycle == "ready" else f"{end.get('status')}/{lifecycle}",
        "client_seconds": seen,
        "build_client_seconds": built,
        "server_seconds": ready_seconds,
        "build_server_seconds": server_seconds,
        "connected_seconds": connected_seconds,
        "queued_seconds": queued,
        "stages": {s.name: s.seconds for s in build.stages},
    }


def delete_all(client: Client, names: list[str]) -> None:
    me = client.me().username
    for name in names:
        client.create_build(me, name, "delete", cancel_running=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if not {w.name for w in client.list_workspaces().workspaces} & set(names):
            return
        time.sleep(0.2)
    console.print("warning: some workspaces were not deleted in 300 s")


def summarise(label: str, runs: list[dict[str, Any]], wall: float | None) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "succeeded"]
    client = [r["client_seconds"] for r in ok]
    server = [r["server_seconds"] for r in ok if r["server_seconds"] is not None]
    build = [r["build_server_seconds"] for r in ok if r["build_server_seconds"] is not None]
    connected = [r["connected_seconds"] for r in ok if r["connected_seconds"] is not None]
    return {
        "label": label,
        "runs": len(runs),
        "succeeded": len(ok),
        "client_p50": statistics.median(client) if client else None,
        "client_p95": percentile(client, 95) if client else None,
        "client_max": max(client) if client else None,
        "server_p50": statistics.median(server) if server else None,
        "server_p95": percentile(server, 95) if server else None,
        "build_p50": statistics.median(build) if build else None,
        "connected_p50": statistics.median(connected) if connected else None,
        "wall_seconds": wall,
        "details": runs,
    }


def bench_backend(
    url: str, token: str, backend: str, count: int, root: Path
) -> list[dict[str, Any]]:
    with Client(url, token) as client:
        template = push_template(client, backend, root)
        # One warm-up workspace (first network, first template extraction).
        warm = create_until_running(url, token, template, f"warm-{backend}")
        delete_all(client, [warm["name"]])
        sequential = [
            create_until_running(url, token, template, f"seq-{backend}-{i}") for i in range(count)
        ]
        delete_all(client, [r["name"] for r in sequential])
        started = time.perf_counter()
        with ThreadPoolExecutor(count) as pool:
            burst = list(
                pool.map(
                    lambda i: create_until_running(url, token, template, f"par-{backend}-{i}"),
                    range(count),
                )
            )
        wall = time.perf_counter() - started
        delete_all(client, [r["name"] for r in burst])
    return [
        summarise(f"{backend}: {count} one after another", sequential, None),
        summarise(f"{backend}: {count} at once", burst, wall),
    ]


def terraform_by_hand(runs: int = 10) -> dict[str, float]:
    """init + plan + apply + destroy of the starter run with the Terraform CLI
    directly (no Stockade): p50 seconds of each step."""
    times: dict[str, list[float]] = {"init": [], "plan": [], "apply": [], "destroy": []}
    with tempfile.TemporaryDirectory(prefix="stockade-bench-tf-") as tmp:
        root = Path(tmp)
        (root / "mirror").mkdir()
        config = root / "cli.tfrc"
        config.write_text(cli_config(root / "mirror"))
        env = {**base_environment(config)}
        values = {
            "stockade_workspace_dir": str(root / "ws"),
            "stockade_start_count": 1,
            "stockade_agent_fingerprint": "bench",
            "stockade_agent_init_script": "exec sleep 600",
        }
        for i in range(runs):
            work = root / f"run-{i}"
            write_starter(work, "terraform", "bench")
            (work / "v.tfvars.json").write_text(json.dumps(values))
            for step, argv in (
                ("init", ["init", "-input=false", "-no-color"]),
                ("plan", ["plan", "-input=false", "-var-file=v.tfvars.json", "-out=p"]),
                ("apply", ["apply", "-input=false", "-auto-approve", "p"]),
                (
                    "destroy",
                    ["destroy", "-input=false", "-auto-approve", "-var-file=v.tfvars.json"],
                ),
            ):
                started = time.perf_counter()
                subprocess.run(
                    ["terraform", *argv], cwd=work, env=env, check=True, capture_output=True
                )
                times[step].append(time.perf_counter() - started)
    return {step: statistics.median(values) for step, values in times.items()}


def terraform_report(results: list[dict[str, Any]]) -> None:
    """Stage timings of the terraform builds next to the CLI run by hand."""
    runs = [d for r in results if r["label"].startswith("terraform") for d in r["details"]]
    stages: dict[str, list[float]] = {}
    for run in runs:
        for name, seconds in run["stages"].items():
            if seconds is not None:
                stages.setdefault(name, []).append(seconds)
    by_hand = terraform_by_hand()
    table = Table(title="terraform start build: stages (p50) vs the CLI by hand", show_edge=False)
    for column in ("step", "in a Stockade build", "terraform by hand"):
        table.add_column(column)
    pairs = [("Preparing", None), ("Terraform init", "init"), ("Terraform plan", "plan"),
             ("Terraform apply", "apply")]  # fmt: skip
    for stage, step in pairs:
        mine = stages.get(stage)
        table.add_row(
            stage,
            fmt(statistics.median(mine)) if mine else "-",
            fmt(by_hand[step]) if step else "-",
        )
    table.add_row("(destroy, by hand)", "-", fmt(by_hand["destroy"]))
    console.print(table)


def docker_ready() -> bool:
    try:
        subprocess.run(
            ["docker", "image", "inspect", BASE_IMAGE], check=True, capture_output=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return True


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend", choices=["local", "docker", "terraform", "both", "all"], default="both"
    )
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--workers", type=int, default=None, help="built-in build workers")
    args = parser.parse_args()
    backends = {"both": ["local", "docker"], "all": ["local", "docker", "terraform"]}.get(
        args.backend, [args.backend]
    )
    if "docker" in backends and not docker_ready():
        console.print(f"docker: skipped (no daemon or no {BASE_IMAGE}; see scripts/)")
        backends.remove("docker")
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="stockade-bench-ws-") as tmp:
        root = Path(tmp)
        env = {}
        if "terraform" in backends:
            env["STOCKADE_PROVISIONER_BACKENDS"] = "local,docker,terraform"
        if args.workers is not None:
            env["STOCKADE_PROVISIONER_WORKERS"] = str(args.workers)
        server = ServerProcess(data_dir=root / "data", env=env).start()
        try:
            client = Client(server.url)
            client.create_first_user("owner", "owner@example.com", PASSWORD)
            token = client.login("owner", PASSWORD).session_token
            for backend in backends:
                results += bench_backend(server.url, token, backend, args.count, root)
        finally:
            server.stop()
            if "docker" in backends:  # the deployment's network; Docker has room for ~30
                subprocess.run(
                    ["docker", "network", "prune", "-f", "--filter", "label=stockade.deployment"],
                    capture_output=True,
                    check=False,
                )
    table = Table(title="create -> agent ready", show_edge=False)
    columns = ("scenario", "ok", "client p50", "client p95", "max", "agent p50", "agent p95",
               "build p50", "connected p50", "wall")  # fmt: skip
    for column in columns:
        table.add_column(column)
    for r in results:
        table.add_row(
            r["label"],
            f"{r['succeeded']}/{r['runs']}",
            fmt(r["client_p50"]),
            fmt(r["client_p95"]),
            fmt(r["client_max"]),
            fmt(r["server_p50"]),
            fmt(r["server_p95"]),
            fmt(r["build_p50"]),
            fmt(r["connected_p50"]),
            fmt(r["wall_seconds"]),
        )
    console.print(table)
    console.print("targets: p50 " + ", ".join(f"{b} < {t:.1f} s" for b, t in TARGETS.items()))
    if "terraform" in backends:
        terraform_report(results)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"workspaces-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.write_text(json.dumps(results, indent=2, default=str))
    console.print(f"written: {out}")


if __name__ == "__main__":
    main()
