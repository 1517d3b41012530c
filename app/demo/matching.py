"""Per-pair matching of sharpness and noise: the cues a detector must not be able to use.

A generated twin that is smoother or cleaner than its photograph lets a model learn "smooth = fake", which
then flags every soft-focus photo. So each fake is sharpened (or softened) and given decoder-shaped noise
until its high-frequency energy and its noise level equal those of its camera twin. Both statistics are the
ones the shortcut test measures on the grey image: the std of the image minus its Gaussian (sigma 1) blur,
and the std of the image minus its 3x3 median.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from app.demo.camera import gaussian_blur

SHARPEN_RANGE = (-1.0, 3.0)
_MAX_BLUR_SIGMA = 2.5
MAX_NOISE_GAIN = 6.0  # times the unit field's std of 0.01: beyond that noise, content would drown


def grey(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _std(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).std(dim=1)


def highpass(g: torch.Tensor) -> torch.Tensor:
    return g - gaussian_blur(g, 1.0)


# Compare-exchange pairs that leave the median of nine values in position 4 (Paeth's median-of-9 network).
_MEDIAN9 = (
    (1, 2),
    (4, 5),
    (7, 8),
    (0, 1),
    (3, 4),
    (6, 7),
    (1, 2),
    (4, 5),
    (7, 8),
    (0, 3),
    (5, 8),
    (4, 7),
    (3, 6),
    (1, 4),
    (2, 5),
    (4, 7),
    (4, 2),
    (6, 4),
    (4, 2),
)


def median3x3(g: torch.Tensor) -> torch.Tensor:
    """3x3 median with reflected borders; a sorting network is many times faster than torch.median here."""
    h, w = g.shape[-2:]
    p = F.pad(g, (1, 1, 1, 1), mode="reflect")
    v = [p[..., dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)]
    for a, b in _MEDIAN9:
        v[a], v[b] = torch.minimum(v[a], v[b]), torch.maximum(v[a], v[b])
    return v[4]


def median_residual(g: torch.Tensor) -> torch.Tensor:
    return g - median3x3(g)


def hf_energy(x: torch.Tensor) -> torch.Tensor:
    return _std(highpass(grey(x)))


def noise_level(x: torch.Tensor) -> torch.Tensor:
    return _std(median_residual(grey(x)))


def _view(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def _sharpen_for_hf(
    p: torch.Tensor, q: torch.Tensor, r: torch.Tensor, a: torch.Tensor, target: torch.Tensor
) -> torch.Tensor:
    """Solve var(P + s Q + a R) = target^2 for s exactly (the high-pass is linear); the root nearest 0 wins."""
    base = p + _view(a) * r
    base = base - base.flatten(1).mean(1).view(-1, 1, 1, 1)
    qc = q - q.flatten(1).mean(1).view(-1, 1, 1, 1)
    n = base[0].numel() - 1
    aa = (qc * qc).flatten(1).sum(1) / n
    bb = 2 * (base * qc).flatten(1).sum(1) / n
    cc = (base * base).flatten(1).sum(1) / n - target**2
    disc = (bb * bb - 4 * aa * cc).clamp_min(0)
    root_hi = (-bb + disc.sqrt()) / (2 * aa.clamp_min(1e-12))
    root_lo = (-bb - disc.sqrt()) / (2 * aa.clamp_min(1e-12))
    s = torch.where(root_hi.abs() < root_lo.abs(), root_hi, root_lo)
    # no real root: the closest achievable value is at the vertex
    s = torch.where(bb * bb - 4 * aa * cc < 0, -bb / (2 * aa.clamp_min(1e-12)), s)
    return s.clamp(*SHARPEN_RANGE)


def _noise_amount(image: torch.Tensor, noise: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Noise amplitude so that the noise level reaches target, assuming noise adds in quadrature."""
    n0 = noise_level(image)
    n1 = noise_level(image + noise)
    gain = (n1**2 - n0**2).clamp_min(1e-10)
    return ((target**2 - n0**2).clamp_min(0) / gain).sqrt().clamp(0, MAX_NOISE_GAIN)


def match_to_twin(
    clean: torch.Tensor, noise: torch.Tensor, hf_target: torch.Tensor, nz_target: torch.Tensor, rounds: int = 3
) -> torch.Tensor:
    """Sharpen (or soften) and add noise to a batch of fakes so both statistics meet their twins' values.

    clean: (B, 3, H, W) decoder outputs; noise: a unit noise field per image (decoder-shaped or white).
    """
    detail = clean - gaussian_blur(clean, 1.0)
    p, q, r = highpass(grey(clean)), highpass(grey(detail)), highpass(grey(noise))
    s = torch.zeros(clean.shape[0])
    a = torch.zeros(clean.shape[0])
    for _ in range(rounds):
        s = _sharpen_for_hf(p, q, r, a, hf_target)
        sharpened = clean + _view(s) * detail
        a = _noise_amount(sharpened, noise, nz_target)
    out = clean + _view(s) * detail + _view(a) * noise
    # a twin softer than a sigma-1 blur of the fake: soften further, by the sigma that gets closest
    too_sharp = (s <= SHARPEN_RANGE[0]) & (hf_energy(out) > hf_target * 1.05)
    if bool(too_sharp.any()):
        idx = too_sharp.nonzero().flatten()
        best = out[idx]
        best_err = (hf_energy(best) - hf_target[idx]).abs()
        for sigma in (1.3, 1.7, 2.1, _MAX_BLUR_SIGMA):
            cand = gaussian_blur(clean[idx], sigma) + _view(a[idx]) * noise[idx]
            err = (hf_energy(cand) - hf_target[idx]).abs()
            better = err < best_err
            best[better] = cand[better]
            best_err = torch.minimum(err, best_err)
        out[idx] = best
    return out.clamp(0, 1)
