"""The GPU JPEG decoders against libjpeg-turbo: how far each one's pixels are from the CPU path's, and how fast.

Why: the service, the scan and training decode with libjpeg-turbo (Pillow), and a detector that reads the high-pass
residual answers nvJPEG's pixels differently (benchmarks/RESULTS.md, "The GPU pixel path"). torchvision's CUDA
`decode_jpeg` runs nvJPEG with its default, nearest-neighbour chroma upsampling; nvImageCodec with
`:fancy_upsampling=1` interpolates as libjpeg-turbo does. For photos of 4:2:0, 4:2:2 and 4:4:4 chroma at several sizes:
the mean absolute difference per channel from libjpeg-turbo, the largest, and the batched decode rate (64 a batch).

    GPU machine:  python3 benchmarks/gpu_decoders.py   (needs .gpu-wheels-decoder: benchmarks/gpu_decoder_wheels.sh)
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def photos(subsampling: int, count: int = 64) -> list[bytes]:
    """Photo-like JPEGs (smooth colour, sensor-like noise) of 256-1024 px, quality 90, with this chroma subsampling
    (Pillow's 0 = 4:4:4, 1 = 4:2:2, 2 = 4:2:0)."""
    from PIL import Image

    rng = np.random.default_rng(subsampling)
    out = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(256, 1025, 2))
        coarse = rng.integers(0, 256, (max(2, height // 32), max(2, width // 32), 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
        pixels = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG", quality=90, subsampling=subsampling)
        out.append(buffer.getvalue())
    return out


def main() -> None:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    from app.pixels import INTERPOLATED_CHROMA, decode_interpolated, interpolating_decoder

    cuda = torch.device("cuda")
    codec = interpolating_decoder(cuda)
    decoders = {"nvJPEG (torchvision)": lambda encoded: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=cuda)}
    if codec is not None:
        from nvidia import nvimgcodec

        decoders["nvImageCodec, interpolated chroma"] = lambda encoded: decode_interpolated(codec, encoded, cuda)
        # the same without the card's JPEG engine (H100/H200 have one), which may not honour fancy_upsampling
        kinds = (nvimgcodec.BackendKind.GPU_ONLY, nvimgcodec.BackendKind.HYBRID_CPU_GPU)
        cuda_only = nvimgcodec.Decoder(
            device_id=0, backends=[nvimgcodec.Backend(kind) for kind in kinds], options=INTERPOLATED_CHROMA
        )
        decoders["nvImageCodec, CUDA decoders only"] = lambda encoded: decode_interpolated(cuda_only, encoded, cuda)
    else:
        print("nvImageCodec is not installed: only torchvision's nvJPEG is measured", flush=True)
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    rows = []
    for subsampling, name in ((2, "4:2:0"), (1, "4:2:2"), (0, "4:4:4")):
        data = photos(subsampling)
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        reference = [decode_jpeg(e, mode=ImageReadMode.RGB).numpy().astype(np.int16) for e in encoded]
        for decoder_name, decode in decoders.items():
            decode(encoded[:4])  # the first call's setup is not the rate
            torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(5):
                images = decode(encoded)
            torch.cuda.synchronize()
            rate = 5 * len(encoded) / (time.perf_counter() - started)
            diffs = [np.abs(i.cpu().numpy().astype(np.int16) - r) for i, r in zip(images, reference, strict=True)]
            gaps = np.stack([d.mean(axis=(1, 2)) for d in diffs])
            largest = max(int(d.max()) for d in diffs)
            rows.append((name, decoder_name, gaps.mean(axis=0), largest, rate))
    print("\n| chroma | GPU decoder | mean gap R / G / B (grey levels) | largest gap | img/s (batches of 64) |")
    print("| --- | --- | --- | ---: | ---: |")
    for name, decoder_name, gap, largest, rate in rows:
        print(f"| {name} | {decoder_name} | {gap[0]:.2f} / {gap[1]:.2f} / {gap[2]:.2f} | {largest} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
