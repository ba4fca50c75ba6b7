"""Simulated workspace agents for ``run_agents_scale.py``: many agents in one
asyncio process, each speaking the real agent protocol
(``stockade.agent.protocol``) over its own WebSocket to a control plane.

What each simulated agent does, as ``stockade.agent.agent.Agent`` does with
an empty startup script and metadata items in its template:

- connects to ``CONNECT_PATH`` with ``Authorization: Bearer <token>``, sends
  ``hello`` and at once its current ``lifecycle`` state (first connection:
  ``created``), waits for the ``manifest``; on its first connection it then
  reports ``starting`` and ``ready``;
- sends one ``metadata`` message with every item of the manifest every
  ``interval`` seconds (the manifest's; the real agent batches items that
  come due together), on a grid with a random phase per agent so the fleet
  does not report in lockstep;
- sends ``stats`` once, 10 s after each connect (the real agent sends them
  when they changed, so an idle one sends them once per connection);
- pings every ``--ping-interval`` seconds (the agent's keepalive is 15 s).

Measured (``time.monotonic()``, which is system-wide on Linux, so the
orchestrator can cut the samples into its own windows): the WebSocket
upgrade (``connect``), hello -> manifest (``hello``), ping -> pong
(``ping``) and this process's event-loop lag (``lag``: how late a 50 ms
sleep wakes up; if it grows, this client, not the server, is slow).

It prints one JSON status line every 2 s on stdout (``{"connected": ...}``)
and ``{"event": "ready"}`` once every agent has had its first manifest.
``--reconnects R``: once all are connected, R random agents a second drop
their connection and come back (an agent restart: hello -> manifest is
measured in the steady state too), until SIGUSR1. On SIGTERM it closes
every connection, writes everything it measured to ``--out`` and exits.

    python bench/agent_sim.py --url http://127.0.0.1:PORT --tokens FILE --out FILE
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import resource
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from stockade.agent.protocol import CLOSE_TOKEN_REFUSED, CONNECT_PATH, PROTOCOL_VERSION

STATS_AFTER = 10.0  # stockade.agent.agent.STATS_INTERVAL
MANIFEST_TIMEOUT = 60.0
PONG_TIMEOUT = 30.0
LAG_EVERY = 0.05
STATUS_EVERY = 2.0
RETRY_DELAY = 1.0


def utcnow() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class Refused(Exception):
    """The server refused the token: this agent stops for good."""


@dataclass
class SimAgent:
    index: int
    token: str
    # This agent's metadata phase: it reports at phase + k * interval.
    phase: float
    ping_phase: float
    first: bool = True
    connected: bool = False
    reconnect: asyncio.Event = field(default_factory=asyncio.Event)


class Fleet:
    def __init__(self, args: argparse.Namespace, tokens: list[str]) -> None:
        self.args = args
        base = args.url.rstrip("/").replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        self.url = base + CONNECT_PATH
        self.stopping = asyncio.Event()
        self.all_ready = asyncio.Event()
        self.calm = asyncio.Event()  # set by SIGUSR1: no more reconnects
        self.samples: list[tuple[float, str, float]] = []  # (monotonic, kind, ms)
        self.errors: list[tuple[float, str]] = []  # (monotonic, what)
        self.sent: Counter[str] = Counter()
        self.connected = 0
        self.ever_ready = 0
        self.ready_at: float | None = None
        self.epoch = time.monotonic()
        rng = random.Random(args.seed)
        self.agents = [
            SimAgent(i, t, rng.uniform(0, args.interval), rng.uniform(0, args.ping_interval))
            for i, t in enumerate(tokens)
        ]

    def sample(self, kind: str, seconds: float) -> None:
        self.samples.append((time.monotonic(), kind, seconds * 1000.0))

    def error(self, what: str) -> None:
        self.errors.append((time.monotonic(), what[:200]))

    # --- one agent ------------------------------------------------------------

    async def run_agent(self, agent: SimAgent, start_at: float) -> None:
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        while not self.stopping.is_set():
            try:
                await self.session(agent)
            except Refused as exc:
                self.error(f"refused: {exc}")
                return
            except (TimeoutError, OSError, ConnectionClosed, InvalidStatus) as exc:
                if self.stopping.is_set():
                    return
                self.error(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(RETRY_DELAY * (0.5 + random.random()))

    async def session(self, agent: SimAgent) -> None:
        headers = {
            "Authorization": f"Bearer {agent.token}",
            "User-Agent": f"stockade-agent/{PROTOCOL_VERSION} (bench)",
        }
        started = time.monotonic()
        try:
            ws = await connect(
                self.url,
                additional_headers=headers,
                compression=None,  # as uvicorn is configured: no deflate
                ping_interval=None,  # we ping ourselves, on the agent's schedule
                proxy=None,  # loopback only, whatever the environment says
                open_timeout=MANIFEST_TIMEOUT,
                close_timeout=5,
                max_size=16 * 1024 * 1024,
                user_agent_header=None,
            )
        except InvalidStatus as exc:
            if exc.response.status_code in (401, 403):
                raise Refused(f"HTTP {exc.response.status_code}") from None
            raise
        opened = time.monotonic()
        self.sample("connect", opened - started)
        try:
            await self.converse(agent, ws, opened)
        finally:
            if agent.connected:
                agent.connected = False
                self.connected -= 1
            await ws.close()

    async def converse(self, agent: SimAgent, ws: ClientConnection, opened: float) -> None:
        hello = {
            "type": "hello",
            "version": PROTOCOL_VERSION,
            "hostname": f"bench-agent-{agent.index}",
            "os": "linux",
            "arch": "x86_64",
            "python": "3.11.7",
        }
        await ws.send(json.dumps(hello))
        current = "created" if agent.first else "ready"
        await ws.send(json.dumps({"type": "lifecycle", "state": current, "time": utcnow()}))
        self.sent["hello"] += 1
        try:
            raw = await asyncio.wait_for(ws.recv(), MANIFEST_TIMEOUT)
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code == CLOSE_TOKEN_REFUSED:
                raise Refused(f"close {exc.rcvd.code}") from None
            raise
        self.sample("hello", time.monotonic() - opened)
        manifest = json.loads(raw)
        if not isinstance(manifest, dict) or manifest.get("type") != "manifest":
            raise OSError(f"expected a manifest, got {str(raw)[:100]!r}")
        if agent.first:
            for state in ("starting", "ready"):
                await ws.send(json.dumps({"type": "lifecycle", "state": state, "time": utcnow()}))
            agent.first = False
            self.ever_ready += 1
            if self.ever_ready == len(self.agents):
                self.ready_at = time.monotonic()
                self.all_ready.set()
        agent.connected = True
        self.connected += 1
        keys = [
            str(item["key"])
            for item in manifest.get("metadata") or []
            if isinstance(item, dict) and item.get("key")
        ]
        intervals = [
            float(item.get("interval") or 60)
            for item in manifest.get("metadata") or []
            if isinstance(item, dict)
        ]
        interval = min(intervals) if intervals else 0.0
        agent.reconnect.clear()
        tasks = [
            asyncio.ensure_future(self.receive(ws)),
            asyncio.ensure_future(self.keepalive(agent, ws)),
            asyncio.ensure_future(self.stats_once(ws)),
            asyncio.ensure_future(self.stopping.wait()),
            asyncio.ensure_future(agent.reconnect.wait()),
        ]
        if keys and interval > 0:
            tasks.append(asyncio.ensure_future(self.report(agent, ws, keys, interval)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if not task.cancelled() and (error := task.exception()) is not None:
                    raise error
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def receive(self, ws: ClientConnection) -> None:
        """Read what the server sends (nothing but a manifest or a close
        after hello), so that the connection's queue never fills."""
        async for raw in ws:
            message = json.loads(raw)
            if isinstance(message, dict) and message.get("type") == "close":
                raise Refused(str(message.get("reason")))
        raise OSError("the server closed the connection")

    async def report(
        self, agent: SimAgent, ws: ClientConnection, keys: list[str], interval: float
    ) -> None:
        n = 0
        while True:
            now = time.monotonic() - self.epoch
            due = agent.phase + math.ceil((now - agent.phase) / interval) * interval
            await asyncio.sleep(max(0.0, due - now))
            n += 1
            collected = utcnow()
            items = [
                {
                    "key": key,
                    "value": f"{random.random() * 100:.1f}",
                    "error": "",
                    "collected_at": collected,
                }
                for key in keys
            ]
            await ws.send(json.dumps({"type": "metadata", "items": items}))
            self.sent["metadata"] += 1
            await asyncio.sleep(interval / 2)  # past this slot on the grid

    async def stats_once(self, ws: ClientConnection) -> None:
        await asyncio.sleep(STATS_AFTER)
        stats = {
            "type": "stats",
            "streams_open": {},
            "streams_total": {},
            "bytes_in": 0,
            "bytes_out": 0,
        }
        await ws.send(json.dumps(stats))
        self.sent["stats"] += 1
        await asyncio.Event().wait()  # done: wait to be cancelled

    async def keepalive(self, agent: SimAgent, ws: ClientConnection) -> None:
        interval = self.args.ping_interval
        while True:
            now = time.monotonic() - self.epoch
            due = agent.ping_phase + math.ceil((now - agent.ping_phase) / interval) * interval
            await asyncio.sleep(max(0.0, due - now))
            started = time.monotonic()
            pong = await ws.ping()
            try:
                await asyncio.wait_for(pong, PONG_TIMEOUT)
            except TimeoutError:
                self.error(f"no pong within {PONG_TIMEOUT:.0f}s")
                raise
            self.sample("ping", time.monotonic() - started)
            self.sent["ping"] += 1
            await asyncio.sleep(interval / 2)

    # --- the fleet ------------------------------------------------------------

    async def lag_monitor(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(LAG_EVERY)
            self.sample("lag", time.monotonic() - started - LAG_EVERY)

    async def status(self) -> None:
        announced = False
        while True:
            line: dict[str, Any] = {
                "t": time.monotonic(),
                "connected": self.connected,
                "ever_ready": self.ever_ready,
                "errors": len(self.errors),
                "sent": dict(self.sent),
            }
            print(json.dumps(line), flush=True)
            if self.ready_at is not None and not announced:
                announced = True
                print(json.dumps({"event": "ready", "t": self.ready_at}), flush=True)
            await asyncio.sleep(0.2 if not announced else STATUS_EVERY)

    async def churn(self) -> None:
        """Once every agent is in: ``--reconnects`` per second, a random
        connected agent drops its connection and comes back."""
        rate = self.args.reconnects
        if rate <= 0:
            return
        await self.all_ready.wait()
        while not self.calm.is_set():
            await asyncio.sleep(1.0 / rate)
            for agent in random.sample(self.agents, min(20, len(self.agents))):
                if agent.connected:
                    agent.reconnect.set()
                    self.sent["reconnect"] += 1
                    break

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, self.calm.set)
        helpers = [
            asyncio.ensure_future(self.lag_monitor()),
            asyncio.ensure_future(self.status()),
            asyncio.ensure_future(self.churn()),
        ]
        start = time.monotonic()
        rate = self.args.ramp_rate
        agents = [
            asyncio.ensure_future(self.run_agent(a, start + i / rate))
            for i, a in enumerate(self.agents)
        ]
        await self.stopping.wait()
        await asyncio.wait(agents, timeout=20)
        for task in [*agents, *helpers]:
            task.cancel()
        await asyncio.gather(*agents, *helpers, return_exceptions=True)


def raise_fd_limit(needed: int) -> int:
    """Raise this process's open-file limit to its hard limit; error out
    when even that cannot hold ``needed`` sockets."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        sys.exit(
            f"agent_sim: {needed} open files needed but the hard limit is {hard}; "
            "raise it (ulimit -Hn, or LimitNOFILE= for a service) or use fewer --agents"
        )
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="the server, http://127.0.0.1:PORT")
    parser.add_argument("--tokens", type=Path, required=True, help="JSON list of agent tokens")
    parser.add_argument("--out", type=Path, required=True, help="where to write the samples")
    parser.add_argument("--interval", type=float, default=10.0, help="phase spread, s")
    parser.add_argument("--ping-interval", type=float, default=15.0)
    parser.add_argument("--ramp-rate", type=float, default=100.0, help="new agents per second")
    parser.add_argument("--reconnects", type=float, default=0.0, help="per second, once all in")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    tokens = json.loads(args.tokens.read_text())
    if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
        sys.exit(f"agent_sim: {args.tokens} must hold a JSON list of token strings")
    nofile = raise_fd_limit(len(tokens) + 100)
    fleet = Fleet(args, tokens)
    started_cpu = time.process_time()
    asyncio.run(fleet.run())
    # Not ru_maxrss: Linux carries it over from the parent across fork and exec.
    hwm = next(
        (int(line.split()[1]) / 1024 for line in Path("/proc/self/status").read_text().splitlines()
         if line.startswith("VmHWM:")),
        float("nan"),
    )  # fmt: skip
    args.out.write_text(
        json.dumps(
            {
                "agents": len(tokens),
                "nofile": nofile,
                "ready_at": fleet.ready_at,
                "epoch": fleet.epoch,
                "cpu_seconds": time.process_time() - started_cpu,
                "max_rss_mb": round(hwm, 1),
                "sent": dict(fleet.sent),
                "samples": fleet.samples,
                "errors": fleet.errors,
            }
        )
    )


if __name__ == "__main__":
    main()
