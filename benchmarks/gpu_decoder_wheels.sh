#!/usr/bin/env bash
# Packs what the GPU decoder's parity run needs into the git-ignored .gpu-wheels-decoder/: nvImageCodec for CUDA 13
# (the GPU machine's CUDA) slimmed to its CPython 3.12 binding and nvJPEG plug-in, the CUDA 13 nvJPEG library, and
# the few wheels of .gpu-wheels the decoder tests import (no Ray: they run without a cluster). The whole of
# .gpu-wheels with nvImageCodec would pass the 64 MiB a device call carries. Run here, after ../shared/tools/gpu-wheels:
#   bash benchmarks/gpu_decoder_wheels.sh
# then on the device, carrying [".gpu-wheels-decoder"]: bash benchmarks/gpu_serving_and_scan.sh decoder-parity.
# It also leaves the nvImageCodec wheel alone in .gpu-wheels-codec/: pixels-serve and pixels-scan decode through it
# when [".gpu-wheels", ".gpu-wheels-codec"] are carried.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
out="$root/.gpu-wheels-decoder"
grep -qx '/.gpu-wheels-decoder/' "$root/.git/info/exclude" 2>/dev/null ||
  echo '/.gpu-wheels-decoder/' >>"$root/.git/info/exclude"
[ -d "$root/.gpu-wheels" ] || { echo "run ../shared/tools/gpu-wheels first" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$out" "nvidia-nvimgcodec-cu13==0.9.*" "nvidia-nvjpeg==13.*" 2>&1 | grep -v '^WARNING: Location' >&2 || true
codec=$(ls "$out"/nvidia_nvimgcodec_cu13-*.whl)
# every other Python's binding, the TIFF, JPEG 2000, OpenCV, BMP, PNM and CPU JPEG plug-ins, headers and DICOM tools
zip -q -d "$codec" 'nvidia/nvimgcodec/include/*' 'nvidia/nvimgcodec/tools/*' \
  'nvidia/nvimgcodec/nvimgcodec_impl.cpython-3[!1]*' 'nvidia/nvimgcodec/nvimgcodec_impl.cpython-31[!2]*' \
  'nvidia/nvimgcodec/nvimgcodec_impl.cpython-312t*' \
  'nvidia/nvimgcodec/extensions/lib[!n]*' 'nvidia/nvimgcodec/extensions/libnv[!j]*' \
  'nvidia/nvimgcodec/extensions/libnvjpeg2k*' >/dev/null || true
for name in pydantic pydantic_core pydantic_settings annotated_types typing_inspection python_dotenv structlog; do
  cp "$root"/.gpu-wheels/"$name"-[0-9]*.whl "$out/"
done
# nvImageCodec alone, to carry beside .gpu-wheels for the serving and scan runs (.gpu-wheels-codec): with the nvJPEG
# wheel the two sets pass the 64 MiB a call carries, so those runs load the machine's nvJPEG (gpu_serving_and_scan.sh)
rm -rf "$root/.gpu-wheels-codec" && mkdir -p "$root/.gpu-wheels-codec" && cp "$codec" "$root/.gpu-wheels-codec/"
grep -qx '/.gpu-wheels-codec/' "$root/.git/info/exclude" || echo '/.gpu-wheels-codec/' >>"$root/.git/info/exclude"
unzip -l "$codec" | grep -E 'cpython|extensions/' | awk '{print "  " $4}' >&2
echo "packed $(ls "$out" | wc -l) wheels, $(du -cm "$out"/*.whl | tail -n 1 | cut -f1) MiB, into .gpu-wheels-decoder/" >&2
