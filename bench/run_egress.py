"""What the egress guard costs: the audit hook runs for every audited event
of the process (file opens, imports, socket calls...), so measure it on the
events that matter, each in a fresh process with and without the guard.

    .venv/bin/python bench/run_egress.py [--rounds 5]

Figures (median of the rounds, per operation):
- open+close of a file (an audited event the hook only glances at);
- a loopback TCP connect+close (checked and counted);
- a getaddrinfo of "localhost" (checked and counted).
All traffic stays on 127.0.0.1."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(
    """
    import json, os, socket, sys, tempfile, time
    if sys.argv[1] == "guard":
        from stockade import egress
        egress.install(egress.EgressPolicy.build(), "bench")
    n = int(sys.argv[2])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    address = listener.getsockname()
    fd, path = tempfile.mkstemp()
    os.close(fd)
    figures = {}

    def timed(name, count, operation):
        started = time.perf_counter()
        for _ in range(count):
            operation()
        figures[name] = (time.perf_counter() - started) / count * 1e9

    def open_close():
        open(path, "rb").close()

    def connect_close():
        s = socket.socket()
        s.connect(address)
        s.close()
        listener.accept()[0].close()

    def lookup():
        socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)

    timed("open_close_ns", n, open_close)
    timed("tcp_connect_ns", n // 10, connect_close)
    timed("getaddrinfo_ns", n // 10, lookup)
    os.unlink(path)
    print(json.dumps(figures))
    """
)


def run(mode: str, count: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode, str(count)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    figures: dict[str, float] = json.loads(done.stdout)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--count", type=int, default=50_000, help="opens per round")
    args = parser.parse_args()
    results: dict[str, dict[str, list[float]]] = {"off": {}, "guard": {}}
    for round_ in range(args.rounds):
        # Alternate the order: each run's 5,000 closed connections linger in
        # TIME_WAIT and slow the next run's connects a little.
        for mode in ("off", "guard") if round_ % 2 == 0 else ("guard", "off"):
            for name, value in run(mode, args.count).items():
                results[mode].setdefault(name, []).append(value)
    print(f"{'operation':<18}{'no guard':>12}{'guard':>12}{'added':>12}")
    for name in results["off"]:
        off = statistics.median(results["off"][name])
        on = statistics.median(results["guard"][name])
        label = name.removesuffix("_ns")
        print(f"{label:<18}{off / 1000:>10.2f}us{on / 1000:>10.2f}us{(on - off) / 1000:>+10.2f}us")


if __name__ == "__main__":
    main()
