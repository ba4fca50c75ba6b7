"""Moving Stockade across an air gap: one signed, checksummed tar with the
wheels, the agent's extra wheels, the workspace images, the starter
templates and optionally a Terraform provider mirror
(``stockade airgap keygen|bundle|verify|install``).

Runs on the CLI side: it imports neither the server nor the agent."""

from stockade.airgap.bundle import BundleOptions, BundleSummary, build_bundle
from stockade.airgap.errors import (
    AirgapError,
    BundleError,
    InstallError,
    KeyFileError,
    VerifyError,
)
from stockade.airgap.install import InstallResult, install_bundle
from stockade.airgap.keys import (
    KeyPair,
    fingerprint,
    generate_keypair,
    load_private_key,
    load_public_key,
    normalize_fingerprint,
)
from stockade.airgap.manifest import BundleInfo, ImageInfo
from stockade.airgap.verify import VerifiedBundle, verify_bundle

__all__ = [
    "AirgapError",
    "BundleError",
    "BundleInfo",
    "BundleOptions",
    "BundleSummary",
    "ImageInfo",
    "InstallError",
    "InstallResult",
    "KeyFileError",
    "KeyPair",
    "VerifiedBundle",
    "VerifyError",
    "build_bundle",
    "fingerprint",
    "generate_keypair",
    "install_bundle",
    "load_private_key",
    "load_public_key",
    "normalize_fingerprint",
    "verify_bundle",
]
