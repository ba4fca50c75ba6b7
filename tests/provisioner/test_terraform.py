"""The terraform backend through a real server and the real Terraform CLI:
the starter (a bubblewrap sandbox made with ``terraform_data`` and
``local-exec``) and a Docker container made through the docker CLI go through
start, stop, start and delete with the agent connecting back each time; a
failed apply names the resource and keeps what it made; a canceled apply keeps
its partial state; the state is sealed at rest."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from stockade.agent.bundle import BOOTSTRAP_SCRIPT
from stockade.devtools.server import ServerProcess
from stockade.provisioner.backends.terraform import _new_state, agent_init_script
from stockade.provisioner.terraform import cli as tfcli
from stockade.sdk import ApiError, Client, types
from stockade.sdk.templates import build_archive
from tests.builds import agent_lines, build_lines, wait_for_agent, wait_for_build
from tests.cli.test_cli import Run, cli  # noqa: F401  (fixture)
from tests.conftest import OWNER_PASSWORD, RELAXED_LIMITS, require, stop_workspaces
from tests.terraform import make_mirror

TEMPLATES = Path(__file__).parent / "terraform_templates"
# The server's own workers serve terraform only when told to (they would run
# templates' commands as the server's user).
TERRAFORM_IN_SERVER = {**RELAXED_LIMITS, "STOCKADE_PROVISIONER_BACKENDS": "local,docker,terraform"}
FINISHED = ("succeeded", "failed", "canceled")


def terraform_present() -> None:
    require(
        "the Terraform CLI",
        shutil.which("terraform") is not None,
        "install Terraform 1.4+ (it is at /usr/local/bin/terraform on these machines)",
    )


def kill_sandboxes(data_dir: Path) -> None:
    """The starter's sandboxes outlive a dead server by design; a test's must
    not outlive the test: kill the process groups their pid files name."""
    for pid_file in (data_dir / "terraform" / "workspaces").glob("*/run/pid"):
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    terraform_present()
    proc = ServerProcess(data_dir=tmp_path / "server", env=TERRAFORM_IN_SERVER).start()
    try:
        yield proc
    finally:
        proc.stop()
        kill_sandboxes(proc.data_dir)
        stop_workspaces(proc)


@pytest.fixture
def owner(server: ServerProcess) -> Iterator[Client]:
    client = Client(server.url)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    yield client
    client.close()


def finished(client: Client, name: str, number: int) -> types.WorkspaceBuild:
    return wait_for_build(client, "owner", name, number, FINISHED, timeout=120)


def deleted(client: Client, name: str, number: int) -> None:
    """Wait for delete build ``number``: the workspace is gone once it succeeds."""
    deadline = time.monotonic() + 120
    while True:
        try:
            build = client.get_build("owner", name, number)
        except ApiError as exc:
            if exc.status == 404:
                return
            raise
        assert build.status not in FINISHED or build.status == "succeeded", build
        assert time.monotonic() < deadline, f"build {number} still {build.status}"
        time.sleep(0.05)


def stored_state(server: ServerProcess, workspace_id: str) -> dict[str, Any]:
    with sqlite3.connect(server.data_dir / "stockade.db") as db:
        (text,) = db.execute(
            "SELECT state FROM workspaces WHERE id = ?", (workspace_id,)
        ).fetchone()
    return dict(json.loads(text))


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_the_starter_makes_a_sandboxed_workspace_that_stops_starts_and_is_deleted(
    server: ServerProcess,
    owner: Client,
    tmp_path: Path,
    cli: Run,  # noqa: F811
) -> None:
    require("bubblewrap", shutil.which("bwrap") is not None, "apt-get install bubblewrap")
    cli("login", server.url, "--username", "owner", "--password", OWNER_PASSWORD)
    starter = tmp_path / "tf-starter"
    cli("templates", "init", str(starter), "--backend", "terraform")
    # The startup script also counts starts in the home, which must persist.
    manifest = starter / "stockade.yaml"
    manifest.write_text(
        manifest.read_text().replace('in $HOME"\n', 'in $HOME"\n    date >> "$HOME/starts"\n')
    )
    cli("templates", "push", "tf-starter", "-d", str(starter))
    (version,) = owner.list_template_versions("tf-starter")
    # The parameter comes from the variable in main.tf.
    assert [p["name"] for p in version.manifest["parameters"]] == ["greeting"]

    created = cli("create", "box", "--template", "tf-starter", "-p", "greeting=good morning")
    assert "good morning from workspace" in created.stdout
    ws = wait_for_agent(owner, "owner", "box")
    assert ws.agent is not None and ws.agent.lifecycle_state == "ready"
    assert "good morning from workspace, in /home/workspace" in agent_lines(owner, "owner", "box")
    lines = build_lines(owner, "owner", "box")
    assert any(line.startswith("running Terraform v1.") for line in lines)
    assert "Apply complete! Resources: 2 added, 0 changed, 0 destroyed." in lines
    stages = [s.name for s in owner.get_build("owner", "box", 1).stages]
    assert stages == ["Preparing", "Terraform init", "Terraform plan", "Terraform apply"]
    assert {r.address for r in ws.resources} == {
        "terraform_data.home",
        "terraform_data.workspace[0]",
    }
    assert ws.resource_metadata["sandbox"] == "bubblewrap"
    # The dashboard shows them too.
    page = httpx.get(
        f"{server.url}/workspaces/owner/box",
        headers={"cookie": f"stockade_session={owner.token}"},
        timeout=10,
    )
    assert page.status_code == 200
    assert "<code>terraform_data.workspace[0]</code>" in page.text
    assert "<code>bubblewrap</code>" in page.text

    # The Terraform state is in the database, sealed.
    state = stored_state(server, ws.id)
    assert state["sealed"].startswith("v1:")
    assert "terraform_data" not in state["sealed"]
    assert state["terraform"]["transition"] == "start"

    workspace_dir = server.data_dir / "terraform" / "workspaces" / ws.id
    pgid = int((workspace_dir / "run" / "pid").read_text())
    assert group_alive(pgid)

    owner.create_build("owner", "box", "stop")
    assert finished(owner, "box", 2).status == "succeeded"
    ws = owner.get_workspace("owner", "box")
    assert ws.status == "stopped"
    assert [r.address for r in ws.resources] == ["terraform_data.home"]
    assert not group_alive(pgid)
    assert (workspace_dir / "home" / "starts").read_text().count("\n") == 1

    owner.create_build("owner", "box", "start")
    assert finished(owner, "box", 3).status == "succeeded"
    wait_for_agent(owner, "owner", "box")
    assert (workspace_dir / "home" / "starts").read_text().count("\n") == 2

    owner.create_build("owner", "box", "delete")
    deleted(owner, "box", 4)
    assert not workspace_dir.exists()
    names = [w.name for w in owner.list_workspaces().workspaces]
    assert "box" not in names


def test_a_docker_container_made_through_the_docker_cli_runs_the_agent(
    server: ServerProcess, owner: Client, base_image: str
) -> None:
    require("the docker CLI", shutil.which("docker") is not None, "apt-get install docker.io")
    owner.push_template("tf-docker", build_archive(TEMPLATES / "docker"))
    ws = owner.create_workspace("dock", "tf-docker", {"motto": "ahoy", "image": base_image})
    assert finished(owner, "dock", 1).status == "succeeded"
    ws = wait_for_agent(owner, "owner", "dock")
    assert ws.agent is not None and ws.agent.lifecycle_state == "ready"
    assert any("says ahoy" in line for line in agent_lines(owner, "owner", "dock"))
    container = f"stockade-tf-{ws.id}"
    volume = f"stockade-tf-home-{ws.id}"
    assert docker("inspect", "-f", "{{.State.Running}}", container) == "true"
    # The token never is in the container's configuration.
    config = docker("inspect", container)
    assert "STOCKADE_AGENT_TOKEN" not in config
    assert ws.resource_metadata == {"volume": volume, "image": base_image}
    # The app from the template's stockade_apps output is the workspace's.
    apps = owner.request("GET", "/api/v2/workspaces/owner/dock/apps").json()["apps"]
    assert [app["slug"] for app in apps] == ["files"]

    owner.create_build("owner", "dock", "stop")
    assert finished(owner, "dock", 2).status == "succeeded"
    assert docker("ps", "-aq", "--filter", f"name={container}") == ""
    assert docker("volume", "ls", "-q", "--filter", f"name={volume}") == volume

    owner.create_build("owner", "dock", "start")
    assert finished(owner, "dock", 3).status == "succeeded"
    wait_for_agent(owner, "owner", "dock")
    starts = docker(
        "run", "--rm", "-v", f"{volume}:/h", "--entrypoint", "cat", base_image, "/h/starts"
    )
    assert starts.count("\n") == 1  # two lines; the output is stripped

    owner.create_build("owner", "dock", "delete")
    deleted(owner, "dock", 4)
    assert docker("ps", "-aq", "--filter", f"name={container}") == ""
    assert docker("volume", "ls", "-q", "--filter", f"name={volume}") == ""


def docker(*args: str) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=120, check=True
    )
    return done.stdout.strip()


FAILING = """\
variable "marker" { type = string }
variable "fail" {
  type    = bool
  default = true
}
resource "terraform_data" "first" {
  input = var.marker
  provisioner "local-exec" {
    command = "echo made > ${self.input}"
  }
  provisioner "local-exec" {
    when    = destroy
    command = "echo destroyed > ${self.input}"
  }
}
resource "terraform_data" "second" {
  depends_on = [terraform_data.first]
  triggers_replace = [var.fail]
  provisioner "local-exec" {
    command = var.fail ? "echo 'disk quota exceeded' >&2; exit 3" : "true"
  }
}
"""


def push_tf(client: Client, tmp_path: Path, name: str, main_tf: str) -> None:
    directory = tmp_path / name
    directory.mkdir()
    (directory / "stockade.yaml").write_text(f"name: {name}\nbackend: terraform\n")
    (directory / "main.tf").write_text(main_tf)
    client.push_template(name, build_archive(directory))


def test_a_failed_apply_names_the_resource_and_keeps_what_it_made(
    server: ServerProcess, owner: Client, tmp_path: Path
) -> None:
    marker = tmp_path / "marker"
    push_tf(owner, tmp_path, "tf-fail", FAILING)
    owner.create_workspace("half", "tf-fail", {"marker": str(marker)})
    build = finished(owner, "half", 1)
    assert build.status == "failed"
    assert build.reason == "apply_failed"
    assert build.error is not None
    assert "terraform_data.second" in build.error
    assert "disk quota exceeded" in build.error
    assert marker.read_text() == "made\n"
    # What the failed apply made is in the stored state...
    ws = owner.get_workspace("owner", "half")
    assert {r.address: r.tainted for r in ws.resources} == {
        "terraform_data.first": False,
        "terraform_data.second": True,
    }
    # ... so a delete destroys it.
    owner.create_build("owner", "half", "delete")
    deleted(owner, "half", 2)
    assert marker.read_text() == "destroyed\n"


SLOW = """\
variable "marker" { type = string }
resource "terraform_data" "first" {
  input = var.marker
  provisioner "local-exec" {
    command = "echo made > ${self.input}"
  }
}
resource "terraform_data" "slow" {
  depends_on = [terraform_data.first]
  provisioner "local-exec" {
    command = "sleep 120"
  }
}
"""


def start_slow_apply(client: Client, tmp_path: Path) -> None:
    """Create a workspace whose start build is held in its apply (a 120 s
    local-exec), once its first resource is made."""
    marker = tmp_path / "marker"
    push_tf(client, tmp_path, "tf-slow", SLOW)
    client.create_workspace("slow", "tf-slow", {"marker": str(marker)})
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert time.monotonic() < deadline, "the first resource was never made"
        time.sleep(0.1)


def test_a_canceled_apply_is_interrupted_and_its_partial_state_kept(
    server: ServerProcess, owner: Client, tmp_path: Path
) -> None:
    start_slow_apply(owner, tmp_path)
    started = time.monotonic()
    owner.cancel_build("owner", "slow", 1)
    build = finished(owner, "slow", 1)
    assert build.status == "canceled"
    # Terraform stops on SIGINT without waiting for the sleep to end.
    assert time.monotonic() - started < 60
    ws = owner.get_workspace("owner", "slow")
    assert "terraform_data.first" in {r.address for r in ws.resources}


NEEDS_NULL = """\
terraform {
  required_providers {
    null = { source = "hashicorp/null", version = "2.1.2" }
  }
}
resource "null_resource" "here" {}
"""
NEEDS_RANDOM = """\
terraform {
  required_providers {
    random = { source = "hashicorp/random", version = "~> 3.6" }
  }
}
resource "random_id" "here" { byte_length = 4 }
"""


def test_providers_come_from_the_mirror_and_a_missing_one_is_named(tmp_path: Path) -> None:
    """The server's CLI configuration is honoured: a provider in the mirror
    (the real hashicorp/null, laid out as Terraform expects) installs, one
    that is not fails at init with a message naming it and saying what to do."""
    terraform_present()
    mirror = make_mirror(tmp_path / "mirror", "packed")
    env = {**TERRAFORM_IN_SERVER, "STOCKADE_TERRAFORM_MIRROR_DIR": str(mirror)}
    server = ServerProcess(data_dir=tmp_path / "server", env=env).start()
    try:
        with Client(server.url) as client:
            client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
            client.login("owner", OWNER_PASSWORD)
            push_tf(client, tmp_path, "tf-null", NEEDS_NULL)
            push_tf(client, tmp_path, "tf-random", NEEDS_RANDOM)
            client.create_workspace("n", "tf-null")
            client.create_workspace("r", "tf-random")
            assert finished(client, "n", 1).status == "succeeded"
            lines = build_lines(client, "owner", "n")
            assert "- Installing hashicorp/null v2.1.2..." in lines
            assert [r.address for r in client.get_workspace("owner", "n").resources] == [
                "null_resource.here"
            ]
            build = finished(client, "r", 1)
            assert (build.status, build.reason) == ("failed", "provider_missing")
            assert build.error is not None
            assert 'hashicorp/random version "~> 3.6" is not in the provider mirror' in build.error
            assert f"{mirror}" in build.error
            assert "stockade terraform mirror import DIR" in build.error
            # The health API says which CLI builds run.
            cli = client.health().provisioners["terraform_cli"]
            assert cli.startswith("Terraform v1.") and cli.endswith(
                f"({shutil.which('terraform')})"
            )
    finally:
        server.stop()
        stop_workspaces(server)


def test_a_missing_cli_fails_the_build_with_what_to_set(tmp_path: Path) -> None:
    env = {**TERRAFORM_IN_SERVER, "STOCKADE_TERRAFORM_BINARY": str(tmp_path / "no-such-terraform")}
    server = ServerProcess(data_dir=tmp_path / "server", env=env).start()
    try:
        with Client(server.url) as client:
            client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
            client.login("owner", OWNER_PASSWORD)
            push_tf(client, tmp_path, "tf-none", 'resource "terraform_data" "x" {}\n')
            client.create_workspace("x", "tf-none")
            build = finished(client, "x", 1)
            assert (build.status, build.reason) == ("failed", "terraform_missing")
            assert build.error is not None and "--terraform-binary" in build.error
            health = client.health()
            assert health.provisioners["terraform_cli"].startswith("unusable: the Terraform CLI")
    finally:
        server.stop()


def test_a_provisioner_daemon_runs_terraform_builds_with_its_own_mirror(tmp_path: Path) -> None:
    """`stockade provisionerd start --backend terraform --terraform-mirror-dir`
    on another "host": the state goes to the server and comes back for the
    next build (a stop finds what the start made)."""
    terraform_present()
    mirror = make_mirror(tmp_path / "daemon-mirror", "unpacked")
    server = ServerProcess(
        data_dir=tmp_path / "server", env={**RELAXED_LIMITS, "STOCKADE_PROVISIONER_WORKERS": "0"}
    ).start()
    daemon: subprocess.Popen[bytes] | None = None
    log = tmp_path / "daemon.log"
    try:
        with Client(server.url) as client:
            client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
            client.login("owner", OWNER_PASSWORD)
            key = client.create_provisioner_key("tf-host").key
            env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
            env["STOCKADE_PROVISIONER_KEY"] = key
            with log.open("ab") as out:
                daemon = subprocess.Popen(
                    [sys.executable, "-m", "stockade", "provisionerd", "start",
                     "--url", server.url, "--data-dir", str(tmp_path / "daemon"),
                     "--name", "tf-host", "--backend", "terraform",
                     "--terraform-mirror-dir", str(mirror)],
                    stdout=out, stderr=subprocess.STDOUT, env=env,
                )  # fmt: skip
            push_tf(client, tmp_path, "tf-null", NEEDS_NULL.replace("{}", COUNTED))
            ws = client.create_workspace("d", "tf-null")
            build = finished(client, "d", 1)
            assert build.status == "succeeded", log.read_text()
            assert build.worker_name == "tf-host"
            assert {r.address for r in client.get_workspace("owner", "d").resources} == {
                "null_resource.here",
                "null_resource.running[0]",
            }
            assert stored_state(server, ws.id)["sealed"].startswith("v1:")
            client.create_build("owner", "d", "stop")
            assert finished(client, "d", 2).status == "succeeded"
            stopped = client.get_workspace("owner", "d")
            assert [r.address for r in stopped.resources] == ["null_resource.here"]
            client.create_build("owner", "d", "delete")
            deleted(client, "d", 3)
    finally:
        if daemon is not None:
            daemon.send_signal(signal.SIGTERM)
            daemon.wait(30)
        server.stop()


COUNTED = """{}
variable "stockade_start_count" { type = number }
resource "null_resource" "running" {
  count = var.stockade_start_count
}"""


def test_a_server_stopping_mid_apply_stops_and_keeps_the_partial_state(
    server: ServerProcess, owner: Client, tmp_path: Path
) -> None:
    """SIGTERM to the server during an apply: Terraform is interrupted, the
    server exits in time (not hung on its worker), and what the apply made is
    in the stored state when the server comes back."""
    start_slow_apply(owner, tmp_path)
    started = time.monotonic()
    code = server.stop(timeout=45)
    assert time.monotonic() - started < 40, server.logs()[-3000:]
    assert code in (0, -signal.SIGTERM), server.logs()[-3000:]
    server.start()
    build = owner.get_build("owner", "slow", 1)
    assert (build.status, build.reason) == ("failed", "interrupted")
    ws = owner.get_workspace("owner", "slow")
    assert "terraform_data.first" in {r.address for r in ws.resources}


LEAKY = """\
variable "stockade_agent_token" {
  type      = string
  sensitive = true
}
resource "terraform_data" "x" {
  provisioner "local-exec" {
    command = "echo 'token ${var.stockade_agent_token}' >&2; exit 1"
  }
}
"""


def test_the_agent_token_never_reaches_the_build_log_or_error(
    server: ServerProcess, owner: Client, tmp_path: Path
) -> None:
    """Terraform prints a failed local-exec command with its sensitive
    values; the backend masks the token in every line and in the error. A
    state file the template's author left in the template is not used."""
    directory = tmp_path / "tf-leaky"
    directory.mkdir()
    (directory / "stockade.yaml").write_text("name: tf-leaky\nbackend: terraform\n")
    (directory / "main.tf").write_text(LEAKY)
    (directory / "terraform.tfstate").write_text('{"version": 4, "lineage": "authors-own"}')
    owner.push_template("tf-leaky", build_archive(directory))
    owner.create_workspace("leaky", "tf-leaky")
    build = finished(owner, "leaky", 1)
    assert build.status == "failed"
    assert build.error is not None and "token [agent token]" in build.error
    lines = build_lines(owner, "owner", "leaky")
    assert any("[agent token]" in line for line in lines)
    assert any("ignored the template's own terraform.tfstate" in line for line in lines)
    # The token itself: the agent's key row holds its hash only, so look for
    # any 20+ character word after "token " that is not the mask.
    for text in [build.error, *lines]:
        for found in re.findall(r"token (\S{20,})", text):
            assert found.startswith("[agent"), text


def test_a_state_file_cut_short_is_not_stored(tmp_path: Path) -> None:
    """A CLI killed while writing its state leaves it cut short: the previous
    state is kept (the backup, else the one before the build)."""
    version = tfcli.CliVersion("terraform", "1.11.4", "/usr/local/bin/terraform")
    previous = json.dumps({"version": 4, "lineage": "l", "serial": 3, "resources": []})
    old = {"sealed": {"tfstate": previous}}
    (tmp_path / "terraform.tfstate").write_text('{"version": 4, "lineage": "l", "seri')
    state, warning = _new_state(tmp_path, version, "start", old)
    assert state["sealed"]["tfstate"] == previous
    assert warning is not None and "cut short" in warning
    backup = json.dumps({"version": 4, "lineage": "l", "serial": 4, "resources": []})
    (tmp_path / "terraform.tfstate.backup").write_text(backup)
    state, warning = _new_state(tmp_path, version, "start", old)
    assert (state["sealed"]["tfstate"], state["terraform"]["serial"]) == (backup, 4)
    whole = json.dumps({"version": 4, "lineage": "l", "serial": 5, "resources": []})
    (tmp_path / "terraform.tfstate").write_text(whole)
    state, warning = _new_state(tmp_path, version, "start", old)
    assert (state["sealed"]["tfstate"], warning) == (whole, None)


def test_a_state_that_does_not_decrypt_fails_its_build_and_not_the_queue(
    server: ServerProcess, owner: Client, tmp_path: Path
) -> None:
    """A database restored under another audit key: the build of the
    workspace whose state cannot be read fails saying why, and the builds
    queued behind it still run."""
    push_tf(owner, tmp_path, "tf-plain", 'resource "terraform_data" "x" {}\n')
    ws = owner.create_workspace("sealed", "tf-plain")
    assert finished(owner, "sealed", 1).status == "succeeded"
    owner.create_build("owner", "sealed", "stop")
    assert finished(owner, "sealed", 2).status == "succeeded"
    sealed = stored_state(server, ws.id)["sealed"]
    with sqlite3.connect(server.data_dir / "stockade.db") as db:
        # What another key sealed does not open: here, the sealed bytes reversed.
        broken = {"terraform": {}, "sealed": "v1:" + sealed[3:][::-1]}
        db.execute("UPDATE workspaces SET state = ? WHERE id = ?", (json.dumps(broken), ws.id))
    owner.create_build("owner", "sealed", "start")
    owner.create_workspace("after", "tf-plain")
    build = finished(owner, "sealed", 3)
    assert (build.status, build.reason) == ("failed", "state_unreadable")
    assert build.error is not None and "audit key" in build.error
    assert finished(owner, "after", 1).status == "succeeded"


def test_the_init_script_sets_the_agents_environment_and_ca(make_spec: Any, tmp_path: Path) -> None:
    """What runs before the bootstrap: the control plane's URL, the token
    (quoted: any byte survives) and, with a private CA, the CA written to a
    file the agent is pointed at."""
    ca = "-----BEGIN CERTIFICATE-----\nMIIB'$x\n-----END CERTIFICATE-----\n"
    spec = dataclasses.replace(
        make_spec(backend="terraform"),
        agent_token="to'k en$(x)",
        agent_ca=ca,
        access_url="https://stockade.internal:7443",
    )
    script = agent_init_script(spec)
    assert script.endswith(BOOTSTRAP_SCRIPT)
    prelude = script.removesuffix(BOOTSTRAP_SCRIPT)
    shown = subprocess.run(
        ["sh", "-c", prelude + 'env | grep ^STOCKADE_ | sort; cat "$STOCKADE_AGENT_CA_FILE"'],
        capture_output=True,
        text=True,
        check=True,
        env={"HOME": str(tmp_path), "PATH": os.environ["PATH"]},
    ).stdout
    assert "STOCKADE_ACCESS_URL=https://stockade.internal:7443\n" in shown
    assert "STOCKADE_AGENT_TOKEN=to'k en$(x)\n" in shown
    assert f"STOCKADE_AGENT_CA_FILE={tmp_path}/.stockade-agent-ca.pem\n" in shown
    assert shown.endswith(ca)
