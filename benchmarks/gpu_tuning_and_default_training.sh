#!/usr/bin/env bash
# GPU machine: the tuning benchmark on ONE GPU, then `aipd train --gpu` on the demo data (built there).
set -uo pipefail
out=${1:-/tmp/out}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/tune_gpu.py --out "$out/tune_gpu.json" > "$out/tune_gpu.log" 2>&1
echo "tune exit $?"; grep -E '^\|' "$out/tune_gpu.log" | tail -12
export AIPD_WORK_DIR=/tmp/aipd-gpu-demo
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m aipd.cli train --gpu --batch-size 64 > "$out/train_gpu.log" 2>&1
echo "train exit $?"; grep -A30 "test split" "$out/train_gpu.log" | grep -vE "^\s*$" | head -30
