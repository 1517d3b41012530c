"""Eval preprocessing and train augmentation, defined once for training, evaluation, scans and serving.

Following Wang et al. 2020 (CNNDetection): crops are taken at native resolution, never by resizing,
because resampling erases the high-frequency traces generators leave; blur and JPEG re-compression
are applied at moderate probability and identically to both classes, so the detector cannot learn
"compressed" or "soft" as a class cue. Everything is Pillow C code: this runs inside Ray Data
map_batches over thousands of images on a couple of cores.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    import torch

# Context kept around the crop while blurring and re-compressing (see train_augment): wider than the
# Gaussian's reach at the largest sigma (~3 sigma). The context window starts on the photo's 16-px
# JPEG MCU grid, so the 8x8 block grid falls on the crop exactly where a whole-photo re-compression
# would put it (a random phase), not always aligned with the crop's corner.
_CONTEXT = 32
_MCU = 16


@dataclass(frozen=True)
class AugmentConfig:
    blur_prob: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    jpeg_prob: float = 0.3
    jpeg_quality: tuple[int, int] = (40, 95)
    flip_prob: float = 0.5


def eval_preprocess(image: Image.Image, crop_size: int) -> np.ndarray:
    """Center crop at native resolution; upscale only when the shorter side is below crop_size."""
    image = _at_least(_rgb(image), crop_size)
    left = (image.width - crop_size) // 2
    top = (image.height - crop_size) // 2
    return np.array(image.crop((left, top, left + crop_size, top + crop_size)), dtype=np.uint8)


def train_augment(image: Image.Image, crop_size: int, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """Blur (prob) -> JPEG re-compress (prob) -> random crop at native resolution -> random h-flip.

    Every random number is drawn on every call, in a fixed order, so the crop position for a given
    rng state does not depend on whether blur or JPEG fired. Blur and JPEG run on the crop plus a
    32-px context rather than the whole photo: the same pixels inside the crop as processing the
    whole photo (neither the blur nor JPEG's blocks reach further), at a fraction of the cost.
    """
    image = _at_least(_rgb(image), crop_size)
    blur = rng.random() < aug.blur_prob
    sigma = float(rng.uniform(*aug.blur_sigma))
    jpeg = rng.random() < aug.jpeg_prob
    quality = int(rng.integers(aug.jpeg_quality[0], aug.jpeg_quality[1] + 1))
    left = int(rng.integers(0, image.width - crop_size + 1))
    top = int(rng.integers(0, image.height - crop_size + 1))
    flip = rng.random() < aug.flip_prob

    if blur or jpeg:
        box = (
            max(0, (left - _CONTEXT) // _MCU * _MCU),
            max(0, (top - _CONTEXT) // _MCU * _MCU),
            min(image.width, left + crop_size + _CONTEXT),
            min(image.height, top + crop_size + _CONTEXT),
        )
        image = image.crop(box)
        left, top = left - box[0], top - box[1]
        if blur:
            image = image.filter(ImageFilter.GaussianBlur(radius=sigma))
        if jpeg:
            image = _jpeg_roundtrip(image, quality)

    crop = image.crop((left, top, left + crop_size, top + crop_size))
    if flip:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.array(crop, dtype=np.uint8)


def to_model_input(
    batch: np.ndarray | torch.Tensor, device: torch.device | str | None = None, channels_last: bool = False
) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW in [0, 1]; moved as uint8 first, so the transfer is 4x smaller."""
    import torch  # here, not at the top: Ray Data's decode workers and the Serve ingress never need it

    # Ray hands out read-only views; torch wants writable memory, so those (only those) are copied.
    tensor = torch.from_numpy(np.require(batch, requirements=["C", "W"])) if isinstance(batch, np.ndarray) else batch
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"expected a uint8 batch shaped (N, H, W, 3), got shape {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        raise ValueError(f"expected a uint8 batch, got {tensor.dtype}")
    if device is not None:
        tensor = tensor.to(device, non_blocking=True)
    tensor = tensor.permute(0, 3, 1, 2).float().div_(255.0)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return tensor.contiguous(memory_format=memory_format)


def _rgb(image: Image.Image) -> Image.Image:
    return image if image.mode == "RGB" else image.convert("RGB")


def _at_least(image: Image.Image, crop_size: int) -> Image.Image:
    """Upscale (shorter side -> crop_size) only when the image cannot hold a crop at native size."""
    short = min(image.size)
    if short >= crop_size:
        return image
    scale = crop_size / short
    size = (max(crop_size, round(image.width * scale)), max(crop_size, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BICUBIC)


def _jpeg_roundtrip(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as reloaded:
        return reloaded.convert("RGB")
