#!/usr/bin/env bash
# Training-throughput comparison: fedflow (candle) vs PyTorch on this machine's CPU.
# Installs PyTorch from PyPI into bench/.venv (not done by CI). Usage: bench/run.sh [--seq 20,100]
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
  # PyPI's Linux wheel loads its CUDA libraries at import even on CPU, so they come too
  # (several GB, once); only the CPU is measured.
  bench/.venv/bin/pip install -q torch==2.15.0 numpy
fi
echo "# fedflow (candle, fused LSTM kernel)"
cargo bench -q -p fedflow-common --bench throughput -- "${args[@]}"
echo "# PyTorch"
bench/.venv/bin/python bench/pytorch_throughput.py "${args[@]}"
