#!/usr/bin/env bash
# Training-throughput comparison: fedflow (candle) vs PyTorch on this machine's CPU.
# Installs PyTorch from PyPI into bench/.venv (not done by CI). Usage: bench/run.sh [--seq 20,100]
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
  # --no-deps: the CPU is all we measure, so skip the multi-gigabyte CUDA wheels torch lists.
  bench/.venv/bin/pip install -q --no-deps torch==2.15.0
  bench/.venv/bin/pip install -q numpy filelock typing-extensions sympy networkx jinja2 fsspec
fi
echo "# fedflow (candle, fused LSTM kernel)"
cargo bench -q -p fedflow-common --bench throughput -- "${args[@]}"
echo "# PyTorch"
bench/.venv/bin/python bench/pytorch_throughput.py "${args[@]}"
