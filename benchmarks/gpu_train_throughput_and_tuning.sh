#!/usr/bin/env bash
# GPU machine: training throughput with the steady-state metric (1 GPU, then all GPUs), then the
# tuning benchmark on ONE GPU (CUDA_VISIBLE_DEVICES=0). Logs and JSON under $1.
set -uo pipefail
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
bash benchmarks/gpu_train_throughput.sh "$out"
CUDA_VISIBLE_DEVICES=0 timeout 330 python3 benchmarks/tune_gpu.py --out "$out/tune_gpu.json" > "$out/tune_gpu.log" 2>&1
echo "tune exit $?"; grep -E '^\||^[{}]|^  "' "$out/tune_gpu.log" | tail -30
