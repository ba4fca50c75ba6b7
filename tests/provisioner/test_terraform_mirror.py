"""The offline provider mirror: listing and importing both layouts
Terraform's filesystem_mirror reads, every way an import is refused, and a
real ``terraform init`` + ``apply`` of hashicorp/null from a mirror filled by
``stockade terraform mirror import`` (and a real ``init`` failing for a
provider the mirror lacks)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from stockade.provisioner.terraform.mirror import (
    MirrorError,
    ProviderPackage,
    import_mirror,
    list_providers,
    missing_provider_help,
)
from stockade.sdk.paths import default_terraform_mirror_dir
from stockade.server.settings import Settings
from tests.terraform import (
    NULL_BINARY_NAME,
    NULL_PLATFORM,
    NULL_VERSION,
    make_mirror,
    null_provider_binary,
    terraform_binary,
)

NULL = Path("registry.terraform.io/hashicorp/null")
PACKED_NAME = f"terraform-provider-null_{NULL_VERSION}_{NULL_PLATFORM}.zip"
FAKE_BINARY = b"#!/bin/sh\necho not a real provider\n"


def fake_zip(path: Path, members: dict[str, bytes] | None = None) -> Path:
    """A small zip shaped like a provider release (no real provider in it:
    the checks do not run it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as out:
        for name, data in (members or {NULL_BINARY_NAME: FAKE_BINARY}).items():
            out.writestr(name, data)
    return path


def fake_packed(root: Path) -> Path:
    """A small packed tree as `terraform providers mirror` writes it."""
    fake_zip(root / NULL / PACKED_NAME)
    (root / NULL / "index.json").write_text('{"versions":{"2.1.2":{}}}\n')
    (root / NULL / "2.1.2.json").write_text('{"archives":{}}\n')
    return root


def stockade(
    *args: str, env: dict[str, str] | None = None, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """The ``stockade`` command as a user runs it (as in tests/cli)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")}
    result = subprocess.run(
        [sys.executable, "-m", "stockade", *args],
        capture_output=True, text=True, env={**base, "COLUMNS": "400", **(env or {})},
        stdin=subprocess.DEVNULL, timeout=60,
    )  # fmt: skip
    if ok:
        assert result.returncode == 0, f"{args}: {result.stderr}{result.stdout}"
    return result


# -- list ---------------------------------------------------------------------


def test_list_reads_both_layouts_and_ignores_what_terraform_ignores(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    fake_packed(mirror)
    unpacked = mirror / "example.com:8443/acme/thing/1.0.0-beta.1/linux_arm64"
    unpacked.mkdir(parents=True)
    (unpacked / "terraform-provider-thing_v1.0.0-beta.1").write_bytes(FAKE_BINARY)
    (unpacked / "terraform-provider-thing_v1.0.0-beta.1").chmod(0o755)
    (unpacked / "LICENSE").write_text("MIT\n")
    # What Terraform's mirror search skips: stray files, bad names, a version
    # directory without an executable provider.
    (mirror / "README").write_text("hello\n")
    (mirror / NULL / "terraform-provider-random_1.0.0_linux_amd64.zip").write_bytes(b"")
    no_binary = mirror / NULL / "3.0.0" / "linux_amd64"
    no_binary.mkdir(parents=True)
    (no_binary / "terraform-provider-null").write_bytes(FAKE_BINARY)  # not executable

    packages = list_providers(mirror)

    assert packages == [
        ProviderPackage("example.com:8443", "acme", "thing", "1.0.0-beta.1", "linux_arm64",
                        "unpacked", unpacked),
        ProviderPackage("registry.terraform.io", "hashicorp", "null", "2.1.2", "linux_amd64",
                        "packed", mirror / NULL / PACKED_NAME),
    ]  # fmt: skip
    assert [p.source for p in packages] == ["example.com:8443/acme/thing", "hashicorp/null"]
    assert list_providers(tmp_path / "nothing-here") == []


def test_list_sorts_versions_semantically(tmp_path: Path) -> None:
    for version in ("10.0.0", "2.0.0", "2.0.0-rc.1", "9.1.0"):
        fake_zip(tmp_path / NULL / f"terraform-provider-null_{version}_linux_amd64.zip")
    assert [p.version for p in list_providers(tmp_path)] == [
        "2.0.0-rc.1", "2.0.0", "9.1.0", "10.0.0"
    ]  # fmt: skip


# -- import -------------------------------------------------------------------


def test_import_packed_copies_the_zips_only(tmp_path: Path) -> None:
    source = make_mirror(tmp_path / "carried", "packed")
    mirror = tmp_path / "mirror"

    imported = import_mirror(source, mirror)

    zipped = mirror / NULL / PACKED_NAME
    assert imported == [ProviderPackage("registry.terraform.io", "hashicorp", "null",
                                        NULL_VERSION, NULL_PLATFORM, "packed", zipped)]  # fmt: skip
    assert zipped.read_bytes() == (source / NULL / PACKED_NAME).read_bytes()
    # The network mirror's index files are checked, not copied: another
    # import would make them wrong, and a filesystem mirror ignores them.
    assert sorted(p.name for p in (mirror / NULL).iterdir()) == [PACKED_NAME]
    assert stat.S_IMODE(zipped.stat().st_mode) == 0o644
    assert list_providers(mirror) == imported


def test_import_unpacked_keeps_the_provider_executable(tmp_path: Path) -> None:
    source = make_mirror(tmp_path / "carried", "unpacked")
    carried = source / NULL / NULL_VERSION / NULL_PLATFORM / NULL_BINARY_NAME
    # Carried on a medium that lost the mode bits: made executable again.
    carried.chmod(0o644)
    (carried.parent / "README.md").write_text("the null provider\n")
    mirror = tmp_path / "mirror"

    imported = import_mirror(source, mirror)

    target = mirror / NULL / NULL_VERSION / NULL_PLATFORM
    assert [(p.layout, p.path) for p in imported] == [("unpacked", target)]
    assert (target / NULL_BINARY_NAME).read_bytes() == null_provider_binary().read_bytes()
    assert stat.S_IMODE((target / NULL_BINARY_NAME).stat().st_mode) == 0o755
    assert stat.S_IMODE((target / "README.md").stat().st_mode) == 0o644
    assert list_providers(mirror) == imported
    # No temporary name left behind.
    assert sorted(p.name for p in target.parent.iterdir()) == [NULL_PLATFORM]


def test_reimport_leaves_identical_packages_alone_and_refuses_different_ones(
    tmp_path: Path,
) -> None:
    source = fake_packed(tmp_path / "carried")
    mirror = tmp_path / "mirror"
    first = import_mirror(source, mirror)
    zipped = mirror / NULL / PACKED_NAME
    before = zipped.stat()

    assert import_mirror(source, mirror) == []
    after = zipped.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert list_providers(mirror) == first

    # A new package beside the old ones is imported; a different zip for a
    # version and platform the mirror has is refused, and nothing is copied.
    fake_zip(source / NULL / "terraform-provider-null_3.0.0_linux_amd64.zip")
    other = fake_packed(tmp_path / "other")
    fake_zip(other / NULL / PACKED_NAME, {NULL_BINARY_NAME: b"something else"})
    fake_zip(other / NULL / "terraform-provider-null_4.0.0_linux_amd64.zip")
    with pytest.raises(MirrorError) as caught:
        import_mirror(other, mirror)
    assert str(caught.value).startswith(f"{other / NULL / PACKED_NAME}: the mirror already holds")
    assert "a different hashicorp/null 2.1.2 for linux_amd64" in str(caught.value)
    assert zipped.read_bytes() == (source / NULL / PACKED_NAME).read_bytes()
    assert [p.version for p in list_providers(mirror)] == ["2.1.2"]

    assert [p.version for p in import_mirror(source, mirror)] == ["3.0.0"]


BadTree = Callable[[Path], Path]


def _file(relative: str, data: bytes = b"x") -> BadTree:
    def make(root: Path) -> Path:
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    return make


def _dir(relative: str) -> BadTree:
    def make(root: Path) -> Path:
        path = root / relative
        path.mkdir(parents=True)
        return path

    return make


def _zip(members: dict[str, bytes]) -> BadTree:
    return lambda root: fake_zip(root / NULL / "terraform-provider-null_3.0.0_linux_amd64.zip",
                                 members)  # fmt: skip


def _symlink_member(root: Path) -> Path:
    path = root / NULL / "terraform-provider-null_3.0.0_linux_amd64.zip"
    with zipfile.ZipFile(path, "w") as out:
        out.writestr(NULL_BINARY_NAME, FAKE_BINARY)
        link = zipfile.ZipInfo("LICENSE")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        out.writestr(link, "/etc/passwd")
    return path


def _symlink(target: str, name: str = "terraform-provider-null_3.0.0_linux_amd64.zip") -> BadTree:
    def make(root: Path) -> Path:
        link = root / NULL / name
        link.symlink_to(target)
        return link

    return make


def _unpacked_without_binary(root: Path) -> Path:
    target = root / NULL / "3.0.0" / "linux_amd64"
    target.mkdir(parents=True)
    (target / "LICENSE").write_text("MIT\n")
    return target


BAD_TREES: dict[str, tuple[BadTree, str]] = {
    "file at the top": (_file("notes.txt"), "a file where a directory named after a registry "
                        "host (e.g. registry.terraform.io) belongs"),
    "bad host name": (_dir("registry_terraform_io"),
                      "'registry_terraform_io' is not named after a registry host"),
    "bad namespace": (_dir("registry.terraform.io/hashi corp"),
                      "'hashi corp' is not named after a provider namespace"),
    "bad type": (_dir("registry.terraform.io/hashicorp/null--x"),
                 "'null--x' is not named after a provider type"),
    "bad zip name": (_file(f"{NULL}/null_3.0.0_linux_amd64.zip"),
                     "not a package name for hashicorp/null; expected "
                     "terraform-provider-null_VERSION_OS_ARCH.zip"),
    "other provider's zip": (_file(f"{NULL}/terraform-provider-random_3.0.0_linux_amd64.zip"),
                             "not a package name for hashicorp/null"),
    "unexpected file": (_file(f"{NULL}/SHA256SUMS"), "unexpected file; a provider's directory "
                        "holds terraform-provider-null_VERSION_OS_ARCH.zip packages"),
    "bad version directory": (_dir(f"{NULL}/latest"),
                              "'latest' is not a version"),
    "bad platform directory": (_dir(f"{NULL}/3.0.0/linux-amd64"),
                               "expected a platform directory named OS_ARCH"),
    "unpacked without the binary": (_unpacked_without_binary,
                                    "holds no terraform-provider-null* file"),
    "bad index": (_file(f"{NULL}/index.json", b"{not json"), "not valid JSON"),
    "not a zip": (_file(f"{NULL}/terraform-provider-null_3.0.0_linux_amd64.zip", b"<html>"),
                  "not a readable zip file"),
    "zip without the binary": (_zip({"README.md": b"hi", "bin/terraform-provider-null": b"x"}),
                               "holds no terraform-provider-null* file at its top (it holds "
                               "README.md, bin/terraform-provider-null)"),
    "zip path traversal": (_zip({NULL_BINARY_NAME: FAKE_BINARY, "../../../.bashrc": b"evil"}),
                           "holds '../../../.bashrc', a path leaving the directory"),
    "zip absolute path": (_zip({NULL_BINARY_NAME: FAKE_BINARY, "/etc/cron.d/x": b"evil"}),
                          "holds '/etc/cron.d/x', a path leaving the directory"),
    "zip with a symlink": (_symlink_member, "holds the symlink 'LICENSE'"),
    "symlink escaping": (_symlink("/etc/passwd"), "a symlink to /etc/passwd, outside"),
    "symlink escaping upwards": (_symlink("../../../../outside.zip"),
                                 "a symlink to ../../../../outside.zip, outside"),
    "dangling symlink": (_symlink("gone.zip"), "a symlink to gone.zip, which does not exist"),
    "symlink to a directory": (_symlink(".", "3.0.0"), "a symlink to the directory ."),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_TREES))
def test_import_refuses_a_bad_tree_whole(tmp_path: Path, case: str) -> None:
    make, expected = BAD_TREES[case]
    source = fake_packed(tmp_path / "carried")  # a good package beside the bad entry
    (tmp_path / "outside.zip").write_bytes(fake_zip(tmp_path / "z.zip").read_bytes())
    offending = make(source)
    mirror = tmp_path / "mirror"

    with pytest.raises(MirrorError) as caught:
        import_mirror(source, mirror)

    message = str(caught.value)
    assert message.startswith(f"{offending}: "), message
    assert expected in message
    assert not mirror.exists()  # nothing copied, not even the good package


def test_import_refuses_what_is_no_mirror(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(MirrorError, match=r"empty: holds no provider package; expected what "
                       r"`terraform providers mirror DIR` writes"):  # fmt: skip
        import_mirror(tmp_path / "empty", tmp_path / "mirror")
    with pytest.raises(MirrorError, match=r"missing: no such directory"):
        import_mirror(tmp_path / "missing", tmp_path / "mirror")
    with pytest.raises(MirrorError, match=r"z\.zip: not a directory"):
        import_mirror(fake_zip(tmp_path / "z.zip"), tmp_path / "mirror")
    source = fake_packed(tmp_path / "carried")
    with pytest.raises(MirrorError, match=r"overlap"):
        import_mirror(source, source / "registry.terraform.io")


def test_a_symlink_inside_the_tree_is_copied_as_its_file(tmp_path: Path) -> None:
    source = fake_packed(tmp_path / "carried")
    (source / NULL / "terraform-provider-null_3.0.0_linux_amd64.zip").symlink_to(PACKED_NAME)
    imported = import_mirror(source, tmp_path / "mirror")
    copied = tmp_path / "mirror" / NULL / "terraform-provider-null_3.0.0_linux_amd64.zip"
    assert [p.version for p in imported] == ["2.1.2", "3.0.0"]
    assert not copied.is_symlink()
    assert copied.read_bytes() == (source / NULL / PACKED_NAME).read_bytes()


# -- the command line ---------------------------------------------------------


def test_cli_import_and_list(tmp_path: Path) -> None:
    source = fake_packed(tmp_path / "carried")
    mirror = tmp_path / "mirror"

    result = stockade("terraform", "mirror", "import", str(source), "--mirror-dir", str(mirror))
    assert f"Imported 1 provider package into {mirror}:" in result.stdout
    assert "hashicorp/null" in result.stdout and "linux_amd64" in result.stdout
    again = stockade("terraform", "mirror", "import", str(source), "--mirror-dir", str(mirror))
    nothing = f"Nothing new: the mirror {mirror} already holds every package in {source}."
    assert nothing in again.stdout

    listed = stockade("terraform", "mirror", "list", "--mirror-dir", str(mirror), "-o", "json")
    assert json.loads(listed.stdout) == [{
        "source": "hashicorp/null", "hostname": "registry.terraform.io",
        "namespace": "hashicorp", "type": "null", "version": "2.1.2",
        "platform": "linux_amd64", "layout": "packed", "path": str(mirror / NULL / PACKED_NAME),
    }]  # fmt: skip
    table = stockade("terraform", "mirror", "list", "--mirror-dir", str(mirror))
    assert "hashicorp/null" in table.stdout and "packed" in table.stdout

    empty = stockade("terraform", "mirror", "list", "--mirror-dir", str(tmp_path / "none"))
    assert "holds no providers: fill it with `stockade terraform mirror import DIR`" in (
        empty.stdout
    )

    # A bad tree: one line naming the path, exit code 1, nothing copied.
    (source / NULL / "SHA256SUMS").write_text("x\n")
    bad = stockade("terraform", "mirror", "import", str(source), "--mirror-dir",
                   str(tmp_path / "other"), ok=False)  # fmt: skip
    assert bad.returncode == 1
    assert f"error: {source / NULL / 'SHA256SUMS'}: unexpected file" in bad.stderr
    assert not (tmp_path / "other").exists()


def test_cli_default_mirror_dir_is_the_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = fake_packed(tmp_path / "carried")
    data = tmp_path / "data"
    env = {"STOCKADE_DATA_DIR": str(data)}
    stockade("terraform", "mirror", "import", str(source), env=env)
    assert (data / "terraform-mirror" / NULL / PACKED_NAME).is_file()

    explicit = tmp_path / "explicit"
    env["STOCKADE_TERRAFORM_MIRROR_DIR"] = str(explicit)
    listed = stockade("terraform", "mirror", "list", "-o", "json", env=env)
    assert json.loads(listed.stdout) == []  # not the data dir's any more

    # The same defaults as the server's settings, with and without each variable.
    for name in [k for k in os.environ if k.startswith("STOCKADE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    cases = [{}, {"STOCKADE_DATA_DIR": str(data)}, env]
    for case in cases:
        for name in ("STOCKADE_DATA_DIR", "STOCKADE_TERRAFORM_MIRROR_DIR"):
            monkeypatch.delenv(name, raising=False)
        for name, value in case.items():
            monkeypatch.setenv(name, value)
        assert Settings().provider_mirror_dir == default_terraform_mirror_dir(), case
    monkeypatch.delenv("STOCKADE_DATA_DIR")
    monkeypatch.delenv("STOCKADE_TERRAFORM_MIRROR_DIR")
    assert default_terraform_mirror_dir() == tmp_path / "xdg" / "stockade" / "terraform-mirror"


# -- real Terraform -----------------------------------------------------------

NULL_CONFIG = """\
terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "2.1.2"
    }
  }
}

resource "null_resource" "hello" {
  triggers = {
    greeting = "hello from the mirror"
  }
}

output "id" {
  value = null_resource.hello.id
}
"""

RANDOM_CONFIG = """\
terraform {
  required_providers {
    random = {
      source  = "hashicorp/random"
      version = "~> 3.0"
    }
  }
}

resource "random_pet" "name" {}
"""


def terraform(
    workdir: Path, mirror: Path, *args: str, ok: bool = True
) -> subprocess.CompletedProcess[str]:
    """The Terraform CLI as a build runs it: a CLI configuration with only a
    filesystem mirror, no checkpoint calls, a home of its own."""
    config = workdir.parent / f"{workdir.name}.tfrc"
    config.write_text(f'provider_installation {{\n  filesystem_mirror {{\n    path = "{mirror}"\n'
                      "  }\n}\n")  # fmt: skip
    home = workdir.parent / f"{workdir.name}-home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "TF_CLI_CONFIG_FILE": str(config),
        "CHECKPOINT_DISABLE": "1",
        "TF_IN_AUTOMATION": "1",
    }
    result = subprocess.run(
        [terraform_binary(), f"-chdir={workdir}", *args, "-input=false", "-no-color"],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=300,
    )  # fmt: skip
    if ok:
        assert result.returncode == 0, f"terraform {args}: {result.stderr}{result.stdout}"
    return result


@pytest.mark.parametrize("layout", ["packed", "unpacked"])
def test_terraform_applies_null_from_an_imported_mirror(tmp_path: Path, layout: str) -> None:
    terraform_binary()
    source = make_mirror(tmp_path / "carried", layout)  # type: ignore[arg-type]
    mirror = tmp_path / "mirror"
    stockade("terraform", "mirror", "import", str(source), "--mirror-dir", str(mirror))
    workdir = tmp_path / "template"
    workdir.mkdir()
    (workdir / "main.tf").write_text(NULL_CONFIG)

    init = terraform(workdir, mirror, "init")
    assert "Installing hashicorp/null v2.1.2" in init.stdout
    assert "Terraform has been successfully initialized!" in init.stdout
    lock = (workdir / ".terraform.lock.hcl").read_text()
    assert 'provider "registry.terraform.io/hashicorp/null"' in lock
    assert 'version     = "2.1.2"' in lock
    apply = terraform(workdir, mirror, "apply", "-auto-approve")
    assert "Apply complete! Resources: 1 added, 0 changed, 0 destroyed." in apply.stdout

    state = json.loads((workdir / "terraform.tfstate").read_text())
    (resource,) = state["resources"]
    assert (resource["type"], resource["name"]) == ("null_resource", "hello")
    assert resource["provider"] == 'provider["registry.terraform.io/hashicorp/null"]'
    attributes = resource["instances"][0]["attributes"]
    assert attributes["triggers"] == {"greeting": "hello from the mirror"}
    assert state["outputs"]["id"]["value"] == attributes["id"]


def test_terraform_init_fails_for_a_provider_the_mirror_lacks(tmp_path: Path) -> None:
    terraform_binary()
    mirror = tmp_path / "mirror"
    import_mirror(make_mirror(tmp_path / "carried", "packed"), mirror)
    workdir = tmp_path / "template"
    workdir.mkdir()
    (workdir / "main.tf").write_text(RANDOM_CONFIG)

    init = terraform(workdir, mirror, "init", ok=False)

    assert init.returncode != 0
    output = " ".join((init.stderr + init.stdout).split())
    assert "Failed to query available provider packages" in output
    assert "hashicorp/random" in output
    assert str(mirror) in output  # Terraform names the mirror it searched

    help_text = missing_provider_help("hashicorp/random", "~> 3.0", mirror)
    assert help_text.startswith(
        f'The provider hashicorp/random version "~> 3.0" is not in the provider mirror {mirror}'
    )
    assert "The mirror has of hashicorp/random: nothing." in help_text
    assert "  terraform providers mirror -platform=linux_amd64 DIR\n" in help_text
    assert help_text.endswith("\n  stockade terraform mirror import DIR")

    # The provider is there, not the version: Terraform fails, and the help
    # says which versions the mirror has.
    (workdir / "main.tf").write_text(NULL_CONFIG.replace('"2.1.2"', '">= 3.0"'))
    init = terraform(workdir, mirror, "init", ok=False)
    output = " ".join((init.stderr + init.stdout).split())
    assert init.returncode != 0
    assert "no available releases match the given constraints >= 3.0" in output
    help_text = missing_provider_help("registry.terraform.io/hashicorp/null", ">= 3.0", mirror)
    assert 'The provider hashicorp/null version ">= 3.0" is not in' in help_text
    assert "The mirror has of hashicorp/null: 2.1.2 (linux_amd64, packed)." in help_text
