#!/usr/bin/env bash
# Installs podman from Debian's packages for the image test (tests/tests/e2e/deploy.rs
# builds the images with deploy/container/build-local.sh). Idempotent: when podman is
# there it installs nothing and needs no network. Needs root (or sudo) and apt the first
# time. Concurrent runs wait for each other (flock). Prints podman's path on stdout.
set -euo pipefail
if command -v podman >/dev/null 2>&1; then command -v podman; exit 0; fi
lock="${XDG_CACHE_HOME:-$HOME/.cache}/fedflow/podman.lock"
mkdir -p "$(dirname "$lock")"
exec 9>"$lock"
flock 9
if command -v podman >/dev/null 2>&1; then command -v podman; exit 0; fi
command -v apt-get >/dev/null 2>&1 ||
  { echo "install-podman.sh: no apt-get: install podman yourself" >&2; exit 1; }
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 ||
    { echo "install-podman.sh: installing podman needs root (or sudo)" >&2; exit 1; }
  sudo="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -q >&2 || true
$sudo apt-get install -y -q podman >&2
command -v podman
