"""Generator-like decoders: what makes the "ai_generated" class generated.

Every image generator ends in a learned decoder that turns a low-resolution latent into pixels, and that last
step leaves its mark: the upsampling operator (transposed convolution, or nearest/bilinear upsampling followed
by convolution) imprints periodic patterns whose spectra show peaks (Frank et al. 2020), and the pixel-level
detail is synthesised from the latent instead of sampled by a sensor. The demo trains small decoders of each
kind at build time on camera images, then regenerates each scene's photograph through one of them, as the
aligned datasets of Rajan et al. (ICLR 2025) do with the autoencoder of a latent diffusion model.

Noise is injected before the last convolution, as StyleGAN does, so a fake can carry as much fine texture as
its camera twin; the decoder shapes that noise with its own layers, never with a Bayer pattern.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

DECODER_KINDS: tuple[str, ...] = ("autoencoder", "transposed_conv", "nearest_conv", "bilinear_conv")


def _bilinear_kernel() -> torch.Tensor:
    k = torch.tensor([0.25, 0.75, 0.75, 0.25])
    return torch.outer(k, k)


def _upsample(kind: str, channels: int, smooth: bool = False) -> nn.Module:
    """The decoder kind's upsampling operator; smooth adds the 3x3 convolution that follows it on the RGB path,
    started as the blur that turns nearest upsampling into (nearly) bilinear."""
    if kind == "transposed_conv":
        up = nn.ConvTranspose2d(channels, channels, 4, stride=2, padding=1, bias=False)
        with torch.no_grad():  # start as bilinear upsampling per channel; training moves it from there
            up.weight.zero_()
            for c in range(channels):
                up.weight[c, c] = _bilinear_kernel()
        return up
    resize = nn.Upsample(scale_factor=2, mode="bilinear" if kind == "bilinear_conv" else "nearest")
    if not smooth:
        return resize
    conv = nn.Conv2d(channels, channels, 3, padding=1, padding_mode="replicate", bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        if kind == "bilinear_conv":
            kernel = torch.zeros(3, 3)
            kernel[1, 1] = 1.0
        else:
            k = torch.tensor([1.0, 2.0, 1.0])
            kernel = torch.outer(k, k) / 16
        for c in range(channels):
            conv.weight[c, c] = kernel
    return nn.Sequential(resize, conv)


class Decoder(nn.Module):
    """An encoder to a latent at half resolution and a skip-architecture generator back to pixels.

    The latent carries the half-resolution image itself (three fixed channels) plus learned channels. The
    generator upsamples a low-resolution RGB image and adds learned detail, as StyleGAN2's skip generator does:
    the content starts faithful, and everything above the latent's resolution is synthesised through the
    decoder's upsampling operator. "autoencoder" (nearest upsampling + convolution, a deeper stem, as in the
    decoder of latent diffusion) stands for diffusion models; the others for the last stage of GANs.
    """

    def __init__(self, kind: str, learned: int = 5, width: int = 32, detail: int = 16) -> None:
        super().__init__()
        if kind not in DECODER_KINDS:
            raise ValueError(f"unknown decoder kind {kind!r}; one of {DECODER_KINDS}")
        self.kind = kind
        self.encoder = nn.Sequential(
            nn.PixelUnshuffle(2), nn.Conv2d(12, width, 3, padding=1), nn.SiLU(), nn.Conv2d(width, learned, 3, padding=1)
        )
        depth = 3 if kind == "autoencoder" else 2
        stem: list[nn.Module] = [nn.Conv2d(3 + learned, width, 3, padding=1), nn.SiLU()]
        for _ in range(depth - 1):
            stem += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
        self.stem = nn.Sequential(*stem)
        self.stem_rgb = nn.Conv2d(width, 3, 1)
        up_kind = "nearest_conv" if kind == "autoencoder" else kind
        self.reduce = nn.Conv2d(width, detail, 1)  # channels shrink before upsampling: full-resolution work is the cost
        self.up = _upsample(up_kind, detail)
        self.conv = nn.Conv2d(detail, detail, 3, padding=1)
        self.to_rgb = nn.Conv2d(detail, 3, 1)
        self.rgb_up = _upsample(up_kind, 3, smooth=True)
        with torch.no_grad():  # both corrections start silent: the decoder starts as plain upsampling and learns detail
            for layer in (self.stem_rgb, self.to_rgb):
                layer.weight.zero_()
                layer.bias.zero_()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 2 - 1
        return torch.cat([F.avg_pool2d(x, 2), self.encoder(x)], dim=1)

    def decode(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """noise: (B, 1, H, W) at output resolution, injected StyleGAN-style before the last convolution."""
        feats = self.stem(z)
        rgb = z[:, :3] + self.stem_rgb(feats)
        up = self.up(self.reduce(feats))
        if noise is not None:
            up = up + noise * up.std(dim=(2, 3), keepdim=True)
        detail = self.to_rgb(F.silu(self.conv(up)))
        return (self.rgb_up(rgb) + detail) * 0.5 + 0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


@dataclass
class FittedDecoder:
    model: Decoder
    psnr_db: float  # on held-out camera images: the "does not visibly degrade content" check
    seconds: float


def fit_decoder(
    kind: str,
    train: torch.Tensor,
    holdout: torch.Tensor,
    seed: int,
    steps: int = 300,
    patch: int = 32,
    batch: int = 16,
    lr: float = 3e-3,
) -> FittedDecoder:
    """Train one decoder to reproduce noise-free camera images (random patches), deterministic for a seed.

    Generators produce clean content and add their own texture, so the decoders learn from, and regenerate,
    the noise-free capture of a scene; PSNR on held-out scenes measures how faithfully content survives.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = Decoder(kind)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    n, _, h, w = train.shape
    for _ in range(steps):
        idx = rng.integers(0, n, size=batch)
        ys = rng.integers(0, (h - patch) // 2 + 1, size=batch) * 2  # even offsets keep the Bayer phase
        xs = rng.integers(0, (w - patch) // 2 + 1, size=batch) * 2
        x = torch.stack([train[i, :, y : y + patch, x0 : x0 + patch] for i, y, x0 in zip(idx, ys, xs, strict=True)])
        loss = F.mse_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        mse = F.mse_loss(model(holdout).clamp(0, 1), holdout).item()
    return FittedDecoder(model, float(10 * np.log10(1.0 / max(mse, 1e-12))), time.perf_counter() - start)


@torch.no_grad()
def regenerate(decoder: Decoder, images: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(clean regeneration, a noise field shaped by the decoder) for a batch of camera images.

    noise: (B, 1, H, W) standard normal draws, one per image from its own generator. The field is what the
    decoder makes of that noise injected into its last layer, scaled to std 0.01: the caller sets its amplitude.
    """
    z = decoder.encode(images)
    clean = decoder.decode(z)
    field = decoder.decode(z, 0.3 * noise) - clean
    field = field / field.flatten(1).std(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1) * 0.01
    return clean.clamp(0, 1), field
