#!/usr/bin/env bash
# Builds fedflow's images where no base image can be pulled: each image is FROM scratch
# plus a root file system made here from local material — the binaries, the shared
# libraries `ldd` says they load (glibc and friends, copied from this machine), and
# /etc/passwd and /etc/group naming the unprivileged user 65532 — with the same user,
# ports, volumes, health check, stop signal, entrypoint and command as the Containerfile's
# distroless images. Uses podman with the vfs storage driver (no overlay or fuse needed).
#
# Usage: deploy/container/build-local.sh [--bin-dir DIR] [--rootfs-only OUT]
#   --bin-dir DIR      take the binaries from DIR (default: build them with cargo --release)
#   --rootfs-only OUT  only assemble the two root file systems under OUT (no podman)
# Prints, for each image, its name and the root file system it was built from.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin_dir="" rootfs_only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir="$2"; shift 2 ;;
    --rootfs-only) rootfs_only="$2"; shift 2 ;;
    *) echo "build-local.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ -z "$bin_dir" ]; then
  cargo build --release --locked -p fedflow-coordinator -p fedflow-client -p fedflow-sim >&2
  bin_dir="${CARGO_TARGET_DIR:-target}/release"
fi
work="${rootfs_only:-$(mktemp -d)}"
mkdir -p "$work"

# rootfs DIR BIN...: the binaries under /usr/local/bin and every library they load.
rootfs() {
  local root="$1"; shift
  rm -rf "$root"; mkdir -p "$root/usr/local/bin" "$root/etc" "$root/tmp"
  chmod 1777 "$root/tmp"
  for b in "$@"; do
    install -m 0755 "$bin_dir/$b" "$root/usr/local/bin/$b"
    # Lines like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" and the loader's
    # "/lib64/ld-linux-x86-64.so.2 (0x...)".
    ldd "$bin_dir/$b" | grep -o '/[^ ]*' | while read -r lib; do
      [ -e "$lib" ] || continue
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
  printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$root/etc/passwd"
  printf 'root:x:0:\nnonroot:x:65532:\n' > "$root/etc/group"
}

rootfs "$work/coordinator/rootfs" fedflow-coordinator fedflow-ctl
mkdir -p "$work/coordinator/rootfs/etc/fedflow" "$work/coordinator/data"
rootfs "$work/site/rootfs" fedflow-client
mkdir -p "$work/site/rootfs/etc/fedflow-site" "$work/site/data"
rootfs "$work/loadtest/rootfs" fedflow-sim
mkdir -p "$work/loadtest/data"

# The image instructions: the Containerfile's runtime stage, FROM scratch plus the root fs
# (its binaries come from rootfs/, its empty data directory from data/).
containerfile() {
  local target="$1"
  echo "FROM scratch"
  echo "COPY rootfs/ /"
  awk -v t="$target" '
    /^FROM / { on = ($0 ~ (" AS " t "$")); next }
    on && /^COPY --from=build --chown=/ { sub(/--from=build /, ""); sub(/\/out\/data\//, "data/"); print; next }
    on && /^COPY --from=build/ { next }
    on { print }' deploy/container/Containerfile
}
containerfile coordinator > "$work/coordinator/Containerfile"
containerfile site > "$work/site/Containerfile"
containerfile loadtest > "$work/loadtest/Containerfile"
if [ -n "$rootfs_only" ]; then
  for image in coordinator site loadtest; do echo "fedflow-$image:local $work/$image/rootfs"; done
  exit 0
fi

command -v podman >/dev/null 2>&1 ||
  { echo "build-local.sh: podman is needed (Debian: apt-get install podman)" >&2; exit 1; }
for image in coordinator site loadtest; do
  podman --storage-driver=vfs build --quiet --format docker \
    -t "fedflow-$image:local" -f "$work/$image/Containerfile" "$work/$image" >&2
  echo "fedflow-$image:local $work/$image/rootfs"
done
# The images these names pointed to before: dangling now, and vfs keeps whole copies.
podman --storage-driver=vfs image prune -f >/dev/null
