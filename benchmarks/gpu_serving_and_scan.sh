#!/usr/bin/env bash
# The GPU machine's measurements for serving at GPU speed and the catalog scan, one mode per device call (each fits
# in one call's 10 minutes); every log and JSON lands in $OUT. Run from the repository root with .gpu-wheels carried:
#   bash benchmarks/gpu_serving_and_scan.sh serving   # load benchmark on one GPU: noop, plain, unbatched, batched, default
#   bash benchmarks/gpu_serving_and_scan.sh scan      # scan vs model-only, decode ceiling and DataLoader; then the GPU tests
#   bash benchmarks/gpu_serving_and_scan.sh scaling   # on a machine of N GPUs: serving and scan with 1 GPU and with N
#   bash benchmarks/gpu_serving_and_scan.sh after     # serving again (noop, plain, batched) after a change, then the scan mode
# The GPU pixel path (decoding on the GPU), one call each, every baseline in the same call:
#   bash benchmarks/gpu_serving_and_scan.sh pixels-serve  # decoders, GPU tests; colocated CPU decode vs no flags
#   bash benchmarks/gpu_serving_and_scan.sh pixels-scan   # 100,000 photos: the ceilings, DataLoader, the default scan
#   bash benchmarks/gpu_serving_and_scan.sh pixels-train  # model-only, DataLoader, the default (tasks decode)
# SCAN_STEPS=...,scan_queued adds the default scan with 8 batches queued on the model actor (Ray Data's default: 2);
# scan_uncapped and scan_queued_uncapped the same without Ray Data's downstream-capacity backpressure.
# scan_files32, scan_files128 and scan_files256 the default scan with that many files per reading task;
# SCAN_FILES sets the catalog's size (100,000).
# SERVE_TARGETS, SCAN_STEPS and TRAIN_ONLY add the GPU-decoding variants (colocated_gpu; gpu_decode,scan_gpu,
# scan_shared; d), which leave photos with clipped colour to the CPU (app.chroma): on the benchmarks' photos, all.
# The GPU decoders against libjpeg-turbo, carrying [".gpu-wheels-decoder"] instead (benchmarks/gpu_decoder_wheels.sh):
#   bash benchmarks/gpu_serving_and_scan.sh decoders        # pixel gaps and rates of the GPU decoders and the CPU threads
#   bash benchmarks/gpu_serving_and_scan.sh decoder-parity  # the same, then the GPU decoder tests
set -uo pipefail
mode=${1:?serving, scan, after, scaling, pixels-serve, pixels-scan, pixels-train, decoders or decoder-parity}
out=${OUT:-/tmp/out}
mkdir -p "$out"
wheels=.gpu-wheels
case "$mode" in decoder-parity | decoders) wheels=.gpu-wheels-decoder ;; esac
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$wheels"/*.whl
if [ -d .gpu-wheels-codec ]; then  # nvImageCodec carried beside .gpu-wheels: the GPU decodes through it
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu-wheels-codec/*.whl
fi
if [ -d /tmp/site/nvidia/nvimgcodec ]; then
  # the CUDA 13 nvJPEG that nvImageCodec loads: carried in .gpu-wheels-decoder, else the machine's CUDA toolkit's,
  # else the copy torchvision bundles under a hashed name (linked as the name nvImageCodec asks for)
  vision_libs=$(python3 -c "import pathlib, torchvision; print(pathlib.Path(torchvision.__file__).parents[1] / 'torchvision.libs')")
  bundled=$(ls "$vision_libs"/libnvjpeg*.so.13 2>/dev/null | head -n 1)
  [ -n "$bundled" ] && mkdir -p /tmp/nvjpeg && ln -sf "$bundled" /tmp/nvjpeg/libnvjpeg.so.13
  nvjpeg=
  for candidate in /tmp/site/nvidia/cu13/lib/libnvjpeg.so.13 /usr/local/cuda/lib64/libnvjpeg.so.13 \
    /usr/local/cuda/targets/x86_64-linux/lib/libnvjpeg.so.13 /tmp/nvjpeg/libnvjpeg.so.13; do
    [ -z "$nvjpeg" ] && [ -e "$candidate" ] && nvjpeg=$candidate
  done
  [ -n "$nvjpeg" ] && export LD_LIBRARY_PATH=$(dirname "$nvjpeg"):${LD_LIBRARY_PATH:-}
  echo "nvJPEG for nvImageCodec: ${nvjpeg:-none found}"
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
# MLflow there is mlflow-skinny: no SQLite store, a file store instead.
export MLFLOW_ALLOW_FILE_STORE=true AIPD_MLFLOW_TRACKING_URI=file:///tmp/mlruns
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
nproc | tee -a "$out/gpu.txt"
quiet() { grep -v -E "INFO|WARNING|^\s*$|core_worker.cc|Downloading artifacts" || true; }

case "$mode" in
serving)
  python3 benchmarks/serve_load.py --device cuda --targets hops,noop,plain,unbatched,batched,default \
    --concurrency 1,8,32,64,128 --duration 5 --warmup 2 --client-procs 6 --ingress-replicas 8 \
    --max-batch-size 64 --check-at 64 --json-out "$out/serve_load.json" 2>&1 | tee "$out/serve_load.log" | quiet
  ;;
after)
  python3 benchmarks/serve_load.py --device cuda --targets noop,plain,batched \
    --concurrency 1,8,32,64,128 --duration 5 --warmup 2 --client-procs 6 --ingress-replicas 8 \
    --max-batch-size 64 --check-at 64 --json-out "$out/serve_load_after.json" 2>&1 | tee "$out/serve_load_after.log" | quiet
  python3 benchmarks/scan_throughput.py --device cuda --files 20000 --gpus 1 --batch 256 \
    --json-out "$out/scan.json" 2>&1 | tee "$out/scan.log" | quiet
  timeout 150 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu -k "not ray_train" 2>&1 | tail -15 \
    | tee "$out/gpu_tests.log"
  ;;
scan)
  python3 benchmarks/scan_throughput.py --device cuda --files 20000 --gpus 1 --batch 256 \
    --json-out "$out/scan.json" 2>&1 | tee "$out/scan.log" | quiet
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu 2>&1 | tail -15 | tee "$out/gpu_tests.log"
  ;;
pixels-serve)
  # the decoders' pixel gaps and rates (nvImageCodec's rows only where .gpu-wheels-decoder was carried), then the GPU
  # tests with the parity ones (a wrong GPU decode would make the numbers after it meaningless), then the service
  timeout 120 python3 benchmarks/gpu_decoders.py 2>&1 | tee "$out/decoders.log"
  timeout 200 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu 2>&1 | tail -40 | tee "$out/gpu_tests.log"
  # 8 colocated replicas on 16 cores decoding on their CPUs against what `aipd serve` with no flags builds
  timeout 240 python3 benchmarks/serve_load.py --device cuda --targets "${SERVE_TARGETS:-noop,colocated_cpu,sized}" \
    --concurrency 1,64,128 --duration 5 --warmup 2 --client-procs 6 --ingress-replicas 8 \
    --max-batch-size 64 --check-at 64 --json-out "$out/serve_pixels.json" 2>&1 | tee "$out/serve_pixels.log" | quiet
  ;;
pixels-scan)
  timeout 580 python3 benchmarks/scan_throughput.py --device cuda --files "${SCAN_FILES:-100000}" --gpus 1 --batch 256 \
    --steps "${SCAN_STEPS:-model,decode,read,dataloader,scan}" \
    --json-out "$out/scan_pixels.json" 2>&1 | tee "$out/scan_pixels.log" | quiet
  ;;
pixels-train)
  timeout 560 python3 benchmarks/train_throughput.py --files "${TRAIN_FILES:-20000}" --gpus 1 --epochs 3 --only "${TRAIN_ONLY:-abc}" \
    --out "$out/train_pixels.json" 2>&1 | tee "$out/train_pixels.log" | grep -E "^\(|^\||^data"
  ;;
decoders)
  timeout 240 python3 benchmarks/gpu_decoders.py 2>&1 | tee "$out/decoders.log"
  ;;
decoder-parity)
  timeout 240 python3 benchmarks/gpu_decoders.py 2>&1 | tee "$out/decoders.log"
  timeout 300 python3 -m pytest -q -s -p no:cacheprovider -m gpu tests/gpu -k decoder 2>&1 | tail -30 \
    | tee "$out/decoder_tests.log"
  ;;
scaling)
  gpus=$(nvidia-smi -L | wc -l)
  for n in 1 "$gpus"; do
    python3 benchmarks/serve_load.py --device cuda --targets noop,batched --replicas "$n" \
      --ingress-replicas $((8 * n)) --concurrency 64,128 --duration 4 --warmup 2 --client-procs $((6 * n)) \
      --max-batch-size 64 --check-at 128 --json-out "$out/serve_r$n.json" 2>&1 | tee "$out/serve_r$n.log" | quiet
  done
  python3 benchmarks/scan_throughput.py --device cuda --files 12000 --gpus 1 --steps model,decode,scan \
    --json-out "$out/scan_g1.json" 2>&1 | tee "$out/scan_g1.log" | quiet
  python3 benchmarks/scan_throughput.py --device cuda --files 12000 --gpus "$gpus" --steps scan \
    --json-out "$out/scan_g$gpus.json" 2>&1 | tee "$out/scan_g$gpus.log" | quiet
  ;;
esac
