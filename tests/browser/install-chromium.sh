#!/usr/bin/env bash
# Installs headless Chromium from Debian's packages for the run report's rendering test
# (sim/tests/many_sites.rs renders the report into a screenshot). Idempotent: when a
# Chromium is already there (or $FEDFLOW_CHROMIUM names one) it installs nothing and needs
# no network. Needs root (or sudo) and apt the first time. Concurrent runs wait for each
# other (flock). Prints the browser's path on stdout, all else on stderr.
set -euo pipefail

find_browser() {
  if [ -n "${FEDFLOW_CHROMIUM:-}" ] && [ -x "$FEDFLOW_CHROMIUM" ]; then echo "$FEDFLOW_CHROMIUM"; return 0; fi
  for b in chromium chromium-browser google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then command -v "$b"; return 0; fi
  done
  return 1
}

if find_browser; then exit 0; fi

lock="${XDG_CACHE_HOME:-$HOME/.cache}/fedflow/chromium.lock"
mkdir -p "$(dirname "$lock")"
exec 9>"$lock"
flock 9
if find_browser; then exit 0; fi

command -v apt-get >/dev/null 2>&1 ||
  { echo "install-chromium.sh: no apt-get: install Chromium yourself and set FEDFLOW_CHROMIUM to it" >&2; exit 1; }
sudo=""
if [ "$(id -u)" != 0 ]; then
  command -v sudo >/dev/null 2>&1 ||
    { echo "install-chromium.sh: installing Chromium needs root (or sudo)" >&2; exit 1; }
  sudo="sudo"
fi
echo "install-chromium.sh: installing chromium from the Debian packages (once)" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq >&2
$sudo apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >&2
find_browser
