#!/usr/bin/env bash
# Runs the training-throughput benchmark on the GPU machine: 1 GPU (a, b, c), then c on every GPU for scaling.
# Usage there (after installing .gpu-wheels): bash benchmarks/gpu_train_throughput.sh "$OUT"
set -uo pipefail
out=${1:-/tmp/out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 RAY_DEDUP_LOGS=1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
python3 benchmarks/train_throughput.py --files 20000 --gpus 1 --epochs 3 --out "$out/train_1gpu.json" 2>&1 | tee "$out/train_1gpu.log" | grep -E "^\(|^\||^data"
if [ "$gpus" -gt 1 ]; then
  python3 benchmarks/train_throughput.py --files 20000 --gpus "$gpus" --epochs 3 --only c --out "$out/train_${gpus}gpu.json" 2>&1 | tee "$out/train_${gpus}gpu.log" | grep -E "^\(|^\||^data"
fi
