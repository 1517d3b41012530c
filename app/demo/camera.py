"""A digital camera, simulated: what makes the "real" class real.

The traces a detector should learn to associate with photographs are the ones every camera leaves: the
optics' blur, one colour sample per pixel through an RGGB Bayer filter, photon shot noise plus read noise that
grow with ISO, demosaicing that interpolates the missing colours, white balance that amplifies the red and
blue channels' noise, a tone curve, in-camera sharpening and sometimes noise reduction. JPEG is left to the
builder, which applies the same encoder to both classes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CameraSettings:
    optics_sigma: float  # in scene pixels, i.e. at twice the output resolution
    exposure: float
    iso: float
    wb_gains: tuple[float, float, float]
    wb_error: tuple[float, float, float]
    demosaic: str  # "bilinear" | "malvar"
    saturation: float
    sharpen: float
    denoise: float  # 0 = off; the share of the luma noise an in-camera denoiser removes


def sample_camera(rng: np.random.Generator, denoise_prob: float = 0.2) -> CameraSettings:
    return CameraSettings(
        optics_sigma=float(rng.uniform(0.4, 1.2)),
        exposure=float(rng.uniform(0.75, 1.15)),
        iso=float(np.exp(rng.uniform(np.log(100), np.log(3200)))),
        wb_gains=(float(rng.uniform(1.4, 2.4)), 1.0, float(rng.uniform(1.2, 2.2))),
        wb_error=tuple(float(v) for v in rng.uniform(0.95, 1.05, size=3)),
        demosaic=str(rng.choice(["bilinear", "malvar"])),
        saturation=float(rng.uniform(0.0, 0.3)),
        sharpen=float(rng.uniform(0.0, 0.8)),
        denoise=float(rng.uniform(0.5, 0.9)) if rng.random() < denoise_prob else 0.0,
    )


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def blur_per_image(x: torch.Tensor, sigmas: list[float]) -> torch.Tensor:
    """A different Gaussian blur for each image of (B, C, H, W), in one grouped convolution."""
    b, c, h, w = x.shape
    r = max(1, int(np.ceil(3 * max(sigmas))))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    s = torch.tensor(sigmas, dtype=torch.float32).clamp_min(1e-3).view(-1, 1)
    k = torch.exp(-0.5 * (t / s) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    y = F.pad(x.reshape(1, b * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, -1, 1), groups=b * c)
    return y.view(b, c, h, w)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W) with reflected borders."""
    if sigma <= 0:
        return x
    k = _gaussian_kernel(sigma)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _rggb_masks(h: int, w: int) -> torch.Tensor:
    m = torch.zeros(3, h, w)
    m[0, 0::2, 0::2] = 1
    m[1, 0::2, 1::2] = 1
    m[1, 1::2, 0::2] = 1
    m[2, 1::2, 1::2] = 1
    return m


def _demosaic_bilinear(raw: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    k_g = torch.tensor([[0, 1, 0], [1, 4, 1], [0, 1, 0]], dtype=torch.float32) / 4
    k_rb = torch.tensor([[1, 2, 1], [2, 4, 2], [1, 2, 1]], dtype=torch.float32) / 4
    sparse = F.pad(raw * masks, (1, 1, 1, 1), mode="reflect")
    kernels = torch.stack([k_rb, k_g, k_rb]).unsqueeze(1)
    return F.conv2d(sparse, kernels, groups=3)


# Malvar, He and Cutler (2004): bilinear interpolation corrected by the local Laplacian of the known channel.
_MHC = {
    "g_at_rb": [[0, 0, -1, 0, 0], [0, 0, 2, 0, 0], [-1, 2, 4, 2, -1], [0, 0, 2, 0, 0], [0, 0, -1, 0, 0]],
    "rb_at_g_row": [[0, 0, 0.5, 0, 0], [0, -1, 0, -1, 0], [-1, 4, 5, 4, -1], [0, -1, 0, -1, 0], [0, 0, 0.5, 0, 0]],
    "rb_at_g_col": [[0, 0, -1, 0, 0], [0, -1, 4, -1, 0], [0.5, 0, 5, 0, 0.5], [0, -1, 4, -1, 0], [0, 0, -1, 0, 0]],
    "rb_at_br": [[0, 0, -1.5, 0, 0], [0, 2, 0, 2, 0], [-1.5, 0, 6, 0, -1.5], [0, 2, 0, 2, 0], [0, 0, -1.5, 0, 0]],
}


def _demosaic_malvar(raw: torch.Tensor) -> torch.Tensor:
    b, _, h, w = raw.shape
    kernels = torch.tensor([_MHC[k] for k in ("g_at_rb", "rb_at_g_row", "rb_at_g_col", "rb_at_br")]) / 8
    f = F.conv2d(F.pad(raw, (2, 2, 2, 2), mode="reflect"), kernels.unsqueeze(1))
    g_at_rb, rb_row, rb_col, rb_br = f[:, 0], f[:, 1], f[:, 2], f[:, 3]
    r = raw[:, 0]
    out = torch.empty(b, 3, h, w)
    # R at R, G at G, B at B are the samples themselves
    out[:, 0] = r
    out[:, 1] = r
    out[:, 2] = r
    # red sites (even row, even col)
    out[:, 1, 0::2, 0::2] = g_at_rb[:, 0::2, 0::2]
    out[:, 2, 0::2, 0::2] = rb_br[:, 0::2, 0::2]
    # blue sites (odd, odd)
    out[:, 1, 1::2, 1::2] = g_at_rb[:, 1::2, 1::2]
    out[:, 0, 1::2, 1::2] = rb_br[:, 1::2, 1::2]
    # green in red rows (even, odd): red neighbours left/right, blue above/below
    out[:, 0, 0::2, 1::2] = rb_row[:, 0::2, 1::2]
    out[:, 2, 0::2, 1::2] = rb_col[:, 0::2, 1::2]
    # green in blue rows (odd, even): blue left/right, red above/below
    out[:, 2, 1::2, 0::2] = rb_row[:, 1::2, 0::2]
    out[:, 0, 1::2, 0::2] = rb_col[:, 1::2, 0::2]
    return out


def _luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def capture(scenes: torch.Tensor, settings: list[CameraSettings], noise: torch.Tensor) -> torch.Tensor:
    """Photograph a batch of scenes.

    scenes: (B, 3, 2H, 2W) sRGB in [0, 1]; noise: (B, 1, H, W) standard normal draws, passed in so that each
    image's noise comes from its own seeded generator whatever the batching. Returns (B, 3, H, W) sRGB in [0, 1].
    """
    b = scenes.shape[0]
    linear = scenes.clamp(0, 1) ** 2.2

    def per(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32).view(b, -1, 1, 1)

    blurred = blur_per_image(linear, [s.optics_sigma for s in settings])
    sensor = F.avg_pool2d(blurred, 2) * per([s.exposure for s in settings])
    gains = per([s.wb_gains for s in settings])
    h, w = sensor.shape[-2:]
    masks = _rggb_masks(h, w)
    raw = (sensor / gains * masks).sum(dim=1, keepdim=True).clamp(0, 1)
    iso = per([s.iso / 100.0 for s in settings])
    shot = 6e-5 * iso
    read = 8e-4 * iso.sqrt()
    raw = raw + torch.sqrt(shot * raw + read**2) * noise
    raw = torch.round(raw.clamp(0, 1) * 4095) / 4095
    out = torch.empty(b, 3, h, w)
    for kind in ("bilinear", "malvar"):
        idx = [i for i, s in enumerate(settings) if s.demosaic == kind]
        if idx:
            sub = raw[idx]
            out[idx] = (
                _demosaic_bilinear(sub.expand(-1, 3, -1, -1), masks) if kind == "bilinear" else _demosaic_malvar(sub)
            )
    out = out * gains * per([s.wb_error for s in settings])
    sat = per([s.saturation for s in settings])
    grey = out.mean(dim=1, keepdim=True)
    out = (grey + (out - grey) * (1 + sat)).clamp(0, 1)
    srgb = out ** (1 / 2.2)
    idx = [i for i, s in enumerate(settings) if s.denoise > 0]
    if idx:
        srgb[idx] = _denoise(srgb[idx], torch.tensor([settings[i].denoise for i in idx]).view(-1, 1, 1, 1))
    amount = per([s.sharpen for s in settings])
    srgb = srgb + amount * (srgb - gaussian_blur(srgb, 1.0))
    return srgb.clamp(0, 1)


def _denoise(x: torch.Tensor, strength: torch.Tensor) -> torch.Tensor:
    """In-camera noise reduction: chroma smoothed and luma pulled toward a local median, by strength."""
    y = _luma(x)
    chroma = x - y
    smooth_chroma = gaussian_blur(chroma, 1.5)
    patches = F.unfold(F.pad(y, (1, 1, 1, 1), mode="reflect"), 3)
    med = patches.median(dim=1).values.view_as(y)
    y_d = y + strength * (0.5 * (med + gaussian_blur(y, 0.8)) - y)
    return y_d + chroma + strength * (smooth_chroma - chroma)
