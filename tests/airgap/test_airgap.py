"""stockade airgap keygen|bundle|verify|install, as an admin runs them.

One real bundle is built per module (pip download through this machine's
index for the running CPython, the base image saved from the real Docker
daemon), then checked with the CLI and with openssl + sha256sum, tampered
with in the ways that matter, and installed inside a network namespace that
has nothing but a loopback interface, where the installed server must answer.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from stockade.airgap import load_public_key
from stockade.airgap.manifest import TOP, BundleInfo
from stockade.cli.main import run
from stockade.devtools.ports import free_port
from stockade.sdk.starters import write_starter
from tests.conftest import require
from tests.provisioner.conftest import BASE_IMAGE, docker_available, image_present

STOCKADE = Path(sys.executable).parent / "stockade"


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """The ``stockade`` of this venv, as a user runs it."""
    return subprocess.run(
        [str(STOCKADE), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def cli_here(*args: str) -> subprocess.CompletedProcess[str]:
    """The same CLI in this process, for the quick refusals: a second each saved."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(args))
    return subprocess.CompletedProcess(["stockade", *args], code, out.getvalue(), err.getvalue())


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The failure's message: exit code 1 and a single ``error:`` line, the last
    one (progress lines may come before it)."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("error:")] == lines[-1:], result.stderr
    assert "Traceback" not in result.stderr
    return lines[-1]


def keygen(prefix: Path) -> str:
    result = cli_here("airgap", "keygen", "-o", str(prefix))
    assert result.returncode == 0, result.stderr
    return result.stdout.rsplit("Fingerprint: ", 1)[1].strip()


@dataclass(frozen=True)
class Built:
    path: Path
    key: Path
    public_key: Path
    fingerprint: str
    output: str
    seconds: float

    def info(self) -> BundleInfo:
        with tarfile.open(self.path) as tar:
            handle = tar.extractfile(f"{TOP}/bundle.json")
            assert handle is not None
            return BundleInfo.model_validate_json(handle.read())


MIRROR_FILES = {
    # The layout of `terraform providers mirror` (a packed mirror).
    "registry.terraform.io/hashicorp/null/index.json": b'{"versions":{"3.2.4":{}}}\n',
    "registry.terraform.io/hashicorp/null/3.2.4.json": b'{"archives":{}}\n',
    "registry.terraform.io/hashicorp/null/terraform-provider-null_3.2.4_linux_amd64.zip": (
        b"PK\x05\x06" + b"\0" * 18
    ),
}


def make_provider_mirror(root: Path) -> Path:
    """A small Terraform provider mirror, with a symlink (carried as a file)."""
    for name, data in MIRROR_FILES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "latest.json").symlink_to(root / next(iter(MIRROR_FILES)))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Built]:
    """A bundle of this checkout for the running CPython with the base image."""
    require("Docker", docker_available(), "apt-get install docker.io and start dockerd")
    require(
        f"the base image {BASE_IMAGE}", image_present(BASE_IMAGE), "run scripts/build-base-image.sh"
    )
    work = tmp_path_factory.mktemp("airgap")
    fingerprint = keygen(work / "site-key")
    mirror = make_provider_mirror(work / "mirror")
    started = time.monotonic()
    result = cli("airgap", "bundle", "-o", str(work / "stockade.tar"), "--signing-key",
                 str(work / "site-key"), "--terraform-mirror", str(mirror))  # fmt: skip
    seconds = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    yield Built(work / "stockade.tar", work / "site-key", work / "site-key.pub", fingerprint,
                result.stdout, seconds)  # fmt: skip
    shutil.rmtree(work, ignore_errors=True)  # a quarter of a gigabyte


@pytest.fixture
def copy_of(built: Built, tmp_path: Path) -> Iterator[Path]:
    """A copy of the bundle to tamper with (removed after the test: it is large)."""
    path = tmp_path / "copy.tar"
    shutil.copyfile(built.path, path)
    yield path
    path.unlink(missing_ok=True)


def docker_image_id(reference: str) -> str:
    inspect = ["docker", "image", "inspect", "-f", "{{.Id}}", reference]
    return subprocess.run(inspect, capture_output=True, text=True, check=True).stdout.strip()


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


# --- keygen ------------------------------------------------------------------


def test_keygen_writes_a_private_key_for_us_alone_and_a_public_key_openssl_reads(
    tmp_path: Path,
) -> None:
    fingerprint = keygen(tmp_path / "k")
    private, public = tmp_path / "k", tmp_path / "k.pub"
    assert private.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert public.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    # The fingerprint is the sha256 of the raw key: the last 32 bytes of the DER
    # SubjectPublicKeyInfo, as OpenSSL reads the file.
    der = subprocess.run(["openssl", "pkey", "-pubin", "-in", str(public), "-outform", "DER"],
                         capture_output=True, check=True).stdout  # fmt: skip
    assert hashlib.sha256(der[-32:]).hexdigest() == fingerprint
    raw = load_public_key(public).public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert hashlib.sha256(raw).hexdigest() == fingerprint
    # ...and the public key is the private key's.
    derived = subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout"],
                             capture_output=True, check=True).stdout  # fmt: skip
    assert derived == public.read_bytes()


def test_keygen_never_overwrites_a_key(tmp_path: Path) -> None:
    keygen(tmp_path / "k")
    before = ((tmp_path / "k").read_bytes(), (tmp_path / "k.pub").read_bytes())
    message = one_line_error(cli_here("airgap", "keygen", "-o", str(tmp_path / "k")))
    assert f"{tmp_path / 'k'} already exists" in message
    assert ((tmp_path / "k").read_bytes(), (tmp_path / "k.pub").read_bytes()) == before
    # Only the public half there: still refused, and no private key appears.
    (tmp_path / "other.pub").write_text("something\n")
    message = one_line_error(cli_here("airgap", "keygen", "-o", str(tmp_path / "other")))
    assert "other.pub already exists" in message
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub", "other.pub"]
    message = one_line_error(cli_here("airgap", "keygen", "-o", str(tmp_path / "no" / "k")))
    assert "is not a directory: create it first" in message
    message = one_line_error(cli_here("airgap", "keygen", "-o", str(tmp_path)))
    assert "is a directory: give a file name" in message


# --- bundle ------------------------------------------------------------------


def test_the_bundle_holds_what_an_offline_site_needs(built: Built, tmp_path: Path) -> None:
    names = [m.name for m in members(built.path)]
    # The signed list and its signature first, so a verifier streaming the tar
    # checks the signature before anything else.
    assert names[:2] == [f"{TOP}/SHA256SUMS", f"{TOP}/SHA256SUMS.sig"]
    assert all(name.startswith(f"{TOP}/") for name in names)
    assert all(m.isfile() for m in members(built.path))
    info = built.info()
    assert info.stockade_version == "0.1.0"
    assert info.python_versions == [f"{sys.version_info.major}.{sys.version_info.minor}"]
    assert info.signer_fingerprint == built.fingerprint
    wheels = {n.removeprefix(f"{TOP}/wheels/") for n in names if n.startswith(f"{TOP}/wheels/")}
    assert info.stockade_wheel in wheels
    for dependency in ("fastapi-", "cryptography-", "uvicorn-", "asyncssh-", "pydantic_core-"):
        assert any(w.startswith(dependency) for w in wheels), dependency
    agent = [n for n in names if n.startswith(f"{TOP}/agent-wheels/")]
    for minor in (11, 12, 13, 14):
        assert any("/cffi-" in n and f"-cp3{minor}-" in n for n in agent), minor
        assert any("/websockets-" in n and f"-cp3{minor}-" in n for n in agent), minor
    assert info.agent_python_versions == ["3.11", "3.12", "3.13", "3.14"]
    # The image as Docker has it, under its tag.
    assert [image.name for image in info.images] == [BASE_IMAGE]
    assert info.images[0].id == docker_image_id(BASE_IMAGE)
    assert f"{TOP}/{info.images[0].file}" in names
    # The starters `stockade templates init` writes, byte for byte.
    with tarfile.open(built.path) as tar:
        for backend in ("local", "docker"):
            write_starter(tmp_path / backend, backend)
            for name in ("stockade.yaml", "README.md"):
                handle = tar.extractfile(f"{TOP}/templates/{backend}/{name}")
                assert handle is not None
                assert handle.read() == (tmp_path / backend / name).read_bytes()
    with tarfile.open(built.path) as tar:
        handle = tar.extractfile(f"{TOP}/README.txt")
        assert handle is not None
        readme = handle.read().decode()
    assert built.fingerprint in readme
    assert "-rawin \\\n        -in SHA256SUMS -sigfile SHA256SUMS.sig\n" in readme
    assert "BUNDLE.tar \\\n        --public-key" in readme
    assert info.terraform_mirror
    prefix = f"{TOP}/terraform-mirror/"
    mirror = {n.removeprefix(prefix) for n in names if n.startswith(prefix)}
    assert mirror == {*MIRROR_FILES, "latest.json"}
    assert "signed by the key with fingerprint " + built.fingerprint in built.output
    # Nothing left behind next to the bundle (scratch directory, partial tar).
    assert sorted(p.name for p in built.path.parent.iterdir()) == [
        "mirror", "site-key", "site-key.pub", "stockade.tar",
    ]  # fmt: skip


def test_a_dependency_without_a_wheel_fails_the_bundle_clearly(
    built: Built, tmp_path: Path
) -> None:
    # No pinned cryptography has a manylinux1 (glibc 2.5) wheel.
    with tarfile.open(built.path) as tar:
        name = f"{TOP}/wheels/{built.info().stockade_wheel}"
        handle = tar.extractfile(name)
        assert handle is not None
        wheel = tmp_path / built.info().stockade_wheel
        wheel.write_bytes(handle.read())
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.tar").write_text("the previous bundle\n")
    result = cli("airgap", "bundle", "-o", str(out / "b.tar"), "--signing-key", str(built.key),
                 "--stockade-wheel", str(wheel), "--platform", "manylinux1_x86_64",
                 "--no-images")  # fmt: skip
    message = one_line_error(result)
    assert "no complete set of wheels for CPython" in message
    assert "manylinux1_x86_64" in message
    assert "No matching distribution found for" in message
    assert "--platform" in message
    # The old bundle is intact and no scratch or partial file is left.
    assert [p.name for p in out.iterdir()] == ["b.tar"]
    assert (out / "b.tar").read_text() == "the previous bundle\n"


def test_bundle_refuses_bad_inputs_before_downloading_anything(tmp_path: Path) -> None:
    keygen(tmp_path / "k")
    out = str(tmp_path / "b.tar")
    cases = [
        (["--signing-key", str(tmp_path / "nope")], "no such signing key file"),
        (["--signing-key", str(tmp_path / "k.pub")], "is a public key"),
        (["--signing-key", str(tmp_path / "k"), "--python", "three"], "--python 'three'"),
        (["--signing-key", str(tmp_path / "k"), "--terraform-mirror", str(tmp_path / "x")],
         "not a directory"),
        (["--signing-key", str(tmp_path / "k"), "--stockade-wheel", str(tmp_path / "x.whl")],
         "no such file"),
    ]  # fmt: skip
    if docker_available():
        cases.append(
            (
                ["--signing-key", str(tmp_path / "k"), "--image", "stockade-no-such:image"],
                "image stockade-no-such:image is not in the local Docker daemon",
            )
        )
    for args, expected in cases:
        started = time.monotonic()
        message = one_line_error(cli_here("airgap", "bundle", "-o", out, *args))
        assert expected in message, (args, message)
        assert time.monotonic() - started < 15, args  # no download was started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k", "k.pub"]
    usage = cli_here(
        "airgap", "bundle", "-o", out, "--signing-key", "k", "--no-images", "--image", "x"
    )
    assert usage.returncode == 2, usage.stderr


# --- verify ------------------------------------------------------------------


def test_verify_accepts_the_bundle_with_its_public_key_or_fingerprint(built: Built) -> None:
    result = cli("airgap", "verify", str(built.path), "--public-key", str(built.public_key))
    assert result.returncode == 0, result.stderr
    assert f"signed by the key with fingerprint {built.fingerprint}" in result.stdout
    count = len(members(built.path))
    assert f"its {count} files" in result.stdout
    pinned = cli("airgap", "verify", str(built.path), "--fingerprint", built.fingerprint.upper())
    assert pinned.returncode == 0, pinned.stderr


def test_openssl_and_sha256sum_verify_the_bundle_without_stockade(
    built: Built, tmp_path: Path
) -> None:
    subprocess.run(["tar", "-xf", str(built.path), "-C", str(tmp_path)], check=True)
    top = tmp_path / TOP
    try:
        openssl = subprocess.run(
            ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(built.public_key), "-rawin",
             "-in", "SHA256SUMS", "-sigfile", "SHA256SUMS.sig"],
            cwd=top, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert openssl.returncode == 0, openssl.stdout + openssl.stderr
        assert "Signature Verified Successfully" in openssl.stdout
        sums = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=top,
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert sums.returncode == 0, sums.stdout + sums.stderr
        listed = {line.split("  ", 1)[1] for line in (top / "SHA256SUMS").read_text().splitlines()}
        present = {p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file()}
        assert present - listed == {"SHA256SUMS", "SHA256SUMS.sig"}
        assert listed <= present
        # The same command refuses SHA256SUMS once changed: it checks something.
        with (top / "SHA256SUMS").open("a") as handle:
            handle.write("0" * 64 + "  wheels/extra.whl\n")
        changed = subprocess.run(
            ["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(built.public_key), "-rawin",
             "-in", "SHA256SUMS", "-sigfile", "SHA256SUMS.sig"],
            cwd=top, capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert changed.returncode != 0
    finally:
        shutil.rmtree(top)


def test_a_flipped_byte_in_a_wheel_is_named(built: Built, copy_of: Path) -> None:
    name = f"{TOP}/wheels/{built.info().stockade_wheel}"
    member = next(m for m in members(copy_of) if m.name == name)
    with copy_of.open("r+b") as handle:
        handle.seek(member.offset_data + member.size // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x01]))
    message = one_line_error(cli("airgap", "verify", str(copy_of), "-k", str(built.public_key)))
    assert message == (
        f"error: {name}: sha256 mismatch (the bundle was changed after it was signed)"
    )


def test_a_bundle_signed_by_another_key_is_refused(built: Built, tmp_path: Path) -> None:
    other = keygen(tmp_path / "other")
    message = one_line_error(
        cli_here("airgap", "verify", str(built.path), "--public-key", str(tmp_path / "other.pub"))
    )
    assert f"{TOP}/SHA256SUMS.sig: the signature does not verify" in message
    assert other in message
    message = one_line_error(cli_here("airgap", "verify", str(built.path), "--fingerprint", other))
    assert f"fingerprint {built.fingerprint}, not the expected {other}" in message
    # A private key where the public one belongs, and no key at all.
    message = one_line_error(cli_here("airgap", "verify", str(built.path), "-k", str(built.key)))
    assert "is a private key" in message
    assert cli_here("airgap", "verify", str(built.path)).returncode == 2


def test_an_added_file_is_named(built: Built, copy_of: Path) -> None:
    payload = b"print('hello from outside')\n"
    with tarfile.open(copy_of, "a") as tar:
        info = tarfile.TarInfo(f"{TOP}/wheels/helper-1.0-py3-none-any.whl")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    message = one_line_error(
        cli_here("airgap", "verify", str(copy_of), "-k", str(built.public_key))
    )
    assert message == (
        f"error: {TOP}/wheels/helper-1.0-py3-none-any.whl: not listed in SHA256SUMS "
        "(added after signing)"
    )


def test_a_removed_file_is_named(built: Built, tmp_path: Path) -> None:
    gone = f"{TOP}/templates/docker/stockade.yaml"
    path = tmp_path / "removed.tar"
    try:
        with tarfile.open(built.path) as source, tarfile.open(path, "w") as target:
            for member in source:
                if member.name != gone:
                    target.addfile(member, source.extractfile(member))
        message = one_line_error(
            cli_here("airgap", "verify", str(path), "-k", str(built.public_key))
        )
        assert message == (
            f"error: {gone}: listed in SHA256SUMS but missing from the archive "
            "(removed after signing)"
        )
    finally:
        path.unlink(missing_ok=True)


def test_a_path_escaping_the_bundle_is_refused_and_never_written(
    built: Built, copy_of: Path, tmp_path: Path
) -> None:
    with tarfile.open(copy_of, "a") as tar:
        info = tarfile.TarInfo(f"{TOP}/../x")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"x\n"))
    message = one_line_error(cli("airgap", "verify", str(copy_of), "-k", str(built.public_key)))
    assert message.startswith(f"error: '{TOP}/../x': refused, a '..' component")
    # install verifies while it extracts: it stops there, writes nothing
    # outside its prefix, and leaves no half install.
    site = tmp_path / "site"
    message = one_line_error(cli("airgap", "install", str(copy_of), "-k", str(built.public_key),
                                 "--prefix", str(site), "--no-images"))  # fmt: skip
    assert "'..' component" in message
    assert not site.exists()
    assert not (tmp_path / "x").exists()


def _tar(path: Path, *entries: tarfile.TarInfo) -> Path:
    with tarfile.open(path, "w") as tar:
        for entry in entries:
            data = io.BytesIO(b"x" * entry.size) if entry.isfile() else None
            tar.addfile(entry, data)
    return path


def _entry(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    info.size = 1 if kind == tarfile.REGTYPE else 0
    return info


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        ([_entry("/etc/cron.d/x")], "'/etc/cron.d/x': refused, an absolute path"),
        ([_entry("elsewhere/x")], "elsewhere/x: outside the bundle's top directory"),
        ([_entry(f"{TOP}/wheels/a/../../../x")], "a '..' component"),
        ([_entry(f"{TOP}/wheels/x.whl", tarfile.SYMTYPE, "/etc/passwd")],
         f"{TOP}/wheels/x.whl: a symbolic link; a bundle holds only regular files"),
        ([_entry(f"{TOP}/a"), _entry(f"{TOP}/b", tarfile.LNKTYPE, f"{TOP}/a")],
         f"{TOP}/b: a hard link"),
        ([_entry(f"{TOP}/dev", tarfile.CHRTYPE)], f"{TOP}/dev: a device file"),
        ([_entry(f"{TOP}/a"), _entry(f"{TOP}/a")], f"{TOP}/a: appears twice in the archive"),
        ([_entry(f"{TOP}/a")], f"no {TOP}/SHA256SUMS in it: not a Stockade bundle"),
    ],
)  # fmt: skip
def test_verify_refuses_what_a_bundle_never_holds(
    tmp_path: Path, entries: list[tarfile.TarInfo], expected: str
) -> None:
    keygen(tmp_path / "k")
    path = _tar(tmp_path / "bad.tar", *entries)
    message = one_line_error(cli_here("airgap", "verify", str(path), "-k", str(tmp_path / "k.pub")))
    assert expected in message


def test_verify_refuses_what_is_not_a_tar(tmp_path: Path) -> None:
    keygen(tmp_path / "k")
    (tmp_path / "b.tar.gz").write_bytes(b"\x1f\x8b" + b"\0" * 1000)
    message = one_line_error(cli_here("airgap", "verify", str(tmp_path / "b.tar.gz"), "-k",
                                 str(tmp_path / "k.pub")))  # fmt: skip
    assert "not a readable tar archive" in message
    message = one_line_error(cli_here("airgap", "verify", str(tmp_path / "none.tar"), "-k",
                                 str(tmp_path / "k.pub")))  # fmt: skip
    assert "none.tar: no such file" in message


# --- install -----------------------------------------------------------------


def test_install_refuses_a_used_prefix_and_an_unreachable_docker(
    built: Built, tmp_path: Path
) -> None:
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep").write_text("mine\n")
    message = one_line_error(cli("airgap", "install", str(built.path), "-k", str(built.public_key),
                                 "--prefix", str(used)))  # fmt: skip
    assert "is not empty: install into a new (or empty) directory" in message
    assert [p.name for p in used.iterdir()] == ["keep"]
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path / 'no-docker.sock'}"}
    message = one_line_error(cli("airgap", "install", str(built.path), "-k", str(built.public_key),
                                 "--prefix", str(tmp_path / "new"), env=env))  # fmt: skip
    assert "Docker is not reachable" in message and "--no-images" in message
    assert not (tmp_path / "new").exists()
    # A failure after the bundle was extracted leaves the prefix as it was found.
    empty = tmp_path / "empty"
    empty.mkdir()
    for prefix in (empty, tmp_path / "new"):
        message = one_line_error(cli("airgap", "install", str(built.path), "-k",
                                     str(built.public_key), "--prefix", str(prefix),
                                     "--no-images", "--python", "/bin/false"))  # fmt: skip
        assert message == "error: --python /bin/false: not a CPython 3 interpreter (exit 1)"
    assert list(empty.iterdir()) == []
    assert not (tmp_path / "new").exists()


def _netns_available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.fixture
def namespace() -> Iterator[str]:
    """A network namespace with only a loopback interface: no route anywhere."""
    require("ip netns (iproute2, as root)", _netns_available(), "apt-get install iproute2; root")
    name = f"stk-airgap-{secrets.token_hex(4)}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _in(namespace: str, *command: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", namespace, *command], capture_output=True,
                          text=True, timeout=timeout, check=False)  # fmt: skip


PROBE = """
import json, sys, time, urllib.request
deadline = time.monotonic() + 60
while True:
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=2) as response:
            print(response.read().decode())
            break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.1)
"""

WHAT_IS_INSTALLED = """
import importlib.metadata as m, json, stockade
dist = m.distribution("stockade")
print(json.dumps({
    "file": stockade.__file__,
    "direct_url": dist.read_text("direct_url.json"),
    "installed": sorted((d.metadata["Name"], d.version) for d in m.distributions()),
}))
"""


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_")


def test_install_and_serve_in_a_namespace_with_no_route(
    built: Built, namespace: str, tmp_path: Path
) -> None:
    links = _in(namespace, "ip", "-o", "link").stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]
    assert _in(namespace, "ip", "route", "show").stdout.strip() == ""
    site = tmp_path / "site"
    server: subprocess.Popen[bytes] | None = None
    try:
        started = time.monotonic()
        # The connected machine's CLI, as the admin carries it; images go to the
        # host's dockerd through its unix socket (the same image, same tag).
        result = _in(namespace, str(STOCKADE), "airgap", "install", str(built.path),
                     "--public-key", str(built.public_key), "--prefix", str(site))  # fmt: skip
        install_seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        print(f"install in the namespace: {install_seconds:.1f} s")
        assert f"Installed Stockade 0.1.0 into {site / 'venv'}" in result.stdout
        assert f"loaded image {BASE_IMAGE}" in result.stdout
        assert f"templates push docker -d {site / 'templates' / 'docker'}" in result.stdout
        # The carried providers are imported (checked) by a step of their own.
        assert f"terraform mirror import {site / 'terraform-mirror'} --mirror-dir" in result.stdout
        info = built.info()

        # The venv's Stockade is the bundle's wheel, not this checkout.
        python = str(site / "venv" / "bin" / "python")
        state = json.loads(_in(namespace, python, "-c", WHAT_IS_INSTALLED).stdout)
        assert state["file"] == str(site / "venv/lib" / f"python{info.python_versions[0]}"
                                    / "site-packages/stockade/__init__.py")  # fmt: skip
        assert state["direct_url"] is None  # not editable, not from a URL: from the wheelhouse
        wheel_path = site / "bundle" / "wheels" / info.stockade_wheel
        package = Path(state["file"]).parent
        with zipfile.ZipFile(wheel_path) as wheel:
            sources = [
                n for n in wheel.namelist() if n.startswith("stockade/") and n.endswith(".py")
            ]
            assert len(sources) > 50
            for name in sources:
                assert wheel.read(name) == (package.parent / name).read_bytes(), name
        # The venv holds exactly the bundle's wheels (and what venv itself puts there).
        wheels = {(_canonical(w.name.split("-")[0]), w.name.split("-")[1])
                  for w in (site / "bundle" / "wheels").glob("*.whl")}  # fmt: skip
        installed = {(_canonical(n), v) for n, v in state["installed"]}
        assert {(n, v) for n, v in installed if n not in ("pip", "setuptools")} == wheels
        agent_wheels = sorted(p.name for p in (site / "venv" / "agent-wheels").iterdir())
        assert len([w for w in agent_wheels if w.startswith("cffi-")]) == 4
        assert (site / "templates" / "docker" / "stockade.yaml").is_file()
        for name, data in MIRROR_FILES.items():
            assert (site / "terraform-mirror" / name).read_bytes() == data
        assert not (site / "terraform-mirror" / "latest.json").is_symlink()
        assert docker_image_id(BASE_IMAGE) == info.images[0].id

        # The installed server starts and answers, inside the namespace.
        port = free_port()  # free on the host too: see below
        env = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
        log = (tmp_path / "server.log").open("wb")
        server = subprocess.Popen(
            ["ip", "netns", "exec", namespace, str(site / "venv" / "bin" / "stockade"), "server",
             "--address", f"127.0.0.1:{port}", "--data-dir", str(tmp_path / "data")],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        log.close()
        url = f"http://127.0.0.1:{port}/api/v2/buildinfo"
        probe = _in(namespace, python, "-c", PROBE, url, timeout=90)
        logs = (tmp_path / "server.log").read_text(errors="replace")
        assert probe.returncode == 0, probe.stderr + logs
        assert json.loads(probe.stdout)["version"] == info.stockade_version
        assert server.poll() is None, logs
        # The server runs from the bundle's venv (its interpreter's prefix).
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")
        assert str(site / "venv" / "bin" / "stockade").encode() in cmdline
        # ...inside the namespace only: on the host's loopback that port is closed.
        with socket.socket() as sock:
            sock.settimeout(2)
            assert sock.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if server is not None and server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        shutil.rmtree(site, ignore_errors=True)
