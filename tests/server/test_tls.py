"""A control plane serving https with a certificate from a private CA: the
settings refuse what cannot work, workspaces' agents trust the CA the server
installs in them (and fail, saying why, without it), and the CLI and SDK
trust it through ``STOCKADE_CA_FILE`` (the API, ``config-ssh`` and plain
``ssh`` through the ``ssh --stdio`` ProxyCommand).

The certificates are made here with ``cryptography``: a throw-away CA, a
server certificate it signs for 127.0.0.1 and localhost, and an unrelated CA."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import ValidationError

from stockade.agent.agent import CA_FILE_ENV as AGENT_READS
from stockade.devtools.ports import free_port
from stockade.devtools.server import ServerProcess
from stockade.provisioner.backends.base import AGENT_CA_ENV, WorkspaceSpec, agent_environment
from stockade.provisioner.backends.docker import BASE_IMAGE, container_name, volume_name
from stockade.sdk import Client, ConnectionFailed, types
from stockade.sdk.templates import Manifest, build_archive, resolve_compute
from stockade.sdk.tls import CA_FILE_ENV, client_ssl_context
from stockade.sdk.tunnel import StreamSpec, TunnelError, open_stream
from stockade.server.settings import Settings
from tests.conftest import OWNER_PASSWORD, RELAXED_LIMITS, require, stop_workspaces
from tests.provisioner.conftest import base_image, docker_client  # noqa: F401  (fixtures)

SQLITE_ONLY = "TLS and CA delivery do not touch the database"

STOCKADE = str(Path(sys.executable).with_name("stockade"))
TEMPLATE = """\
name: t
backend: {backend}
{compute}
agent:
  startup_script: |
    echo "ca=$STOCKADE_AGENT_CA_FILE"
    cat "$STOCKADE_AGENT_CA_FILE" | head -1
"""


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
    )


def make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    """A throw-away CA (P-256), made with ``cryptography``: (cert, key) files."""
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False,
    )  # fmt: skip
    cert = (
        _certificate(f"Stockade test {name}", key, None)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_server_cert(directory: Path, ca: tuple[Path, Path], ips: list[str]) -> tuple[Path, Path]:
    """A server certificate the CA signs for localhost and ``ips``."""
    key_path, cert_path = directory / "server.key", directory / "server.pem"
    ca_cert = x509.load_pem_x509_certificate(ca[0].read_bytes())
    ca_key = serialization.load_pem_private_key(ca[1].read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        _certificate("stockade test server", key, ca_cert.subject)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca = make_ca(directory, "ca")
    cert, key = make_server_cert(directory, ca, ["127.0.0.1"])
    other, _ = make_ca(directory, "other")
    return Pki(ca=ca[0], cert=cert, key=key, other_ca=other)


def https_server(
    data_dir: Path, pki: Pki, *, agent_ca: Path | None, args: list[str] | None = None
) -> ServerProcess:
    args = ["--tls-cert-file", str(pki.cert), "--tls-key-file", str(pki.key), *(args or [])]
    if agent_ca is not None:
        args += ["--agent-ca-file", str(agent_ca)]
    server = ServerProcess(data_dir=data_dir, env=RELAXED_LIMITS, args=args)
    server.url = f"https://127.0.0.1:{server.port}"
    server.verify = client_ssl_context(pki.ca)
    return server


Started = Callable[..., ServerProcess]


@pytest.fixture
def start_https(tmp_path: Path, pki: Pki) -> Iterator[Started]:
    started: list[ServerProcess] = []

    def start(agent_ca: Path | None) -> ServerProcess:
        server = https_server(tmp_path / f"server{len(started)}", pki, agent_ca=agent_ca)
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()
        stop_workspaces(server)


def owner_client(server: ServerProcess, ca: Path) -> Client:
    client = Client(server.url, ca_file=ca)
    client.create_first_user("owner", "owner@example.com", OWNER_PASSWORD)
    client.login("owner", OWNER_PASSWORD)
    return client


def push_template(client: Client, tmp_path: Path, backend: str = "local") -> None:
    directory = tmp_path / "template"
    directory.mkdir(exist_ok=True)
    compute = f"compute:\n  image: {BASE_IMAGE}" if backend == "docker" else ""
    (directory / "stockade.yaml").write_text(TEMPLATE.format(backend=backend, compute=compute))
    client.push_template("t", build_archive(directory))


def wait_for(
    server: ServerProcess,
    client: Client,
    name: str,
    check: Callable[[types.Workspace], bool],
    what: str,
) -> types.Workspace:
    deadline = time.monotonic() + 60
    while True:
        ws = client.get_workspace("owner", name)
        if check(ws):
            return ws
        assert time.monotonic() < deadline, (
            f"timed out waiting for {what}: {ws}\n{agent_log(server, ws.id)}"
        )
        time.sleep(0.1)


def agent_log(server: ServerProcess, workspace_id: str) -> str:
    path = server.data_dir / "workspaces" / workspace_id / "agent.log"
    return path.read_text(errors="replace") if path.exists() else ""


# --- settings -------------------------------------------------------------------------


def test_settings_refuse_tls_that_cannot_work(pki: Pki, tmp_path: Path) -> None:
    base = {"data_dir": tmp_path}
    on = Settings(tls_cert_file=pki.cert, tls_key_file=pki.key, **base)  # type: ignore[arg-type]
    # TLS: the access URL defaults to https, and session cookies are Secure.
    assert on.tls and on.access_url.startswith("https://") and on.secure_cookies
    assert not Settings(**base).tls  # type: ignore[arg-type]
    # An https access URL without TLS here: a TLS-terminating proxy in front.
    proxied = Settings(access_url="https://stockade.example", **base)  # type: ignore[arg-type]
    assert proxied.secure_cookies and not proxied.tls

    refused = {
        "must be set together": {"tls_cert_file": pki.cert},
        "access_url must be https://": {
            "tls_cert_file": pki.cert,
            "tls_key_file": pki.key,
            "access_url": "http://127.0.0.1:7080",
        },
        "agent_url must be https://": {
            "tls_cert_file": pki.cert,
            "tls_key_file": pki.key,
            "agent_url": "http://172.17.0.1:7080",
        },
        "cannot load the TLS certificate": {"tls_cert_file": pki.cert, "tls_key_file": pki.ca},
        "is not a readable file": {
            "tls_cert_file": tmp_path / "missing.pem",
            "tls_key_file": pki.key,
        },
        "cannot read the CA bundle": {"agent_ca_file": tmp_path / "missing.pem"},
        "redirect_http_address needs TLS": {"redirect_http_address": "127.0.0.1:8080"},
        "redirect_http_address must differ": {
            "tls_cert_file": pki.cert,
            "tls_key_file": pki.key,
            "redirect_http_address": "127.0.0.1:7080",
        },
        "address must be HOST:PORT": {"redirect_http_address": "8080"},
        "is not a PEM CA bundle": {"agent_ca_file": pki.key},
    }
    for message, values in refused.items():
        with pytest.raises(ValidationError, match=message):
            Settings(**base, **values)  # type: ignore[arg-type]
    garbled = tmp_path / "garbled.pem"
    garbled.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    with pytest.raises(ValidationError, match="not a valid PEM CA bundle"):
        Settings(agent_ca_file=garbled, **base)  # type: ignore[arg-type]
    assert Settings(agent_ca_file=pki.ca, **base).agent_ca_pem == pki.ca.read_text()  # type: ignore[arg-type]


def test_the_server_says_why_it_will_not_start(pki: Pki, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    done = subprocess.run(
        [STOCKADE, "server", "--data-dir", str(tmp_path), "--tls-cert-file", str(pki.cert),
         "--tls-key-file", str(pki.key), "--access-url", "http://127.0.0.1:7080"],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode != 0
    assert "access_url must be https://" in done.stderr, done.stderr


# --- a server with a private CA -------------------------------------------------------


def test_plain_http_is_redirected_to_the_access_url_when_asked(pki: Pki, tmp_path: Path) -> None:
    plain_port = free_port()
    server = https_server(
        tmp_path / "server", pki, agent_ca=None,
        args=["--redirect-http-address", f"127.0.0.1:{plain_port}"],
    ).start()  # fmt: skip
    try:
        for method in ("GET", "POST"):
            response = httpx.request(
                method,
                f"http://127.0.0.1:{plain_port}/workspaces/a%20b?x=1&y=2",
                headers={"Host": "evil.example"},  # never a redirect to a host a request names
                timeout=10,
            )
            assert response.status_code == 308, response.text
            assert response.headers["location"] == (
                f"https://127.0.0.1:{server.port}/workspaces/a%20b?x=1&y=2"
            )
        # Followed, it ends on the https server, which the CA vouches for.
        with httpx.Client(verify=client_ssl_context(pki.ca), follow_redirects=True) as client:
            final = client.get(f"http://127.0.0.1:{plain_port}/api/v2/buildinfo")
        assert final.status_code == 200 and str(final.url).startswith("https://")
    finally:
        server.stop()

    # A redirect address that cannot be bound stops the server, saying why.
    taken = https_server(
        tmp_path / "server2", pki, agent_ca=None,
        args=["--redirect-http-address", f"127.0.0.1:{server.port}"],
    )  # fmt: skip
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", server.port))
    blocker.listen()
    try:
        with pytest.raises(RuntimeError, match="redirect_listen_failed"):
            taken.start(timeout=20)
    finally:
        blocker.close()
        taken.stop()


def test_local_workspace_agent_and_cli_trust_the_private_ca(
    start_https: Started, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require("ssh", shutil.which("ssh") is not None, "apt-get install openssh-client")
    server = start_https(pki.ca)
    # Clients verify: without the CA the server is refused, with the wrong
    # one too; plain http to the https port gets nowhere.
    for ca in (None, pki.other_ca):
        with pytest.raises(ConnectionFailed, match="CERTIFICATE_VERIFY_FAILED"):
            Client(server.url, ca_file=ca).health()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=5)
    owner = owner_client(server, pki.ca)
    # Session cookies are Secure on https.
    with httpx.Client(verify=client_ssl_context(pki.ca)) as raw:
        login = raw.post(
            f"{server.url}/api/v2/users/login",
            json={"username": "owner", "password": OWNER_PASSWORD},
        )
    assert login.status_code == 200 and "secure" in login.headers["set-cookie"].lower()

    push_template(owner, tmp_path)
    owner.create_workspace("w", "t")
    ws = wait_for(
        server,
        owner,
        "w",
        lambda w: w.agent is not None and w.agent.lifecycle_state in ("ready", "start_error"),
        "the agent",
    )
    assert ws.agent is not None and ws.agent.lifecycle_state == "ready", agent_log(server, ws.id)
    lines = [line.line for line in owner.agent_logs("owner", "w").logs]
    # The sandbox has the CA at a fixed path, read-only, and the agent is told so.
    assert "ca=/run/stockade/ca.pem" in lines, lines
    assert "-----BEGIN CERTIFICATE-----" in lines, lines
    assert (server.data_dir / "workspaces" / ws.id / "ca.pem").read_text() == pki.ca.read_text()

    # The CLI and the ssh ProxyCommand trust the CA through STOCKADE_CA_FILE.
    config_dir, ssh_config = tmp_path / "cli", tmp_path / "ssh_config"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    env.update(STOCKADE_URL=server.url, STOCKADE_TOKEN=owner.token or "",
               STOCKADE_CONFIG_DIR=str(config_dir), **{CA_FILE_ENV: str(pki.ca)})  # fmt: skip
    listed = subprocess.run([STOCKADE, "list"], env=env, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert listed.returncode == 0 and "w" in listed.stdout, listed.stderr
    configured = subprocess.run(
        [STOCKADE, "config-ssh", "--ssh-config-file", str(ssh_config)],
        env=env, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert configured.returncode == 0, configured.stderr

    def ssh(environment: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes", "stockade.w", *args],
            env=environment, capture_output=True, timeout=60, check=False,
        )  # fmt: skip

    result = ssh(env, "echo hello over tls; exit 3")
    assert result.returncode == 3, result.stderr
    assert result.stdout == b"hello over tls\n"
    # Without the CA the ProxyCommand refuses the server (the known-hosts
    # lookup over the API, then the tunnel), and says why.
    (config_dir / "known_hosts").unlink()
    without = ssh({k: v for k, v in env.items() if k != CA_FILE_ENV}, "true")
    assert without.returncode == 255
    assert b"CERTIFICATE_VERIFY_FAILED" in without.stderr, without.stderr
    # A CA file that is not there is named, not a traceback.
    missing = ssh({**env, CA_FILE_ENV: str(tmp_path / "nope.pem")}, "true")
    assert missing.returncode == 255
    assert b"cannot use the CA bundle" in missing.stderr, missing.stderr

    # The SDK's tunnel client: the system's CAs alone are not enough.
    async def open_without_ca() -> None:
        await open_stream(server.url, owner.token or "", StreamSpec("owner", "w", "ssh"))

    monkeypatch.delenv(CA_FILE_ENV, raising=False)
    with pytest.raises(TunnelError, match="CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(open_without_ca())
    owner.close()


def test_without_the_ca_the_agent_does_not_connect_and_says_why(
    start_https: Started, pki: Pki, tmp_path: Path
) -> None:
    server = start_https(None)
    owner = owner_client(server, pki.ca)
    push_template(owner, tmp_path)
    owner.create_workspace("w", "t")
    ws = wait_for(server, owner, "w", lambda w: w.latest_build.status == "succeeded", "the build")
    deadline = time.monotonic() + 30
    while "CERTIFICATE_VERIFY_FAILED" not in agent_log(server, ws.id):
        assert time.monotonic() < deadline, agent_log(server, ws.id)
        time.sleep(0.2)
    log = agent_log(server, ws.id)
    assert "stockade-bootstrap: control plane unreachable at https://127.0.0.1" in log, log
    ws = owner.get_workspace("owner", "w")
    assert ws.agent is not None and ws.agent.status != "connected"
    assert not (server.data_dir / "workspaces" / ws.id / "ca.pem").exists()
    owner.close()


def test_the_ca_is_part_of_the_workspace_config() -> None:
    """A new CA changes the config hash, so a running workspace is replaced on
    its next start build and its agent gets the new CA."""
    manifest = Manifest.model_validate({"name": "t", "backend": "local"})
    spec = WorkspaceSpec(
        workspace_id="w1", workspace_name="w", owner_id="o1", owner_username="owner",
        deployment_id="d", build_id="b", build_number=1, template_name="t",
        template_version=1, manifest=manifest, parameters={},
        compute=resolve_compute(manifest.compute, {}), files_dir=Path("/nonexistent"),
        access_url="https://127.0.0.1:7080",
    )  # fmt: skip
    one = dataclasses.replace(spec, agent_ca="-----BEGIN CERTIFICATE-----\nA\n")
    two = dataclasses.replace(spec, agent_ca="-----BEGIN CERTIFICATE-----\nB\n")
    assert len({spec.config_hash, one.config_hash, two.config_hash}) == 3
    assert AGENT_CA_ENV == AGENT_READS
    assert AGENT_CA_ENV not in agent_environment(spec)
    assert agent_environment(one, ca_path="/x/ca.pem")[AGENT_CA_ENV] == "/x/ca.pem"
    with pytest.raises(ValueError, match="install"):
        agent_environment(one)


def test_the_system_ca_context_verifies(pki: Pki) -> None:
    context = client_ssl_context(pki.ca)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


def test_a_docker_workspace_agent_trusts_the_ca_on_the_gateway_listener(
    tmp_path: Path,
    docker_client: Any,  # noqa: F811
    base_image: str,  # noqa: F811
) -> None:
    """A loopback access URL: containers reach the server on their network's
    gateway, where it listens too, with the same certificate (made for that
    address, read back from Docker)."""
    network = docker_client.networks.create(
        f"stockade-tls-{os.getpid()}-{time.monotonic_ns() % 10**6}", driver="bridge"
    )
    server: ServerProcess | None = None
    workspace_id = ""
    try:
        network.reload()
        gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
        directory = tmp_path / "pki"
        directory.mkdir()
        ca = make_ca(directory, "ca")
        cert, key = make_server_cert(directory, ca, ["127.0.0.1", gateway])
        pki = Pki(ca=ca[0], cert=cert, key=key, other_ca=ca[0])
        server = https_server(tmp_path / "server", pki, agent_ca=pki.ca)
        server.args += ["--docker-network", network.name, "--provisioner-backends", "docker"]
        server.start()
        owner = owner_client(server, pki.ca)
        push_template(owner, tmp_path, "docker")
        workspace_id = owner.create_workspace("box", "t").id
        ws = wait_for(
            server,
            owner,
            "box",
            lambda w: w.agent is not None and w.agent.lifecycle_state in ("ready", "start_error"),
            "the agent",
        )
        assert ws.agent is not None and ws.agent.lifecycle_state == "ready"
        lines = [line.line for line in owner.agent_logs("owner", "box").logs]
        assert "ca=/etc/stockade/ca.pem" in lines, lines
        assert "-----BEGIN CERTIFICATE-----" in lines, lines
        assert owner.health().provisioners["docker_agent_addresses"] == [gateway]
        # The agent reached the gateway listener over https.
        container = docker_client.containers.get(container_name(workspace_id))
        environment = container.attrs["Config"]["Env"]
        assert f"STOCKADE_ACCESS_URL=https://{gateway}:{server.port}" in environment
        assert f"{AGENT_CA_ENV}=/etc/stockade/ca.pem" in environment
        owner.close()
    finally:
        if server is not None:
            server.stop()
        if workspace_id:
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.containers.get(container_name(workspace_id)).remove(force=True)
            with contextlib.suppress(docker.errors.NotFound):
                docker_client.volumes.get(volume_name(workspace_id)).remove(force=True)
        network.remove()
