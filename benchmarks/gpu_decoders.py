"""The GPU JPEG decoders against libjpeg-turbo: how far each one's pixels are from the CPU path's, and how fast.

Why: the service, the scan and training decode with libjpeg-turbo (Pillow), and a detector that reads the high-pass
residual answers nvJPEG's pixels differently (benchmarks/RESULTS.md, "The GPU pixel path"). torchvision's CUDA
`decode_jpeg` runs nvJPEG with its default, nearest-neighbour chroma upsampling; `app.chroma` rebuilds
libjpeg-turbo's interpolated chroma from it; nvImageCodec with `:fancy_upsampling=1` interpolates in the decoder. For
photos of 4:2:0, 4:2:2 and 4:4:4 chroma at several sizes: the mean absolute difference per channel from
libjpeg-turbo, the largest, and the batched decode rate (64 and 256 a batch); then `app.pixels.decode_crops`, the
path the service and the scan take, against the CPU path's crops.

    GPU machine:  python3 benchmarks/gpu_decoders.py   (nvImageCodec: .gpu-wheels-decoder, gpu_decoder_wheels.sh)
"""

from __future__ import annotations

import functools
import io
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

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


LAYOUTS = {2: (2, 2), 1: (2, 1), 0: None}  # Pillow's subsampling -> what `app.chroma` rebuilds (4:4:4: nothing)
INTERPOLATED_CHROMA = ":fancy_upsampling=1"  # nvImageCodec's option for libjpeg-turbo's chroma upsampling


def nvimgcodec_variants(cuda: Any) -> dict[str, Callable[[list[Any]], list[Any]]]:
    """nvImageCodec with libjpeg-turbo's chroma, four ways: its default back-ends; the CUDA decoders only (no JPEG
    engine, which may not honour the chroma option); the CUDA decoders with Huffman decoding on the GPU for every
    size (by default photos under a megapixel are Huffman-decoded on its CPU threads); the card's JPEG engine only."""
    try:
        from nvidia import nvimgcodec
    except ImportError:
        print("nvImageCodec is not installed: its rows are left out", flush=True)
        return {}

    def made(kinds: tuple[Any, ...] | None, options: str = "") -> Callable[[list[Any]], list[Any]]:
        @functools.cache
        def decoder() -> Any:  # made at the first call, so a back-end the card lacks fails inside the measurement
            backends = None if kinds is None else [nvimgcodec.Backend(kind) for kind in kinds]
            return nvimgcodec.Decoder(device_id=0, backends=backends, options=INTERPOLATED_CHROMA + options)

        def decode(encoded: list[Any]) -> list[Any]:
            import torch

            streams = [nvimgcodec.CodeStream(bytes(t.numpy())) for t in encoded]
            params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)
            stream = torch.cuda.current_stream(cuda).cuda_stream
            images = decoder().decode(streams, params=params, cuda_stream=stream)
            if any(image is None for image in images):
                raise ValueError("nvImageCodec could not decode a JPEG of the batch")
            return [torch.from_dlpack(image).to(cuda).permute(2, 0, 1).contiguous() for image in images]

        return decode

    cuda_kinds = (nvimgcodec.BackendKind.GPU_ONLY, nvimgcodec.BackendKind.HYBRID_CPU_GPU)
    return {
        "nvImageCodec, interpolated chroma": made(None),
        "nvImageCodec, CUDA decoders only": made(cuda_kinds),
        "nvImageCodec, CUDA, GPU Huffman": made(cuda_kinds, " nvjpeg_cuda_decoder:hybrid_huffman_threshold=0"),
        "nvImageCodec, JPEG engine only": made((nvimgcodec.BackendKind.HW_GPU_ONLY,)),
    }


def rebuilt_chroma(cuda: Any, subsampling: int) -> Callable[[list[Any]], list[Any]]:
    """torchvision's nvJPEG, then `app.chroma` on each whole photo (the crops of `app.pixels` rebuild a window); a
    photo whose hidden chroma it leaves is decoded on the CPU (one thread) and moved, as `app.pixels` does."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from app.chroma import interpolated_image

    layout = LAYOUTS[subsampling]

    def decode(encoded: list[Any]) -> list[Any]:
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=cuda)
        if layout is None:
            return images
        rebuilt = [interpolated_image(image, layout) for image in images]
        return [
            decode_jpeg(e, mode=ImageReadMode.RGB).to(cuda) if image is None else image
            for image, e in zip(rebuilt, encoded, strict=True)
        ]

    return decode


def left_to_cpu(encoded: list[Any], subsampling: int, cuda: Any) -> int:
    """How many of these photos `app.chroma` does not rebuild whole (a sample that clipping hides moves pixels)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from app.chroma import interpolated_image

    layout = LAYOUTS[subsampling]
    if layout is None:
        return 0
    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=cuda)
    return sum(interpolated_image(image, layout) is None for image in images)


def main() -> None:
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    cuda = torch.device("cuda")
    decoders = {"nvJPEG (torchvision)": lambda encoded: decode_jpeg(encoded, mode=ImageReadMode.RGB, device=cuda)}
    decoders.update(nvimgcodec_variants(cuda))
    threads = ThreadPoolExecutor(os.cpu_count() or 1)
    decoders[f"libjpeg-turbo, {os.cpu_count()} CPU threads"] = lambda encoded: list(
        threads.map(lambda e: decode_jpeg(e, mode=ImageReadMode.RGB), encoded)
    )
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}", flush=True)
    rows = []
    for subsampling, name in ((2, "4:2:0"), (1, "4:2:2"), (0, "4:4:4")):
        data = photos(subsampling)
        encoded = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in data]
        reference = [decode_jpeg(e, mode=ImageReadMode.RGB).numpy().astype(np.int16) for e in encoded]
        rebuilt = {"nvJPEG, chroma rebuilt (app.chroma, whole photos)": rebuilt_chroma(cuda, subsampling)}
        for decoder_name, decode in {**decoders, **rebuilt}.items():
            try:
                images, rates = measured(decode, encoded)
            except (RuntimeError, ValueError) as error:  # a back-end the card lacks is a line, not the end of the run
                print(f"{name} {decoder_name}: {type(error).__name__}: {error}", flush=True)
                continue
            if decoder_name in rebuilt:
                decoder_name += f" ({left_to_cpu(encoded, subsampling, cuda)}/{len(encoded)} left to the CPU)"
            diffs = [np.abs(i.cpu().numpy().astype(np.int16) - r) for i, r in zip(images, reference, strict=True)]
            gaps = np.stack([d.mean(axis=(1, 2)) for d in diffs])
            largest = max(int(d.max()) for d in diffs)
            rows.append((name, decoder_name, gaps.mean(axis=0), largest, rates))
    print("\n| chroma | decoder | mean gap R / G / B (grey levels) | largest gap | img/s, batches of 64 | of 256 |")
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for name, decoder_name, gap, largest, (rate, rate_256) in rows:
        print(
            f"| {name} | {decoder_name} | {gap[0]:.2f} / {gap[1]:.2f} / {gap[2]:.2f} | {largest} | {rate:,.0f} "
            f"| {rate_256:,.0f} |"
        )
    crop_rates()


def crop_rates(crop_size: int = 224) -> None:
    """`app.pixels.decode_crops` as the service and the scan call it (header checks, nvJPEG, the chroma rebuilt in
    a window around each crop), against the CPU path's crops of the same photos."""
    import torch

    from app.config import ImageLimits
    from app.pixels import cpu_crop, decode_crops

    limits = ImageLimits()
    print(
        "\n| chroma | `decode_crops`, 224-px crops: mean gap R / G / B | largest gap | img/s, batches of 64 | of 256 |"
    )
    print("| --- | --- | ---: | ---: | ---: |")
    for subsampling, name in ((2, "4:2:0"), (1, "4:2:2"), (0, "4:4:4")):
        data = photos(subsampling)
        crops, rates = measured(lambda batch: decode_crops(batch, crop_size, "cuda", limits), data)
        on_gpu = sum(isinstance(crop, torch.Tensor) for crop in crops)
        diffs = [
            np.abs(torch.as_tensor(c).cpu().numpy().astype(np.int16) - cpu_crop(d, crop_size, limits))
            for c, d in zip(crops, data, strict=True)
        ]
        gap = np.stack([d.mean(axis=(0, 1)) for d in diffs]).mean(axis=0)
        print(
            f"| {name} ({on_gpu}/{len(data)} on the GPU) | {gap[0]:.3f} / {gap[1]:.3f} / {gap[2]:.3f} "
            f"| {max(int(d.max()) for d in diffs)} | {rates[0]:,.0f} | {rates[1]:,.0f} |"
        )


def measured(decode: Callable[[list[Any]], list[Any]], encoded: list[Any]) -> tuple[list[Any], tuple[float, float]]:
    """The images of one batch and the decode rates for batches of 64 and of 256 (the photos four times); the photos
    as encoded tensors or as bytes, whichever ``decode`` takes."""
    import torch

    decode(encoded[:4])  # the first call's setup is not the rate
    rates = []
    for batch in (encoded, encoded * 4):
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(5):
            images = decode(batch)
        torch.cuda.synchronize()
        rates.append(5 * len(batch) / (time.perf_counter() - started))
    return images[: len(encoded)], (rates[0], rates[1])


if __name__ == "__main__":
    main()
