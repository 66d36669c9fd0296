#!/usr/bin/env bash
# The GPU path's check, on a machine with an NVIDIA GPU and no Rust toolchain: run from the
# folder bench/cuda/build.sh fills (it copies this script there). A few minutes in all.
#   1. device_check: logits, a training run and a DP-SGD run of each encoder on the GPU
#      against the CPU (JSON lines; fails if any differs beyond float tolerance);
#   2. throughput: LSTM training at batch 64 and 256, lengths 20 and 100, on the GPU and on the
#      CPU; GRU and Transformer on the GPU; DP-SGD on the GPU;
#   3. PyTorch on the same GPU, when the machine's python has torch (bench/pytorch_throughput.py
#      copied next to this script).
# Usage: device-check.sh [RESULTS_DIR]   (default ./results); writes device-check.json there.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
results=${1:-$here/results}
mkdir -p "$results"
# CUDA's libraries: the bundled runtime, then whatever the machine's NVIDIA wheels or toolkit
# provide (cuBLAS and cuRAND are loaded at run time; PyTorch's wheels carry them).
libs="$here/lib"
for d in $(python3 -c 'import nvidia, glob, os; print(" ".join(sorted(glob.glob(os.path.join(nvidia.__path__[0], "*", "lib")))))' 2>/dev/null) \
         /usr/local/cuda/lib64 /usr/lib/x86_64-linux-gnu; do
  [ -d "$d" ] && libs="$libs:$d"
done
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$results/gpu.txt" 2>&1

status=0
exec > >(tee "$results/device-check.log") 2>&1
echo "# device_check"
timeout 300 "$here/device_check" --device cuda:0 || status=1
echo "# throughput, LSTM, GPU then CPU"
timeout 300 "$here/throughput" --device cuda:0 --batch 64,256 --seq 20,100 --steps 20 || status=1
timeout 300 "$here/throughput" --device cpu --batch 64,256 --seq 20,100 --steps 20 || status=1
for enc in gru transformer; do
  echo "# throughput, $enc, GPU"
  timeout 120 "$here/throughput" --device cuda:0 --encoder "$enc" --batch 64 --seq 20,100 --steps 20 || status=1
done
echo "# DP-SGD, GPU"
timeout 300 "$here/throughput" --device cuda:0 --dp --batch 64 --seq 20,100 --steps 10 || status=1
if [ -f "$here/pytorch_throughput.py" ] && python3 -c 'import torch; assert torch.cuda.is_available()' 2>/dev/null; then
  echo "# PyTorch, GPU"
  timeout 300 python3 "$here/pytorch_throughput.py" --device cuda --batch 64 --seq 20,100 --steps 20 || status=1
  timeout 300 python3 "$here/pytorch_throughput.py" --device cuda --batch 256 --seq 20,100 --steps 20 || status=1
fi
# Every JSON line, one array.
python3 - "$results" <<'PY'
import json, sys
rows = []
for line in open(sys.argv[1] + "/device-check.log"):
    line = line.strip()
    if line.startswith("{"):
        try:
            rows.append(json.loads(line))
        except ValueError:
            pass
json.dump({"gpu": open(sys.argv[1] + "/gpu.txt").read().strip(), "rows": rows},
          open(sys.argv[1] + "/device-check.json", "w"), indent=1)
PY
exit $status
