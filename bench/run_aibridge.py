"""What the AI bridge adds to a model call: the same requests sent to a model
server on loopback directly and through a real ``stockade server``'s bridge.

    .venv/bin/python bench/run_aibridge.py [--requests 300] [--chunks 500] [--rounds 20]

Figures (the model server is ``stockade.devtools.llm_upstream``, which answers at
once, so everything measured is overhead, not inference):
- non-streamed chat completion: median and p95 latency, direct and bridged,
  and the difference (authentication, model and limit checks, the upstream
  hop, the record written to the database);
- streamed chat completion of ``--chunks`` chunks: time to the first chunk
  and to the last, direct and bridged; the added time per chunk is the
  difference of the last-chunk times divided by the chunk count;
- the server's resident memory after the runs.
All traffic stays on 127.0.0.1. SQLite, the default install.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from stockade.devtools.llm_upstream import FakeLLM
from stockade.devtools.server import ServerProcess
from stockade.sdk import Client

KEY = "bench-upstream-key"
PASSWORD = "Correct-Horse-42!"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * fraction))]


def plain_calls(
    http: httpx.Client, url: str, headers: dict[str, str], count: int, pause: float
) -> list[float]:
    body = {"model": "llama-3", "messages": [{"role": "user", "content": "a short question"}]}
    timings = []
    for _ in range(count):
        started = time.perf_counter()
        response = http.post(url, json=body, headers=headers)
        timings.append(time.perf_counter() - started)
        assert response.status_code == 200, response.text
        time.sleep(pause)
    return timings


def streamed_calls(
    http: httpx.Client, url: str, headers: dict[str, str], chunks: int, rounds: int, pause: float
) -> tuple[list[float], list[float]]:
    body = {
        "model": "llama-3",
        "stream": True,
        "messages": [{"role": "user", "content": f"chunks:{chunks}"}],
    }
    first, last = [], []
    for _ in range(rounds):
        started = time.perf_counter()
        seen_first = None
        with http.stream("POST", url, json=body, headers=headers) as response:
            assert response.status_code == 200
            for _line in response.iter_raw():
                if seen_first is None:
                    seen_first = time.perf_counter() - started
        last.append(time.perf_counter() - started)
        first.append(seen_first or 0.0)
        time.sleep(pause)
    return first, last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--pause-ms",
        type=float,
        default=20,
        help="between calls (a coding agent's calls are seconds apart; 0 sends them "
        "back to back, each then also waiting on the previous call's record write)",
    )
    args = parser.parse_args()

    with FakeLLM(key=KEY, models=["llama-3"]) as fake, tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(
            data_dir=Path(tmp) / "data",
            env={
                "PYTHONPYCACHEPREFIX": str(Path(tmp) / "pycache"),
                "STOCKADE_AIBRIDGE_OPENAI_BASE_URL": f"{fake.url}/v1",
                "STOCKADE_AIBRIDGE_OPENAI_KEY": KEY,
                "STOCKADE_AIBRIDGE_REQUESTS_PER_MINUTE": "0",
                "STOCKADE_LOGIN_RATE_PER_IP": "100000",
            },
        ).start()
        try:
            owner = Client(server.url)
            owner.create_first_user("owner", "owner@example.com", PASSWORD)
            owner.login("owner", PASSWORD)
            token = owner.create_token("bench").token
            targets = {
                "direct": (f"{fake.url}/v1/chat/completions", {"authorization": f"Bearer {KEY}"}),
                "bridged": (
                    f"{server.url}/api/v2/aibridge/openai/v1/chat/completions",
                    {"authorization": f"Bearer {token}"},
                ),
            }
            figures: dict[str, float] = {}
            with httpx.Client(timeout=60, trust_env=False) as http:
                for name, (url, headers) in targets.items():
                    pause = args.pause_ms / 1000
                    plain_calls(http, url, headers, 20, pause)  # warm-up: connections, caches
                    timings = plain_calls(http, url, headers, args.requests, pause)
                    figures[f"{name}_plain_median_ms"] = statistics.median(timings) * 1000
                    figures[f"{name}_plain_p95_ms"] = percentile(timings, 0.95) * 1000
                    streamed_calls(http, url, headers, args.chunks, 2, pause)
                    first, last = streamed_calls(
                        http, url, headers, args.chunks, args.rounds, pause
                    )
                    figures[f"{name}_stream_first_chunk_ms"] = statistics.median(first) * 1000
                    figures[f"{name}_stream_total_ms"] = statistics.median(last) * 1000
            assert server.process is not None
            rss = psutil.Process(server.process.pid).memory_info().rss
            records = owner.list_aibridge(limit=1).count
        finally:
            server.stop()

    added_plain = figures["bridged_plain_median_ms"] - figures["direct_plain_median_ms"]
    added_total = figures["bridged_stream_total_ms"] - figures["direct_stream_total_ms"]
    figures.update(
        {
            "added_plain_median_ms": added_plain,
            "added_plain_p95_ms": figures["bridged_plain_p95_ms"] - figures["direct_plain_p95_ms"],
            "added_first_chunk_ms": figures["bridged_stream_first_chunk_ms"]
            - figures["direct_stream_first_chunk_ms"],
            "added_per_chunk_us": added_total / args.chunks * 1000,
            "server_rss_mb": rss / 2**20,
        }
    )
    print(
        f"AI bridge overhead (calls {args.pause_ms:g} ms apart: {args.requests} plain, "
        f"{args.rounds} streams of "
        f"{args.chunks} chunks; {records} records written; {os.cpu_count()} CPUs)"
    )
    for name, value in figures.items():
        print(f"  {name:32} {value:10.2f}")
    print(json.dumps({k: round(v, 3) for k, v in figures.items()}))


if __name__ == "__main__":
    main()
