"""What happens to a photo between the camera (or the generator) and the detector: blur, downscaling, JPEG.

Marketplaces resize and re-encode every upload, sellers blur and crop, and a verdict that flips under a resize is
not one anybody can act on. One definition serves both sides: training draws a random chain of these per image,
for both classes alike (so "soft" or "compressed" never becomes a class cue), and evaluation sweeps each one by
severity. Every degradation is a small frozen dataclass, so a chain pickles into Ray Data's workers. Each applies to a
Pillow image (CPU decoding) or to a uint8 (3, H, W) tensor on any device (`tensor`: training that decodes on the GPU),
the same operation with the same parameters; the two differ by their filters' rounding (tests/app/test_transforms.py
bounds it).
"""

from __future__ import annotations

import io
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFilter

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Blur:
    """A Gaussian blur (a soft lens, motion, a seller's beauty filter)."""

    sigma: float

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(self.sigma))

    def tensor(self, image: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        side = 2 * math.ceil(3 * self.sigma) + 1
        return F.gaussian_blur(image[None], [side, side], [self.sigma, self.sigma])[0]


@dataclass(frozen=True)
class Downscale:
    """A resize by ``factor`` (< 1) with Pillow's antialiased bicubic filter, as a thumbnailer does; with
    ``upscale_back`` the photo is resized back to its size, as a page that stretches a thumbnail does."""

    factor: float
    upscale_back: bool = False

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        small = image.resize(
            (max(1, round(width * self.factor)), max(1, round(height * self.factor))), Image.Resampling.BICUBIC
        )
        return small.resize((width, height), Image.Resampling.BICUBIC) if self.upscale_back else small

    def tensor(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        small = resize_tensor(image, max(1, round(height * self.factor)), max(1, round(width * self.factor)))
        return resize_tensor(small, height, width) if self.upscale_back else small


@dataclass(frozen=True)
class Jpeg:
    """A JPEG re-encoding at ``quality`` (Pillow's default 4:2:0 chroma subsampling, as most pipelines use)."""

    quality: int

    def __call__(self, image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=self.quality)
        buffer.seek(0)
        with Image.open(buffer) as reloaded:
            return reloaded.convert("RGB")

    def tensor(self, image: torch.Tensor) -> torch.Tensor:
        """Encoded and decoded where the tensor lives: nvJPEG on a GPU, libjpeg-turbo on a CPU."""
        from app.pixels import decode_jpeg_interpolated, encode_jpeg_on

        encoded = encode_jpeg_on(image, self.quality)
        # the decoder reads its input from host memory on every device; the bytes are a few KiB
        return decode_jpeg_interpolated(encoded.cpu(), image.device)


def resize_tensor(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Pillow's antialiased bicubic resize (its a = -0.5 kernel, widened when shrinking) on a uint8 (3, H, W) tensor."""
    import torch.nn.functional as F

    resized = F.interpolate(image[None].float(), size=(height, width), mode="bicubic", antialias=True)
    return resized[0].round_().clamp_(0, 255).to(image.dtype)


Degradation = Blur | Downscale | Jpeg


@dataclass(frozen=True)
class Chain:
    """Degradations applied in order; picklable, so evaluation hands it to Ray Data as the change to a photo."""

    steps: tuple[Degradation, ...] = ()

    def __call__(self, image: Image.Image) -> Image.Image:
        for step in self.steps:
            image = step(image)
        return image

    def tensor(self, image: torch.Tensor) -> torch.Tensor:
        for step in self.steps:
            image = step.tensor(image)
        return image

    @property
    def scale(self) -> float:
        """The smallest resolution the photo passes through, as a factor of its own (1.0 without a downscale):
        a pixel of the result depends on about 1/scale times as wide a neighbourhood."""
        factor = 1.0
        for step in self.steps:
            if isinstance(step, Downscale):
                factor *= step.factor
        return factor


@dataclass(frozen=True)
class DegradationConfig:
    """How training draws a chain for each image: each kind on its own probability, in a random order."""

    blur_prob: float = 0.15
    blur_sigma: tuple[float, float] = (0.2, 2.0)
    downscale_prob: float = 0.15
    downscale_factor: tuple[float, float] = (0.4, 0.9)
    upscale_back_prob: float = 0.5
    jpeg_prob: float = 0.4
    jpeg_quality: tuple[int, int] = (30, 95)


def sample_chain(rng: np.random.Generator, config: DegradationConfig) -> Chain:
    """A random chain: every random number is drawn on every call, in a fixed order, so the rest of an image's
    augmentation (its crop, its flip) does not depend on which degradations fired."""
    draws = rng.random(4)
    order = rng.permutation(3)
    sigma = float(rng.uniform(*config.blur_sigma))
    factor = float(rng.uniform(*config.downscale_factor))
    quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
    candidates: list[Degradation | None] = [
        Blur(sigma) if draws[0] < config.blur_prob else None,
        Downscale(factor, upscale_back=bool(draws[1] < config.upscale_back_prob))
        if draws[2] < config.downscale_prob
        else None,
        Jpeg(quality) if draws[3] < config.jpeg_prob else None,
    ]
    return Chain(tuple(step for i in order if (step := candidates[i]) is not None))


@dataclass(frozen=True)
class PhotoChain:
    """A random chain per photo (``sample_chain``), drawn from the photo's pixels and ``seed``: the same photo gets
    the same chain in every run, whichever worker reads it and in whatever order, so a fit on degraded photos
    repeats. Picklable, so Ray Data's workers apply it as an evaluation variant (app.data.DecodeOptions)."""

    config: DegradationConfig
    seed: int

    def chain(self, image: Image.Image) -> Chain:
        """The chain this photo gets."""
        return sample_chain(np.random.default_rng([self.seed, zlib.crc32(image.tobytes())]), self.config)

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.chain(image)(image)


# The evaluation's sweep: each degradation at rising severity, and the one a marketplace applies to every upload.
SEVERITIES: dict[str, tuple[tuple[str, Chain], ...]] = {
    "blur": tuple((f"blur_sigma{s:g}", Chain((Blur(s),))) for s in (0.5, 1.0, 1.5, 2.0)),
    "downscale": tuple((f"downscale_{f:g}", Chain((Downscale(f),))) for f in (0.75, 0.5, 0.33)),
    "jpeg": tuple((f"jpeg_q{q}", Chain((Jpeg(q),))) for q in (90, 75, 50, 30)),
}
MARKETPLACE = Chain((Downscale(0.5), Jpeg(75)))  # a half-size thumbnail, re-encoded


def sweep(names: Sequence[str] | None = None) -> dict[str, Chain]:
    """Every named variant of the sweep (the clean photo is not one); ``names`` picks some."""
    variants = {name: chain for curve in SEVERITIES.values() for name, chain in curve}
    variants["downscale_0.5_then_jpeg_q75"] = MARKETPLACE
    return variants if names is None else {name: variants[name] for name in names}
