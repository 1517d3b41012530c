"""Eval preprocessing and train augmentation, defined once for training, evaluation, scans and serving.

Following Wang et al. 2020 (CNNDetection) and B-Free (Guillaro et al. 2025): crops are taken at native resolution,
never by resizing, because resampling erases the high-frequency traces generators leave; the degradations of
``app.degradations`` (blur, downscaling with and without the upscale back, JPEG) are drawn per image for both
classes alike, so the detector learns traces that survive them and cannot learn "compressed" or "soft" as a class
cue. On the CPU everything is Pillow C code (this runs inside Ray Data map_batches over thousands of images on a few
cores); `train_augment_tensor` is the same augmentation, the same random draws in the same order, on a decoded uint8
(3, H, W) tensor, for training that decodes on the GPU (`app.pixels`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from app.degradations import DegradationConfig, sample_chain

if TYPE_CHECKING:
    import torch

# Context kept around the crop while a large photo is degraded (see train_augment): wider than the Gaussian's reach
# at the largest sigma (~3 sigma). The window starts on the photo's 16-px JPEG MCU grid, so the 8x8 block grid falls
# on the crop exactly where a whole-photo re-compression would put it (a random phase), not always at its corner.
_CONTEXT = 32
_MCU = 16


@dataclass(frozen=True)
class AugmentConfig:
    degradations: DegradationConfig = field(default_factory=DegradationConfig)
    flip_prob: float = 0.5


def eval_preprocess(image: Image.Image, crop_size: int) -> np.ndarray:
    """Center crop at native resolution; upscale only when the shorter side is below crop_size."""
    image = _at_least(_rgb(image), crop_size)
    left = (image.width - crop_size) // 2
    top = (image.height - crop_size) // 2
    return np.array(image.crop((left, top, left + crop_size, top + crop_size)), dtype=np.uint8)


def train_augment(image: Image.Image, crop_size: int, aug: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """A random chain of degradations -> random crop at native resolution -> random h-flip (see
    `train_augment_degraded`)."""
    return train_augment_degraded(image, crop_size, aug, rng)[0]


def train_augment_degraded(
    image: Image.Image, crop_size: int, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, bool]:
    """A random chain of degradations -> random crop at native resolution -> random h-flip; and whether a
    degradation fired (the source head may skip those crops: a degradation wipes the traces it reads).

    Every random number is drawn on every call, in a fixed order, so the crop position for a given rng state does
    not depend on which degradations fired. A photo much larger than the crop is degraded only in a window around
    the crop: the same pixels inside the crop as degrading the whole photo (no blur, JPEG block or resampling filter
    reaches further), at a fraction of the cost.
    """
    crop, degraded = _augment(_PillowOps, _rgb(image), crop_size, aug, rng)
    return np.array(crop, dtype=np.uint8), degraded


def train_augment_tensor(
    image: torch.Tensor, crop_size: int, aug: AugmentConfig, rng: np.random.Generator
) -> tuple[torch.Tensor, bool]:
    """`train_augment_degraded` on a uint8 (3, H, W) tensor on any device: (the (crop, crop, 3) crop, degraded)."""
    crop, degraded = _augment(_TensorOps, image, crop_size, aug, rng)
    return crop.permute(1, 2, 0).contiguous(), degraded


def _augment(ops: Any, image: Any, crop_size: int, aug: AugmentConfig, rng: np.random.Generator) -> tuple[Any, bool]:
    chain = sample_chain(rng, aug.degradations)
    at = rng.random(2)
    flip = rng.random() < aug.flip_prob

    width, height = ops.size(image)
    # half the window's side: the crop and its context, as wide as they are before the chain shrinks the photo
    half = math.ceil((crop_size / 2 + _CONTEXT) / chain.scale)
    if chain.steps and width > 2 * half + _MCU and height > 2 * half + _MCU:
        cx, cy = half + at[0] * (width - 2 * half), half + at[1] * (height - 2 * half)
        # on the MCU grid, and a whole number of MCUs wide, so a resize keeps the photo's own scale and phase
        left, top = int(cx - half) // _MCU * _MCU, int(cy - half) // _MCU * _MCU
        side = math.ceil((2 * half + _MCU) / _MCU) * _MCU
        box = (left, top, min(width, left + side), min(height, top + side))
        window = ops.crop(image, box)
        image = ops.at_least(ops.degrade(chain, window), crop_size)
        (window_w, window_h), (width, height) = ops.size(window), ops.size(image)
        # the crop's center where it lands in the degraded window
        left = round((cx - box[0]) * width / window_w - crop_size / 2)
        top = round((cy - box[1]) * height / window_h - crop_size / 2)
        left = min(max(0, left), width - crop_size)
        top = min(max(0, top), height - crop_size)
    else:
        image = ops.at_least(ops.degrade(chain, image), crop_size)
        width, height = ops.size(image)
        left = int(at[0] * (width - crop_size + 1))
        top = int(at[1] * (height - crop_size + 1))
    crop = ops.crop(image, (left, top, left + crop_size, top + crop_size))
    return (ops.flip(crop) if flip else crop), bool(chain.steps)


class _PillowOps:
    @staticmethod
    def size(image: Image.Image) -> tuple[int, int]:
        return image.size

    @staticmethod
    def crop(image: Image.Image, box: tuple[int, int, int, int]) -> Image.Image:
        return image.crop(box)

    @staticmethod
    def degrade(chain: Any, image: Image.Image) -> Image.Image:
        return chain(image)

    @staticmethod
    def at_least(image: Image.Image, crop_size: int) -> Image.Image:
        return _at_least(image, crop_size)

    @staticmethod
    def flip(image: Image.Image) -> Image.Image:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


class _TensorOps:
    @staticmethod
    def size(image: torch.Tensor) -> tuple[int, int]:
        return int(image.shape[-1]), int(image.shape[-2])

    @staticmethod
    def crop(image: torch.Tensor, box: tuple[int, int, int, int]) -> torch.Tensor:
        left, top, right, bottom = box
        return image[:, top:bottom, left:right]

    @staticmethod
    def degrade(chain: Any, image: torch.Tensor) -> torch.Tensor:
        return chain.tensor(image)

    @staticmethod
    def at_least(image: torch.Tensor, crop_size: int) -> torch.Tensor:
        from app.degradations import resize_tensor

        width, height = _TensorOps.size(image)
        short = min(width, height)
        if short >= crop_size:
            return image
        scale = crop_size / short
        return resize_tensor(image, max(crop_size, round(height * scale)), max(crop_size, round(width * scale)))

    @staticmethod
    def flip(image: torch.Tensor) -> torch.Tensor:
        return image.flip(-1)


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
