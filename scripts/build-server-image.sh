#!/usr/bin/env bash
# Build the Stockade control plane image offline, without pulling anything:
#   scripts/build-server-image.sh [REPOSITORY]     (default: stockade-server)
# tags REPOSITORY:<version> (stockade.__version__) and REPOSITORY:latest.
#
# The image (deploy/container/Dockerfile) is the workspace base image
# (scripts/build-base-image.sh, built first when missing) plus a venv at
# /opt/stockade holding Stockade and its dependencies, run as uid 10001 with
# entrypoint `stockade` and command `server`, listening on 0.0.0.0:7080, data
# in /var/lib/stockade; deploy/kubernetes/base runs it with a read-only root.
#
# Everything that goes in is prepared on this machine: the Stockade wheel
# built from this checkout (its working tree, uncommitted changes included),
# the dependencies' wheels at the versions installed in .venv (the ones the
# tests ran with) from pip's configured index (the local mirror) or, offline,
# from the wheelhouse cached in $STOCKADE_CACHE_DIR/server-wheels; the agent's
# cffi/websockets wheels of other CPython versions from .venv/agent-wheels
# (./dev fills it). `docker build` itself runs with --network none.
#
# Cached: nothing is built when REPOSITORY:<version> carries the content label
# of what would go in (the sources, the Dockerfile, this script, the base
# image, the pinned versions, the agent wheels); it is only tagged :latest.
# Delete the image to force a build.
#
# Environment: PYTHON (default .venv/bin/python, else python3): the Python
# whose pip builds the wheels and whose installed versions are pinned.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
REPOSITORY=${1:-stockade-server}
BASE_IMAGE=stockade-base:bookworm
DOCKERFILE=$ROOT/deploy/container/Dockerfile
CACHE=${STOCKADE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stockade}
WHEELHOUSE=$CACHE/server-wheels

say() { echo "build-server-image: $*" >&2; }
die() { say "$*"; exit 1; }

case "$REPOSITORY" in
  *:* | *@*) die "give a repository without a tag ($REPOSITORY): the script tags <version> and latest" ;;
esac
if [ -n "${PYTHON:-}" ]; then :
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON=$ROOT/.venv/bin/python
else PYTHON=python3
fi
command -v "$PYTHON" >/dev/null || die "$PYTHON not found: set PYTHON to a Python 3.11 with pip"
command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
docker info >/dev/null 2>&1 ||
  die "cannot reach the Docker daemon (is dockerd running? DOCKER_HOST=${DOCKER_HOST:-unset})"

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' "$ROOT/src/stockade/__init__.py")
[ -n "$VERSION" ] || die "no __version__ = \"...\" line in src/stockade/__init__.py"
IMAGE=$REPOSITORY:$VERSION

"$ROOT/scripts/build-base-image.sh" "$BASE_IMAGE"
base_id=$(docker image inspect -f '{{.Id}}' "$BASE_IMAGE")

# What the installed dependencies are pinned to: `pip freeze` of $PYTHON,
# without Stockade itself (an editable install) nor pip's own tooling.
constraints() {
  "$PYTHON" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null |
    grep -viE '^(stockade|pip|setuptools|wheel)(==| )' | grep '==' | sort || true
}

# The content label: a digest of every input of the build.
content_digest() {
  (
    cd "$ROOT"
    echo "base $base_id"
    echo "version $VERSION"
    constraints | sed 's/^/pin /'
    find src -type f -not -path '*/__pycache__/*' -not -path '*.egg-info/*' -not -name '*.pyc' \
      -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
    # Relative names: the digest must not depend on how the script was called.
    sha256sum pyproject.toml README.md deploy/container/Dockerfile scripts/build-server-image.sh
    if [ -d .venv/agent-wheels ]; then
      find .venv/agent-wheels -maxdepth 1 -name '*.whl' -print0 | LC_ALL=C sort -z |
        xargs -0 -r sha256sum
    fi
  ) | sha256sum | cut -c1-64
}

present_content() {
  docker image inspect -f '{{index .Config.Labels "stockade.content"}}' "$IMAGE" 2>/dev/null || true
}

mkdir -p "$CACHE"
# Two concurrent builds would race on the wheelhouse and the tags.
exec 9>"$CACHE/.build-server-image.lock"
flock 9

CONTENT=$(content_digest)
if [ "$(present_content)" = "$CONTENT" ]; then
  docker tag "$IMAGE" "$REPOSITORY:latest"
  say "$IMAGE is already present (content ${CONTENT:0:12})"
  exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/stockade-server-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
context=$work/context
mkdir -p "$context/wheels" "$context/agent-wheels" "$work/src" "$work/dist" "$WHEELHOUSE"

pip() { "$PYTHON" -m pip --disable-pip-version-check "$@"; }

# Built from a copy: building in the checkout leaves build/ there and can
# carry stale modules from it into the wheel.
say "building the Stockade $VERSION wheel"
tar -C "$ROOT" -c --exclude=__pycache__ --exclude='*.egg-info' --exclude='*.pyc' \
  pyproject.toml README.md src | tar -C "$work/src" -x
pip wheel --no-deps -q -w "$work/dist" "$work/src" >"$work/pip.log" 2>&1 || {
  tail -n 30 "$work/pip.log" >&2
  die "building the Stockade wheel failed"
}
wheel=$(ls "$work"/dist/stockade-*.whl)

# The dependencies at the installed versions: from the wheelhouse alone when
# it has them all (offline), else through pip's index. pip itself too: the
# build runs it from its wheel.
constraints >"$work/constraints.txt"
pip_version=$("$PYTHON" -m pip --version | awk '{print $2}')
fetch() {
  pip wheel -q -w "$context/wheels" --find-links "$WHEELHOUSE" -c "$work/constraints.txt" \
    "$@" "$wheel" "pip==$pip_version" >"$work/pip.log" 2>&1
}
if fetch --no-index; then
  say "dependencies from the cached wheelhouse $WHEELHOUSE"
else
  say "fetching the dependencies' wheels through pip's index"
  rm -f "$context"/wheels/*
  fetch || {
    grep -v '^WARNING: Location' "$work/pip.log" | tail -n 30 >&2
    die "collecting the dependencies' wheels failed (is .venv up to date with pyproject.toml? run ./dev test once)"
  }
fi
# Only built wheels go to the wheelhouse (not ours: it changes with every edit).
find "$context/wheels" -name '*.whl' -not -name 'stockade-*' -exec cp -n {} "$WHEELHOUSE/" \;
echo "stockade==$VERSION" >"$context/wheels/requirements.txt"

if compgen -G "$ROOT/.venv/agent-wheels/*.whl" >/dev/null; then
  cp "$ROOT"/.venv/agent-wheels/*.whl "$context/agent-wheels/"
else
  say "warning: no .venv/agent-wheels (./dev fills it): workspaces on CPython other than 3.11 get no SSH"
fi

say "docker build $IMAGE (no network)"
started=$(date +%s)
docker build --network none --pull=false -q \
  -f "$DOCKERFILE" \
  --build-arg "BASE=$BASE_IMAGE" \
  --build-arg "VERSION=$VERSION" \
  --build-arg "CONTENT=$CONTENT" \
  -t "$IMAGE" -t "$REPOSITORY:latest" \
  "$context" >"$work/build.log" 2>&1 || {
  tail -n 40 "$work/build.log" >&2
  die "docker build failed"
}
# The build stage's image, and an earlier build this one replaced (both
# untagged now; a running container keeps its image).
docker image prune -f --filter label=stockade.build-stage=server-image >/dev/null
docker image prune -f --filter "label=org.opencontainers.image.title=$REPOSITORY" >/dev/null
say "$IMAGE is ready in $(($(date +%s) - started)) s ($(docker image inspect -f '{{.Size}}' "$IMAGE" |
  awk '{printf "%d MB", $1 / 1000000}'))"
