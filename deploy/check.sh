#!/usr/bin/env bash
# Checks everything under deploy/ on this machine (the images built from local material,
# the Kubernetes overlays rendered and validated, the compose files and dashboard, the
# systemd units): the deploy tests of the suite, alone. Needs root for podman and chroot.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --locked -p fedflow-tests --test e2e deploy
