#!/usr/bin/env bash
# Install code-server (the browser VS Code) and Chromium for the app-proxy
# tests, offline but for the package registries:
#   scripts/install-code-server.sh
#
# code-server goes to $STOCKADE_CACHE_DIR/code-server (default
# ${XDG_CACHE_HOME:-~/.cache}/stockade/code-server); its executable is
# node_modules/.bin/code-server there. Nothing happens when it is already
# installed, so CI pays the ~300 MB npm install once per machine.
#
# Two things code-server's npm install would download from GitHub are provided
# locally instead:
#  - @vscode/ripgrep fetches a prebuilt rg; its cache is seeded with Debian's
#    ripgrep binary, in the archive name and layout it looks for;
#  - the kerberos module compiles against libkrb5-dev (headers from apt).
#
# Needs root for apt-get (Chromium, ripgrep, libkrb5-dev, pkg-config) and
# Node 20 with npm already installed (Debian 12's own nodejs is 18: too old).
set -euo pipefail

# 4.100.3 is the newest code-server that runs on Node 20 (Debian 12).
CODE_SERVER_VERSION=${CODE_SERVER_VERSION:-4.100.3}
CACHE=${STOCKADE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stockade}
PREFIX=$CACHE/code-server
# @vscode/ripgrep 1.15.11 asks for this ripgrep release.
RG_CACHE_NAME=vscode-ripgrep-cache-1.15.11
RG_ARCHIVE=ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz

say() { echo "install-code-server: $*" >&2; }
die() { say "$*"; exit 1; }

missing=()
for pkg in chromium ripgrep libkrb5-dev pkg-config; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
    missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
    "${missing[@]}" >/dev/null
fi

if [ -x "$PREFIX/node_modules/.bin/code-server" ]; then
  say "code-server is already installed in $PREFIX"
  exit 0
fi

command -v npm >/dev/null || die "npm is missing: install Node 20 with npm"
major=$(node -p 'process.versions.node.split(".")[0]')
[ "$major" -ge 20 ] || die "code-server 4 needs Node 20 or newer (found $(node --version))"

# Seed the ripgrep download cache @vscode/ripgrep's postinstall reads first.
tmp=${TMPDIR:-/tmp}
rg_dir=$tmp/$RG_CACHE_NAME
mkdir -p "$rg_dir"
if [ ! -s "$rg_dir/$RG_ARCHIVE" ]; then
  staging=$(mktemp -d)
  cp "$(command -v rg)" "$staging/rg"
  tar -C "$staging" -czf "$rg_dir/$RG_ARCHIVE" rg
  rm -rf "$staging"
fi

mkdir -p "$PREFIX"
work=$(mktemp -d "$CACHE/code-server.XXXXXX")
trap 'rm -rf "$work"' EXIT
say "npm install code-server@$CODE_SERVER_VERSION in $PREFIX (a few minutes, ~300 MB)"
(
  cd "$work"
  echo '{"name":"stockade-code-server","private":true}' >package.json
  npm_config_unsafe_perm=true npm_config_yes=true npm_config_fund=false \
    npm_config_audit=false npm_config_update_notifier=false \
    npm install --no-progress --loglevel=error "code-server@$CODE_SERVER_VERSION" >&2
)
"$work/node_modules/.bin/code-server" --version >/dev/null ||
  die "code-server installed but does not run"
# Swap in atomically: a half-finished install never looks installed.
rm -rf "$PREFIX"
mv "$work" "$PREFIX"
trap - EXIT
say "installed $("$PREFIX/node_modules/.bin/code-server" --version | head -n1) in $PREFIX"
