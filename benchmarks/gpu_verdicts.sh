#!/usr/bin/env bash
# The GPU machine's rows of the verdicts benchmark (benchmarks/verdicts.py): `aipd train --gpu` with every default,
# one mode per device call (each fits in one call's 10 minutes); logs and JSON land in $OUT. Run from the repository
# root with .gpu-wheels carried:
#   bash benchmarks/gpu_verdicts.sh seeds 1   # one seed: fits a call with minutes to spare (two side by side need
#                                             # most of its 600 s; the default, seeds 0 1 2, passes it)
#   bash benchmarks/gpu_verdicts.sh lofo    # one run per generator family, trained without it and tested on it
#   bash benchmarks/gpu_verdicts.sh augment # stronger augmentation, and one degradation on every photo (its oracle)
set -uo pipefail
mode=${1:?seeds or lofo}
out=${OUT:-/tmp/out}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels/*.whl
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
case "$mode" in
seeds)
  seeds=${2:-0 1 2}
  # shellcheck disable=SC2086 # one argument per seed
  timeout 560 python3 benchmarks/verdicts.py default --seeds $seeds --gpu --parallel 3 --file-store --out "$out/seeds"
  ;;
lofo) timeout 560 python3 benchmarks/verdicts.py leave-one-out --gpu --parallel 4 --file-store --out "$out/lofo" ;;
augment)
  a=TRAIN__AUGMENT__
  timeout 560 python3 benchmarks/verdicts.py variants --gpu --parallel 4 --file-store --out "$out/augment" \
    "strong=${a}BLUR_PROB=0.5,${a}DOWNSCALE_PROB=0.5,${a}JPEG_PROB=0.6" \
    "every-blur=${a}BLUR_PROB=1.0,${a}DOWNSCALE_PROB=0,${a}JPEG_PROB=0" \
    "every-downscale=${a}BLUR_PROB=0,${a}DOWNSCALE_PROB=1.0,${a}JPEG_PROB=0" \
    "every-jpeg=${a}BLUR_PROB=0,${a}DOWNSCALE_PROB=0,${a}JPEG_PROB=1.0"
  ;;
*) echo "unknown mode $mode" >&2; exit 2 ;;
esac
status=$?
# the runs' own logs beside the table: where a run failed, its last lines say why
for log in "$out"/*/*.log; do echo "== $log"; tail -n 5 "$log"; done
exit $status
