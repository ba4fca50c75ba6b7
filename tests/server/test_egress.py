"""The egress report end to end: a real server and a real agent process
whose guards count every attempt; a denied one (an ssh stdio forward from the
workspace to an address of this machine the allow-list leaves out) shows in
`GET /api/v2/deployment/egress` and makes `stockade egress report` exit 1.

The forward's destination is an address of this machine's own interfaces,
read back from `ip`, with a listener of the test's behind it: were the guard
to let the connection through, it would stay on this machine and the test
would see it arrive."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from stockade.sdk import Client
from tests.agents import agent_workspace
from tests.conftest import OWNER_PASSWORD, ServerFactory, require
from tests.server.web.conftest import WebClient

SQLITE_ONLY = "the report's upsert is covered on both databases by test_report_adds_up"

TEMPLATE = """\
name: t
backend: local
"""
STOCKADE = str(Path(sys.executable).with_name("stockade"))


def _host_address() -> str:
    """An IPv4 address of one of this machine's own non-loopback interfaces."""
    out = subprocess.run(
        ["ip", "-j", "-4", "addr", "show"], capture_output=True, text=True, check=True
    ).stdout
    for interface in json.loads(out):
        for info in interface.get("addr_info", []):
            if not info["local"].startswith("127."):
                return str(info["local"])
    raise AssertionError(f"no non-loopback IPv4 address on this machine: {out}")


def test_an_agents_denied_forward_is_reported_and_fails_the_report(
    start_server: ServerFactory, tmp_path: Path
) -> None:
    require("ssh", shutil.which("ssh") is not None, "apt-get install openssh-client")
    require("ip", shutil.which("ip") is not None, "apt-get install iproute2")
    address = _host_address()
    listener = socket.socket()
    listener.bind((address, 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    arrived = threading.Event()
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            arrived.set()
            conn.close()

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()

    # Without the private networks, the host's own address is off the list.
    server = start_server(
        env={"STOCKADE_PROVISIONER_WORKERS": "0", "STOCKADE_EGRESS_ALLOW_PRIVATE_NETWORKS": "false"}
    )
    # The server's event loop is uvloop with the guard at its doors.
    assert '"loop": "GuardedLoop"' in server.logs()
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    env = {
        **os.environ,
        "STOCKADE_URL": server.url,
        "STOCKADE_TOKEN": client.token or "",
        "STOCKADE_CONFIG_DIR": str(tmp_path / "cfg"),
    }
    ssh_config = tmp_path / "ssh_config"
    try:
        with agent_workspace(server.url, client, TEMPLATE, tmp_path / "home"):
            subprocess.run(
                [STOCKADE, "config-ssh", "--ssh-config-file", str(ssh_config)],
                env=env, capture_output=True, check=True,
            )  # fmt: skip
            forward = subprocess.run(
                ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes",
                 "-W", f"{address}:{port}", "stockade.w"],
                env=env, capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            assert forward.returncode != 0
            assert "forwarding failed" in forward.stderr or "open failed" in forward.stderr, (
                forward.stderr
            )
            assert not arrived.wait(0.5), "the agent's guard let the connection through"

            # The agent reports its counts with its stats (every 10 s).
            deadline = time.monotonic() + 30
            while True:
                report = client.egress_report()
                denied = [d for d in report.destinations if not d.allowed]
                if denied or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        assert [
            (d.component, d.workspace, d.kind, d.destination, d.port, d.internal) for d in denied
        ] == [("agent", "owner/w", "connect", address, port, False)], denied
        assert report.denied == denied[0].count >= 1
        assert denied[0].reason == "not on the allow-list"
        # The agent's own connections to the control plane, allowed.
        control = [
            d for d in report.destinations
            if d.component == "agent" and d.allowed and d.destination == "127.0.0.1"
            and d.port == server.port
        ]  # fmt: skip
        assert control and control[0].internal and control[0].count >= 2, report.destinations
        assert "10.0.0.0/8" not in report.allow_list and "127.0.0.0/8" in report.allow_list

        cli = subprocess.run(
            [STOCKADE, "egress", "report"], env=env, capture_output=True, text=True, check=False
        )
        assert cli.returncode == 1, cli.stdout + cli.stderr
        assert f"{report.denied} outbound attempts were denied" in cli.stderr
        assert address in cli.stdout
        as_json = subprocess.run(
            [STOCKADE, "egress", "report", "--output", "json"],
            env=env, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert as_json.returncode == 1
        data: dict[str, Any] = json.loads(as_json.stdout)
        assert data["denied"] == report.denied

        # The dashboard's egress page, for owners and auditors.
        web = WebClient(server)
        try:
            web.login("owner", OWNER_PASSWORD)
            page = web.get("/admin/egress")
            assert page.status_code == 200
            assert 'href="/admin/egress"' in page.text  # in the navigation
            assert f"{report.denied} outbound attempt" in page.text
            denied_rows = [row for row in page.text.split("<tr")[1:] if 'class="denied"' in row]
            assert len(denied_rows) == 1
            assert f"{address}:{port}" in denied_rows[0] and "owner/w" in denied_rows[0]
        finally:
            web.close()
    finally:
        stop.set()
        watcher.join()
        listener.close()
        client.close()
