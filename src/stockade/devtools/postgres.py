"""A throw-away PostgreSQL cluster: ``initdb`` in a temp dir, listening on
127.0.0.1 at a free port, stopped and deleted at the end."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

from stockade.devtools.ports import free_port


def find_bindir() -> Path | None:
    """The newest PostgreSQL server binaries (Debian's layout, then PATH)."""
    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(candidate, "initdb").exists():
            return Path(candidate)
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


class TempPostgres:
    """``initdb`` refuses to run as root, so as root the cluster runs as the
    ``postgres`` system user (the Debian package creates it)."""

    def __init__(self, bindir: Path | None = None) -> None:
        found = bindir or find_bindir()
        if found is None:
            raise RuntimeError(
                "PostgreSQL server binaries not found: apt-get install postgresql-15"
            )
        self.bindir = found
        self.base = Path(tempfile.mkdtemp(prefix="stockade-pg-"))
        self.datadir = self.base / "data"
        self.port = free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            pw = pwd.getpwnam(self.user)
            os.chown(self.base, pw.pw_uid, pw.pw_gid)
        self._databases = 0

    def _run(self, *args: str) -> str:
        result = subprocess.run(
            [str(self.bindir / args[0]), *args[1:]],
            user=self.user,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.base,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip() or result.stdout}")
        return result.stdout

    def start(self) -> TempPostgres:
        self._run("initdb", "-D", str(self.datadir), "-U", "stockade", "--auth=trust",
                  "-E", "UTF8", "--no-sync")  # fmt: skip
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.base} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.datadir), "-o", options, "-l",
                  str(self.base / "postgres.log"), "-w", "-t", "30", "start")  # fmt: skip
        return self

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; returns its URL."""
        self._databases += 1
        name = name or f"stockade_{self._databases}"
        self._run("psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "stockade",
                  "-d", "postgres", "-c", f'CREATE DATABASE "{name}"')  # fmt: skip
        return self.url(name)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://stockade@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        if self.datadir.exists():
            subprocess.run(
                [str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate", "stop"],
                user=self.user, capture_output=True, check=False, cwd=self.base,
            )  # fmt: skip
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
