#!/usr/bin/env bash
# Builds fedflow with `--features cuda` on a machine with no GPU and no CUDA install: NVIDIA's
# compiler, headers and runtime come from PyPI (bench/cuda/requirements.txt) into a cache folder.
# The CPU build and .ci/run never need any of this.
#
# Usage: bench/cuda/build.sh [OUT]     (OUT defaults to target-cuda/device)
#   CUDA_COMPUTE_CAP   the GPU generation to compile kernels for (default 90: H100/H200;
#                      80 for A100, 89 for L4/L40, 120 for Blackwell workstation cards)
#   FEDFLOW_CUDA_CACHE where the toolkit goes (default ~/.cache/fedflow/cuda)
#   CARGO_TARGET_DIR   the cargo target folder (default ~/.cache/fedflow/target-cuda)
#
# It builds the site client with CUDA (target release/fedflow-client) and leaves in OUT what a
# GPU machine needs to check the GPU path with no Rust toolchain there: the device-check and
# throughput benches (stripped), CUDA's runtime library, and bench/cuda/device-check.sh; and the
# same folder packed as OUT.tar.xz. The libraries cudarc links against come from PyPI too
# (requirements.txt); the driver's libcuda is linked against a stub generated from cuda.h.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-target-cuda/device}
cache=${FEDFLOW_CUDA_CACHE:-$HOME/.cache/fedflow/cuda}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/fedflow/target-cuda}

if [ ! -x "$cache/venv/bin/python" ]; then python3 -m venv "$cache/venv"; fi
"$cache/venv/bin/pip" install -q --disable-pip-version-check -r bench/cuda/requirements.txt
# The CUDA 13 wheels all unpack into one toolkit-shaped folder, nvidia/cu13.
root=$("$cache/venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
[ -x "$root/bin/nvcc" ] || { echo "no nvcc in $root" >&2; exit 1; }
# Linking wants the unversioned names of the libraries (libcublas.so -> libcublas.so.13, ...).
for lib in "$root"/lib/lib*.so.[0-9]*; do
  base=${lib##*/}
  case $base in *.so.*.*) continue ;; esac
  ln -sf "$base" "$root/lib/${base%%.so.*}.so"
done
# libcuda belongs to the driver, which a build machine has not got: link against a stub that
# defines every driver function cuda.h declares (names after its versioning macros) under the
# driver's soname, so the binary loads the real libcuda.so.1 wherever it runs.
if [ ! -f "$root/lib/stubs/libcuda.so" ]; then
  mkdir -p "$root/lib/stubs"
  gcc -E -P -I"$root/include" "$root/include/cuda.h" \
    | grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d '( \t' | sort -u \
    | sed 's/.*/void &(void) {}/' > "$root/lib/stubs/libcuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$root/lib/stubs/libcuda-stub.c"
fi

export CUDA_HOME=$root PATH="$root/bin:$PATH"
export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
# cudarc names a toolkit MAJOR0MINOR0 (13.0 -> 13000).
release=$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\),.*/\1/p')
export CUDARC_CUDA_VERSION="${release%.*}0${release#*.}0"
echo "# nvcc $release from $root, kernels for sm_$CUDA_COMPUTE_CAP, cudarc $CUDARC_CUDA_VERSION"

cargo build --release --locked --features cuda -p fedflow-client --bin fedflow-client
cargo bench --locked --features cuda -p fedflow-common --bench throughput --bench device_check --no-run \
  --message-format=json 2>/dev/null \
  | "$cache/venv/bin/python" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["kind"] == ["bench"] and m.get("executable"):
        print(m["target"]["name"], m["executable"])' > "$CARGO_TARGET_DIR/benches.txt"

mkdir -p "$out/lib"
while read -r name exe; do
  cp "$exe" "$out/$name"
  strip "$out/$name"
done < "$CARGO_TARGET_DIR/benches.txt"
cp -L "$root/lib/libcudart.so.13" "$out/lib/"
cp bench/cuda/device-check.sh bench/pytorch_throughput.py "$out/"
# The CUDA binaries are large (kernels for the GPU inside); packed, they travel far lighter.
tar cJf "$out.tar.xz" -C "$(dirname "$out")" "$(basename "$out")"
ls -la "$out" "$out.tar.xz"
