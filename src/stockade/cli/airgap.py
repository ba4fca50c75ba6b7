"""stockade airgap keygen|bundle|verify|install: moving Stockade across an air gap."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import click
import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from stockade.airgap import (
    AirgapError,
    BundleOptions,
    VerifiedBundle,
    build_bundle,
    generate_keypair,
    install_bundle,
    load_public_key,
    normalize_fingerprint,
    verify_bundle,
)
from stockade.airgap.bundle import AGENT_PYTHONS, default_platforms, default_python

app = typer.Typer(no_args_is_help=True)

PublicKeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--public-key",
        "-k",
        help="the signer's public key (PREFIX.pub of keygen), obtained through a trusted channel",
    ),
]
FingerprintOpt = Annotated[
    str | None,
    typer.Option(
        "--fingerprint",
        help="instead of --public-key: the signer's fingerprint (64 hex digits) that the "
        "bundle's own signer.pub must have",
    ),
]


def _say(message: str) -> None:
    # Plain writes: Rich would wrap long paths and digests at 80 columns.
    typer.echo(message)


def _fail(exc: Exception) -> NoReturn:
    """One line and exit code 1. Not through cli.output.fail: Rich wraps
    at 80 columns when stderr is not a terminal, and these lines carry long
    paths and digests that scripts and people grep for."""
    click.echo(click.style("error:", fg="red") + f" {exc}", err=True)
    raise typer.Exit(1)


def _progress(message: str) -> None:
    typer.echo(f"  {message}", err=True)


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _trust(
    public_key: Path | None, fingerprint: str | None
) -> tuple[Ed25519PublicKey | None, str | None]:
    """The key (or the fingerprint) a bundle must be signed with."""
    if (public_key is None) == (fingerprint is None):
        raise click.UsageError(
            "pass --public-key FILE (the signer's .pub file), or --fingerprint HEX instead"
        )
    try:
        if public_key is not None:
            return load_public_key(public_key), None
        assert fingerprint is not None
        return None, normalize_fingerprint(fingerprint)
    except AirgapError as exc:
        _fail(exc)


def _describe(bundle: VerifiedBundle) -> str:
    info = bundle.info
    images = ", ".join(image.name for image in info.images) or "none"
    return (
        f"Stockade {info.stockade_version} for CPython {', '.join(info.python_versions)} on "
        f"{', '.join(info.platforms)}, made {info.created_at}; images: {images}; templates: "
        f"{', '.join(info.templates)}; Terraform mirror: {'yes' if info.terraform_mirror else 'no'}"
    )


@app.command("keygen")
def keygen(
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="the private key's file; the public key goes to OUTPUT.pub"
        ),
    ],
) -> None:
    """Make an Ed25519 key pair for signing bundles (never overwrites a file)."""
    try:
        pair = generate_keypair(output)
    except AirgapError as exc:
        _fail(exc)
    _say(f"Wrote the signing key {pair.private_path} (mode 0600: keep it secret, where bundles")
    _say(f"are built) and the public key {pair.public_path} (carry it to the offline site).")
    _say(f"Fingerprint: {pair.fingerprint}")


@app.command("bundle")
def bundle(
    output: Annotated[Path, typer.Option("--output", "-o", help="the bundle to write (a tar)")],
    signing_key: Annotated[
        Path, typer.Option("--signing-key", help="the private key of `stockade airgap keygen`")
    ],
    python: Annotated[
        list[str] | None,
        typer.Option(
            "--python",
            help=f"CPython version to carry wheels for, repeatable (default: {default_python()})",
        ),
    ] = None,
    platform: Annotated[
        list[str] | None,
        typer.Option(
            "--platform",
            help="wheel platform tag, repeatable; several for one architecture are tried "
            f"together (default: {', '.join(default_platforms())})",
        ),
    ] = None,
    image: Annotated[
        list[str] | None,
        typer.Option(
            "--image",
            help="workspace image (repo:tag) to `docker save`, repeatable "
            "(default: the image of the docker starter template)",
        ),
    ] = None,
    no_images: Annotated[
        bool, typer.Option("--no-images", help="carry no workspace image")
    ] = False,
    terraform_mirror: Annotated[
        Path | None,
        typer.Option("--terraform-mirror", help="a Terraform provider mirror directory to carry"),
    ] = None,
    stockade_wheel: Annotated[
        Path | None,
        typer.Option(
            "--stockade-wheel",
            help="Stockade's wheel (default: built from the checkout this Stockade runs from)",
        ),
    ] = None,
) -> None:
    """Build a signed bundle of everything an offline site needs.

    Run it on a connected machine: wheels come through pip's index, images
    from the local Docker daemon."""
    if no_images and image:
        raise click.UsageError("--image and --no-images contradict each other")
    options = BundleOptions(
        output=output,
        signing_key=signing_key,
        python_versions=python or [],
        platforms=platform or [],
        images=image or [],
        include_images=not no_images,
        terraform_mirror=terraform_mirror,
        stockade_wheel=stockade_wheel,
        agent_python_versions=AGENT_PYTHONS,
    )
    try:
        summary = build_bundle(options, log=_progress)
    except AirgapError as exc:
        _fail(exc)
    info = summary.info
    _say(
        f"Wrote {summary.path}: {summary.files} files, {_size(summary.size)}, "
        f"in {summary.seconds:.1f} s."
    )
    images = ", ".join(f"{i.name} ({i.id[:19]})" for i in info.images) or "none"
    _say(
        f"  Stockade {info.stockade_version}, CPython {', '.join(info.python_versions)} on "
        f"{', '.join(info.platforms)}; agent wheels for CPython "
        f"{', '.join(info.agent_python_versions) or 'none'}"
    )
    _say(f"  images: {images}; templates: {', '.join(info.templates)}")
    _say(f"  signed by the key with fingerprint {summary.fingerprint}")
    _say(f"Check it on the other side: stockade airgap verify {summary.path} --public-key KEY.pub")


@app.command("verify")
def verify(
    file: Annotated[Path, typer.Argument(help="the bundle (a tar)")],
    public_key: PublicKeyOpt = None,
    fingerprint: FingerprintOpt = None,
) -> None:
    """Check a bundle's signature and the sha256 of every file in it."""
    key, pinned = _trust(public_key, fingerprint)
    try:
        result = verify_bundle(file, public_key=key, fingerprint=pinned)
    except AirgapError as exc:
        _fail(exc)
    _say(
        f"OK: {file} is signed by the key with fingerprint {result.fingerprint}, and its "
        f"{result.files} files ({_size(result.size)}) match SHA256SUMS."
    )
    _say(f"  {_describe(result)}")


@app.command("install")
def install(
    file: Annotated[Path, typer.Argument(help="the bundle (a tar)")],
    prefix: Annotated[
        Path,
        typer.Option("--prefix", help="a new (or empty) directory to install into"),
    ],
    public_key: PublicKeyOpt = None,
    fingerprint: FingerprintOpt = None,
    no_images: Annotated[
        bool, typer.Option("--no-images", help="do not `docker load` the bundle's images")
    ] = False,
    python: Annotated[
        str | None,
        typer.Option("--python", help="the interpreter for the venv (default: this one's)"),
    ] = None,
) -> None:
    """Verify a bundle, then install it without network.

    A venv from the bundle's wheels (pip --no-index), its images into Docker,
    its templates and Terraform mirror next to the venv."""
    key, pinned = _trust(public_key, fingerprint)
    try:
        result = install_bundle(
            file,
            prefix=prefix,
            python=python,
            include_images=not no_images,
            log=_progress,
            public_key=key,
            fingerprint=pinned,
        )
    except AirgapError as exc:
        _fail(exc)
    info = result.bundle.info
    _say(
        f"Installed Stockade {info.stockade_version} into {result.venv} from {file} "
        f"in {result.seconds:.1f} s."
    )
    for image in result.images:
        _say(f"  loaded image {image.name} ({image.id[:19]})")
    if info.images and not result.images:
        _say(f"  images not loaded (--no-images): docker load -i {result.prefix}/bundle/images/...")
    _say(f"  templates: {result.templates}")
    if result.terraform_mirror is not None:
        _say(f"  Terraform providers: {result.terraform_mirror} (not yet where builds read them)")
    providers = "import the Terraform providers, " if result.terraform_mirror else ""
    _say(f"Next: {providers}start the server, create the owner, push a template:")
    if result.terraform_mirror is not None:
        # Checked and copied by the import, which refuses a tree that is not a
        # provider mirror; the data directory is the one the server gets below.
        _say(
            f"  {result.stockade} terraform mirror import {result.terraform_mirror} "
            "--mirror-dir /var/lib/stockade/terraform-mirror"
        )
    _say(
        f"  {result.stockade} server --address 0.0.0.0:7080 "
        "--access-url http://HOST:7080 --data-dir /var/lib/stockade"
    )
    _say(f"  {result.stockade} login http://HOST:7080 --first-user --username admin --email ...")
    _say(f"  {result.stockade} templates push docker -d {result.templates}/docker")
