"""A real OpenID provider for the single sign-on tests: the npm package
``oidc-provider`` running ``provider.mjs`` under Node on 127.0.0.1.

``./dev test`` installs the package into ``.venv/idp`` (``STOCKADE_IDP_DIR``
elsewhere); the script is copied there so Node finds the package next to it.
Tests change accounts and misbehaviours through files the provider reads at
every request (see provider.mjs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from stockade.devtools.ports import free_port
from tests.conftest import require

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("provider.mjs")


def install_dir() -> Path:
    return Path(os.environ.get("STOCKADE_IDP_DIR") or REPO / ".venv" / "idp")


def require_idp() -> None:
    """Skip (fail in CI) when Node or oidc-provider is missing."""
    node = shutil.which("node")
    require("Node.js", node is not None, "install Node 20 or newer")
    package = install_dir() / "node_modules" / "oidc-provider" / "package.json"
    require(
        "oidc-provider",
        package.is_file(),
        f"./dev test installs it (npm install --prefix {install_dir()} oidc-provider@9)",
    )


@dataclass
class Client:
    client_id: str
    client_secret: str
    redirect_uris: list[str]


class IdP:
    """One provider process; ``start``, ``stop`` and ``restart`` on the same
    port (the issuer URL Stockade is configured with stays valid)."""

    def __init__(self, directory: Path, clients: list[Client]) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.clients = clients
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.dir / "idp.log"
        self.accounts: dict[str, dict[str, Any]] = {}
        self._write("accounts.json", {})
        self._write("behaviour.json", {})

    def _write(self, name: str, value: Any) -> None:
        # Whole files only: the provider reads them at every request.
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(json.dumps(value))
        tmp.replace(self.dir / name)

    def start(self, timeout: float = 20.0) -> IdP:
        require_idp()
        target = install_dir() / "provider.mjs"
        copy = target.with_name(f".provider-{os.getpid()}.mjs")
        shutil.copyfile(SCRIPT, copy)
        copy.replace(target)
        config = {
            "port": self.port,
            "issuer": self.issuer,
            "state_dir": str(self.dir),
            "clients": [c.__dict__ for c in self.clients],
        }
        (self.dir / "config.json").write_text(json.dumps(config))
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            ["node", str(target), str(self.dir / "config.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=install_dir(),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the IdP exited with {self.process.returncode}: {self.logs()}")
            try:
                probe = httpx.get(
                    f"{self.issuer}/.well-known/openid-configuration", timeout=1, trust_env=False
                )
                if probe.status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the IdP did not answer within {timeout} s: {self.logs()}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self, *, rotate_keys: bool = False) -> None:
        self.stop()
        if rotate_keys:
            (self.dir / "signing-key.json").unlink(missing_ok=True)
        self.start()

    def logs(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def set_account(self, account_id: str, **claims: Any) -> None:
        """Create or replace an account (its id is its login and subject)."""
        self.accounts[account_id] = claims
        self._write("accounts.json", self.accounts)

    def update_account(self, account_id: str, **claims: Any) -> None:
        self.accounts[account_id] = {**self.accounts.get(account_id, {}), **claims}
        self._write("accounts.json", self.accounts)

    def behave(self, **behaviour: Any) -> None:
        """Misbehave from the next request on (``behave()``: behave again)."""
        self._write("behaviour.json", behaviour)
