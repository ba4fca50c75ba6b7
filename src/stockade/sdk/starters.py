"""The starter templates that ``stockade templates init`` writes (and that
``stockade airgap bundle`` carries across the gap): a working ``stockade.yaml``
and a README per backend, and for terraform a ``main.tf``."""

from __future__ import annotations

import re
from importlib import resources
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
    "terraform": """\
# A Stockade template: see README.md next to this file. The workspace itself is
# made by main.tf; its parameters are the variables declared there.
name: {name}
display_name: {title}
description: A sandboxed process made by Terraform (built-in resources only).
backend: terraform
agent:
  # Parameters reach the script as STOCKADE_PARAMETER_<NAME> variables.
  startup_script: |
    set -eu
    echo "$STOCKADE_PARAMETER_GREETING from $(hostname), in $HOME"
  metadata:
    - key: disk
      display_name: Home disk usage
      script: du -sh "$HOME" | cut -f1
      interval: 300
apps: []
""",
    "kubernetes": """\
# A Stockade template: see README.md next to this file.
name: {name}
display_name: {title}
description: A workspace as a Pod on Kubernetes, with a persistent home volume.
backend: kubernetes
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
  # The cluster pulls this image from your registry, never from the internet:
  # push stockade-base:bookworm there (scripts/build-base-image.sh) and name it here.
  image: registry.internal/stockade-base:bookworm
  cpu: ${{cpu}}
  memory: ${{memory}}
  home_size: 20GiB
kubernetes:
  # Nothing comes in; out: the control plane, cluster DNS and allow_egress only.
  network_policy: true
  allow_egress: []
  read_only_root: true
  run_as_user: 1000
  node_selector: {{}}
  tolerations: []
agent:
  startup_script: |
    set -eu
    echo "workspace started on $(hostname), in $HOME"
  metadata:
    - key: load
      display_name: Load average
      script: cut -d' ' -f1 /proc/loadavg
      interval: 30
apps: []
""",
}

# Files a starter has besides stockade.yaml and README.md, shipped in
# stockade/sdk/starter_files/BACKEND/.
EXTRA_FILES: dict[str, tuple[str, ...]] = {"terraform": ("main.tf",)}

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
{extra}"""

_TERRAFORM_README = """
## Terraform

`main.tf` makes the workspace with built-in resources only (`terraform_data` and
`local-exec`), so it runs wherever the provisioner has the Terraform (or
OpenTofu) CLI and bubblewrap: the workspace is a sandboxed process on the
provisioner's host, its home under `var.stockade_workspace_dir`. Stockade passes
the `stockade_*` variables (declare those you use) and treats every other
variable as a parameter users choose. What has `count = var.stockade_start_count`
goes away at stop; the rest stays until the workspace is deleted. See
docs/terraform.md in Stockade for the whole contract and for providers (from
the offline mirror: `stockade terraform mirror import DIR`).

Its builds run on a provisioner that serves the `terraform` backend: a
`stockade provisionerd start --backend terraform` (the safe place: template
code runs there), or the server itself when started with
`--provisioner-backends local,docker,terraform`. Until one does, a workspace's
builds wait in the queue.
"""

_KUBERNETES_README = """
## Kubernetes

Each workspace is a Pod in the workspaces' namespace (`--kubernetes-namespace`,
default `stockade-workspaces`), its home a PersistentVolumeClaim kept across
stop and start, its agent token in a Secret. Set `compute.image` to where your
registry holds the workspace image before you push. The `kubernetes:` section
sets node selector, tolerations, runtime class, pull secrets, service account,
GPU resource, storage class and the NetworkPolicy; see docs/kubernetes.md in
Stockade.

Its builds run on a provisioner that serves the `kubernetes` backend: the
server deployed by `deploy/kubernetes/base` does (`STOCKADE_PROVISIONER_BACKENDS=kubernetes`),
as does a `stockade provisionerd start --backend kubernetes`. Until one does, a
workspace's builds wait in the queue.
"""

_EXTRA_README = {"terraform": _TERRAFORM_README, "kubernetes": _KUBERNETES_README}


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
    """Write the starter of ``backend`` (``stockade.yaml``, ``README.md`` and
    its :data:`EXTRA_FILES`) into ``directory``, made if missing; existing
    files of those names are replaced.
    Returns the template name (by default from the directory's name)."""
    name = name or default_name(directory)
    manifest = render_starter(backend, name)
    parse_manifest(manifest)  # a starter that does not validate is a bug here
    title = name.replace("-", " ").title()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / MANIFEST_NAME).write_text(manifest)
    extra = _EXTRA_README.get(backend, "")
    (directory / "README.md").write_text(
        _README.format(name=name, title=title, backend=backend, extra=extra)
    )
    shipped = resources.files("stockade.sdk") / "starter_files" / backend
    for relative in EXTRA_FILES.get(backend, ()):
        (directory / relative).write_text(shipped.joinpath(relative).read_text())
    return name
