"""A real ``stockade server`` in a subprocess, as a user would run it."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from stockade.devtools.ports import free_port


class ServerProcess:
    def __init__(
        self,
        *,
        data_dir: Path | None = None,
        postgres_url: str = "",
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
    ) -> None:
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="stockade-data-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.postgres_url = postgres_url
        self.extra_env = env or {}
        self.args = args or []
        self.log_path = self.data_dir / "server.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.ready_seconds: float | None = None
        # How the readiness probe checks the certificate of an https server.
        self.verify: ssl.SSLContext | bool = True

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "stockade", "server", "--address",
               f"127.0.0.1:{self.port}", "--data-dir", str(self.data_dir), *self.args]  # fmt: skip
        if self.postgres_url:
            cmd += ["--postgres-url", self.postgres_url]
        return cmd

    def start(self, timeout: float = 30.0) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
        env.update(self.extra_env)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        started = time.perf_counter()
        self.process = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=env
        )
        log.close()
        deadline = started + timeout
        while time.perf_counter() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}: {self.logs()}")
            try:
                probe = httpx.get(f"{self.url}/healthz", timeout=1.0, verify=self.verify)
                if probe.status_code == 200:
                    self.ready_seconds = time.perf_counter() - started
                    return self
            except httpx.TransportError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s: {self.logs()}")

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
