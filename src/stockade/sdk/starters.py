"""The starter templates that ``stockade templates init`` writes (and that
``stockade airgap bundle`` carries across the gap): a working ``stockade.yaml``
and a README per backend."""

from __future__ import annotations

import re
from pathlib import Path

from stockade.sdk.templates import MANIFEST_NAME, Manifest, parse_manifest

STARTERS: dict[str, str] = {
    "local": """\
# A Stockade template: see README.md next to this file.
name: {name}
display_name: {title}
description: A workspace on the Stockade host, sandboxed with bubblewrap.
backend: local
parameters:
  - name: repo
    display_name: Git repository
    description: Cloned into ~/project at first start (empty for none).
    type: string
    default: ""
    validation:
      regex: "^$|^(https?|ssh|git)://.+$"
    mutable: false
  - name: dotfiles
    type: bool
    description: Apply ~/.dotfiles/install.sh at start if it exists.
    default: false
    mutable: true
compute:
  home_size: 10GiB
agent:
  # Parameters reach the script as STOCKADE_PARAMETER_<NAME> variables.
  startup_script: |
    set -eu
    echo "workspace started in $HOME"
    if [ -n "$STOCKADE_PARAMETER_REPO" ] && [ ! -d "$HOME/project" ]; then
      git clone "$STOCKADE_PARAMETER_REPO" "$HOME/project"
    fi
    if [ "$STOCKADE_PARAMETER_DOTFILES" = true ] && [ -x "$HOME/.dotfiles/install.sh" ]; then
      "$HOME/.dotfiles/install.sh"
    fi
  metadata:
    - key: disk
      display_name: Home disk usage
      script: du -sh "$HOME" | cut -f1
      interval: 300
apps: []
""",
    "docker": """\
# A Stockade template: see README.md next to this file.
name: {name}
display_name: {title}
description: A workspace in its own container, with a persistent home volume.
backend: docker
parameters:
  - name: cpu
    display_name: CPU cores
    type: number
    default: 2
    options: [1, 2, 4, 8]
    mutable: true
  - name: memory
    display_name: Memory
    type: string
    default: 4GiB
    options: [2GiB, 4GiB, 8GiB, 16GiB]
    mutable: true
compute:
  image: stockade-base:bookworm
  cpu: ${{cpu}}
  memory: ${{memory}}
  home_size: 20GiB
agent:
  startup_script: |
    set -eu
    echo "workspace started in $HOME"
  metadata:
    - key: load
      display_name: Load average
      script: cut -d' ' -f1 /proc/loadavg
      interval: 30
apps: []
""",
}

_README = """\
# {title}

A Stockade template for the `{backend}` backend, written by `stockade templates init`.

- `stockade.yaml` is the manifest: parameters users choose at creation, compute
  settings, the agent's startup script and metadata commands, and apps.
- Every other file in this directory is uploaded with it (except `.git`).

Push it (as an owner or template-admin) and check the result:

    stockade templates push {name} -d .
    stockade templates versions {name}

`--no-activate` uploads a version without making it the one new workspaces use.
"""


def default_name(directory: Path) -> str:
    """A template name from a directory's name (``my-template`` when nothing is left)."""
    name = re.sub(r"[^a-z0-9-]+", "-", directory.resolve().name.lower()).strip("-")[:32]
    return name.strip("-") or "my-template"


def render_starter(backend: str, name: str) -> str:
    """The starter ``stockade.yaml`` of ``backend`` (a key of :data:`STARTERS`)."""
    if backend not in STARTERS:
        raise ValueError(f"unknown backend {backend!r}; choose {' or '.join(STARTERS)}")
    title = name.replace("-", " ").title()
    return STARTERS[backend].format(name=name, title=title)


def starter_manifest(backend: str, name: str = "starter") -> Manifest:
    """The parsed starter of ``backend`` (e.g. for its image)."""
    return parse_manifest(render_starter(backend, name))


def write_starter(directory: Path, backend: str, name: str | None = None) -> str:
    """Write the starter of ``backend`` (``stockade.yaml`` and ``README.md``) into
    ``directory``, made if missing; existing files of those names are replaced.
    Returns the template name (by default from the directory's name)."""
    name = name or default_name(directory)
    manifest = render_starter(backend, name)
    parse_manifest(manifest)  # a starter that does not validate is a bug here
    title = name.replace("-", " ").title()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_NAME).write_text(manifest)
    (directory / "README.md").write_text(_README.format(name=name, title=title, backend=backend))
    return name
