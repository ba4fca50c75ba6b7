#!/usr/bin/env bash
# Build the workspace base image offline, without pulling anything:
#   scripts/build-base-image.sh [IMAGE]      (default: stockade-base:bookworm)
#
# A minimal Debian 12 (debootstrap --variant=minbase, with python3, bash, git,
# ca-certificates and procps) from the apt mirror, without docs, man pages,
# translations or apt lists, with an unprivileged user "stockade" (uid 1000, home
# /home/stockade), imported into the local Docker daemon. The image runs as
# that user.
#
# Cached twice: nothing happens when the image exists, and the root file
# system is kept as a tarball in $STOCKADE_CACHE_DIR (default
# ${XDG_CACHE_HOME:-~/.cache}/stockade) so that importing it again after a
# `docker rmi` takes seconds instead of a debootstrap run. Delete the tarball
# to rebuild from the mirror.
#
# Needs Docker, and root for debootstrap (it creates device nodes and chroots).
# Environment: DEBIAN_MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

IMAGE=${1:-stockade-base:bookworm}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# rsync: `rsync -e ssh` needs it at both ends.
PACKAGES=python3,bash,git,ca-certificates,procps,rsync
# Bump when the recipe below changes, so a stale cached tarball is not reused.
RECIPE=3
CACHE=${STOCKADE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stockade}
TARBALL=$CACHE/rootfs-$SUITE-minbase-r$RECIPE.tar

say() { echo "build-base-image: $*" >&2; }
die() { say "$*"; exit 1; }

command -v docker >/dev/null || die "docker is not installed (apt-get install docker.io)"
docker info >/dev/null 2>&1 ||
  die "cannot reach the Docker daemon (is dockerd running? DOCKER_HOST=${DOCKER_HOST:-unset})"

present_recipe() {
  docker image inspect -f '{{index .Config.Labels "stockade.recipe"}}' "$IMAGE" 2>/dev/null || true
}
if [ "$(present_recipe)" = "$RECIPE" ]; then
  say "$IMAGE is already present"
  exit 0
fi

mkdir -p "$CACHE"
# Two concurrent runs would both debootstrap and race on the tarball.
exec 9>"$CACHE/.build-base-image.lock"
flock 9

build_rootfs() {
  [ "$(id -u)" -eq 0 ] ||
    die "building the root file system needs root (debootstrap creates device nodes and chroots); run: sudo $0 $IMAGE"
  command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"

  local rootfs
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/stockade-rootfs.XXXXXX")
  # A failed debootstrap can leave /proc or /sys mounted inside the root file
  # system: unmount first, and never let rm cross into a mounted file system.
  # shellcheck disable=SC2064  # expand $rootfs now: it is local to this function
  trap "
    for m in \$(awk -v r='$rootfs' 'index(\$2, r) == 1 {print \$2}' /proc/mounts | sort -r); do
      umount -l \"\$m\" 2>/dev/null || true
    done
    rm -rf --one-file-system '$rootfs'
  " EXIT

  say "debootstrap $SUITE from $MIRROR (about a minute)"
  debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || {
    tail -n 30 "$rootfs.log" >&2
    rm -f "$rootfs.log"
    die "debootstrap failed (is $MIRROR reachable?)"
  }
  rm -f "$rootfs.log"

  # Keep later `apt-get install`s in the image small too, as Debian's slim images do.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/stockade-nodoc" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
# Message translations: 44 MB; the image speaks C.UTF-8.
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
  find "$rootfs/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  find "$rootfs/usr/share/doc" -mindepth 1 -type d -empty -delete
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
  rm -rf "$rootfs"/usr/share/{man,info,groff,lintian,linda}/* \
    "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb \
    "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.bash_history
  # The container's hostname and resolver are Docker's business.
  rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"
  echo "$SUITE" >"$rootfs/etc/debian_chroot"

  chroot "$rootfs" useradd --create-home --uid 1000 --user-group --shell /bin/bash stockade

  say "caching the root file system in $TARBALL"
  tar --numeric-owner --xattrs -C "$rootfs" -cf "$TARBALL.tmp" .
  mv "$TARBALL.tmp" "$TARBALL"
}

[ -f "$TARBALL" ] || build_rootfs

say "importing $TARBALL as $IMAGE"
docker import \
  --change 'USER stockade' \
  --change 'WORKDIR /home/stockade' \
  --change 'ENV HOME=/home/stockade' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --change "LABEL stockade.recipe=$RECIPE" \
  --change "LABEL org.opencontainers.image.title=stockade-base org.opencontainers.image.description=\"Stockade workspace base image (Debian $SUITE minbase)\"" \
  "$TARBALL" "$IMAGE" >/dev/null
say "$IMAGE is ready ($(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{printf "%d MB", $1 / 1000000}'))"
