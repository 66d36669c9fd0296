#!/usr/bin/env bash
# fedflow (candle) vs PyTorch on this machine's CPU, side by side in one sitting.
# Installs PyTorch from PyPI into bench/.venv (not done by CI).
# Usage: bench/run.sh [--seq 20,100]   training throughput
#        bench/run.sh serving           the site agent's predictions vs PyTorch eval mode
set -euo pipefail
cd "$(dirname "$0")/.."
mode=train
if [ "${1:-}" = serving ]; then mode=serving; shift; fi
args=("$@")
if [ ! -x bench/.venv/bin/python ]; then
  python3 -m venv bench/.venv
  # PyPI's Linux wheel loads its CUDA libraries at import even on CPU, so they come too
  # (several GB, once); only the CPU is measured.
  bench/.venv/bin/pip install -q torch==2.15.0 numpy
fi
if [ "$mode" = serving ]; then
  echo "# fedflow site agent (candle)"
  cargo bench -q -p fedflow-client --bench serving
  echo "# PyTorch, eval mode"
  # The bench's vocabulary: the generator's 34 event names and the 2 reserved ids.
  bench/.venv/bin/python bench/pytorch_serving.py --vocab 36 "${args[@]}"
  exit 0
fi
echo "# fedflow (candle, fused LSTM kernel)"
cargo bench -q -p fedflow-common --bench throughput -- "${args[@]}"
echo "# PyTorch"
bench/.venv/bin/python bench/pytorch_throughput.py "${args[@]}"
