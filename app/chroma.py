"""libjpeg-turbo's interpolated chroma, rebuilt from a decode that upsampled chroma by nearest neighbour.

Why: nvJPEG (torchvision's CUDA `decode_jpeg`) gives each 2x2 (4:2:0) or 2x1 (4:2:2) block of pixels the block's one
chroma sample, where libjpeg-turbo, the decoder training uses, interpolates between neighbouring samples ("fancy"
upsampling); a model that reads the high-pass residual answers the two differently. Both decoders share the IDCT and
the colour conversion (their 4:4:4 output is identical), so the decoded samples can be recovered from nvJPEG's
pixels and upsampled again as libjpeg-turbo does, on the GPU, in integer arithmetic:

- In a pixel none of whose channels was clipped, B - R and G - R depend on the block's (Cb, Cr) alone, and the 65,536
  pairs give 65,536 distinct differences: a table returns the pair exactly.
- Luma is then R minus the red offset of that Cr (or G or B where R was clipped).
- The chroma planes are upsampled with libjpeg-turbo's triangle filter (`jdsample.c`, its rounding included) and
  converted with its fixed-point tables (`jdcolor.c`).

A block whose every pixel has a clipped channel hides its sample: the pixels leave a range of (Cb, Cr) that all
explain them. A saturated colour (pure red: green and blue at 0) leaves a wide one, the near-white ringing where a
product meets a white background a narrow one, and the wrong choice moves the interpolated neighbours by 1 to 15 grey
levels. So each such block is rebuilt from the sample nearest the estimate and again from the farthest that explains
it; where the two outputs differ by more than a grey level anywhere in the window, the window is not rebuilt: it
comes back None and the caller decodes that photo on the CPU. Windows, not whole photos: the center crop and one
chroma sample around it (the filter's reach), so a batch of crops is one set of tensor operations.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUBSAMPLINGS = ((2, 2), (2, 1))  # (horizontal, vertical) factors this module rebuilds: 4:2:0 and 4:2:2

_SCALE_BITS = 16
_ONE_HALF = 1 << (_SCALE_BITS - 1)


def _fixed(value: float) -> int:
    return int(value * (1 << _SCALE_BITS) + 0.5)


@functools.cache
def _tables(device: str) -> dict[str, torch.Tensor]:
    """libjpeg-turbo's YCbCr-to-RGB tables on ``device`` (indexed by the 0-255 sample), and the table from
    (B - R, G - R) to Cb * 256 + Cr (-1 where no pair gives that difference)."""
    import torch

    centred = torch.arange(256, dtype=torch.int64) - 128
    cr_r = (_fixed(1.40200) * centred + _ONE_HALF) >> _SCALE_BITS
    cb_b = (_fixed(1.77200) * centred + _ONE_HALF) >> _SCALE_BITS
    cr_g = -_fixed(0.71414) * centred
    cb_g = -_fixed(0.34414) * centred + _ONE_HALF
    cb, cr = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    blue_minus_red = cb_b[cb] - cr_r[cr]
    green_minus_red = ((cb_g[cb] + cr_g[cr]) >> _SCALE_BITS) - cr_r[cr]
    low = torch.tensor([int(blue_minus_red.min()), int(green_minus_red.min())])
    span = torch.tensor([int(blue_minus_red.max()), int(green_minus_red.max())]) - low + 1
    pairs = torch.full((int(span[0] * span[1]),), -1, dtype=torch.int64)
    pairs[((blue_minus_red - low[0]) * span[1] + green_minus_red - low[1]).reshape(-1)] = (cb * 256 + cr).reshape(-1)
    tables = {"cr_r": cr_r, "cb_b": cb_b, "cr_g": cr_g, "cb_g": cb_g, "pairs": pairs, "low": low, "span": span}
    return {name: table.to(device=device, dtype=torch.int32) for name, table in tables.items()}


def warm_tables(device: torch.device) -> None:
    """Build the tables on ``device`` now, not in a request (under the name a tensor there gives it: "cuda:0")."""
    import torch

    _tables(str(torch.empty(0, device=device).device))


def interpolated_windows(
    images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], subsampling: tuple[int, int]
) -> list[torch.Tensor | None]:
    """For each nearest-chroma (3, H, W) uint8 image and its box (left, top, width, height) in stored coordinates,
    the box's pixels as libjpeg-turbo decodes them, or None where a saturated colour hides a chroma sample the box
    needs; every box of one call has the same size and ``subsampling``."""
    import torch

    if not images:
        return []
    h, v = subsampling
    _, _, width, height = boxes[0]
    columns, rows = (width - 1) // h + 4, (height - 1) // v + 4  # samples the box spans, one more each side
    windows, offsets = [], []
    for image, (left, top, _, _) in zip(images, boxes, strict=True):
        first_column, first_row = (left // h - 1) * h, (top // v - 1) * v
        device = image.device
        # indices past an edge repeat its pixel, so a block there carries the edge's sample: the filter's edge rule
        xs = torch.arange(first_column, first_column + columns * h, device=device).clamp_(0, image.shape[2] - 1)
        ys = torch.arange(first_row, first_row + rows * v, device=device).clamp_(0, image.shape[1] - 1)
        windows.append(image.index_select(1, ys).index_select(2, xs))
        offsets.append((left - first_column, top - first_row))
    rebuilt, settled = _interpolated(torch.stack(windows), h, v)
    return [
        rebuilt[i, :, y : y + height, x : x + width] if known else None
        for i, ((x, y), known) in enumerate(zip(offsets, settled.tolist(), strict=True))
    ]


def _interpolated(windows: torch.Tensor, h: int, v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, rows * v, columns * h) uint8 nearest-chroma pixels to the same with interpolated chroma, and for each
    window whether its pixels are libjpeg-turbo's (False: a block whose sample clipping hides moves them)."""
    import torch

    t = _tables(str(windows.device))
    pixels = windows.to(torch.int32)
    red, green, blue = pixels.unbind(1)
    n, _, height, width = pixels.shape
    rows, columns = height // v, width // h

    def blocks(plane: torch.Tensor) -> torch.Tensor:  # (N, H, W) -> (N, rows, columns, v * h)
        return plane.reshape(n, rows, v, columns, h).permute(0, 1, 3, 2, 4).reshape(n, rows, columns, v * h)

    unclipped = ((pixels > 0) & (pixels < 255)).all(1)
    low, span = t["low"], t["span"]
    blue_minus_red = (blue - red - low[0]).clamp(0, int(span[0]) - 1)
    green_minus_red = (green - red - low[1]).clamp(0, int(span[1]) - 1)
    pair = t["pairs"][(blue_minus_red * span[1] + green_minus_red).long()]
    exact = blocks(unclipped & (pair >= 0))
    chosen = blocks(pair).gather(-1, exact.to(torch.uint8).argmax(-1, keepdim=True)).squeeze(-1)
    luma = 0.299 * red + 0.587 * green + 0.114 * blue
    cb = blocks(128 + (blue - luma) / 1.772).mean(-1).round().clamp(0, 255).to(torch.int32)
    cr = blocks(128 + (red - luma) / 1.402).mean(-1).round().clamp(0, 255).to(torch.int32)
    found = exact.any(-1)
    cb = torch.where(found, chosen // 256, cb)
    cr = torch.where(found, chosen % 256, cr)
    settled = torch.ones(n, dtype=torch.bool, device=windows.device)
    hidden = (~found).nonzero(as_tuple=True)
    if not hidden[0].numel():
        return _converted(pixels, luma, cb, cr, h, v, t), settled
    pixels_of = torch.stack([blocks(plane)[hidden] for plane in (red, green, blue)], 1)  # (M, 3, v * h)
    # a white background hides every block of it: searched in parts, so its candidates stay within ~100 MB
    parts = [
        _searched(*part, t)
        for part in zip(*(x.split(_SEARCHED_AT_ONCE) for x in (pixels_of, cb[hidden], cr[hidden])), strict=True)
    ]
    cb[hidden], cr[hidden], cb_far, cr_far, explained = (torch.cat(found) for found in zip(*parts, strict=True))
    settled[hidden[0][~explained]] = False
    out = _converted(pixels, luma, cb, cr, h, v, t)
    cb[hidden], cr[hidden] = cb_far, cr_far
    moved = (_converted(pixels, luma, cb, cr, h, v, t).to(torch.int16) - out).abs().flatten(1).amax(1) > _MOVED
    return out, settled & ~moved


def _converted(
    pixels: torch.Tensor, luma: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor, h: int, v: int, t: dict
) -> torch.Tensor:
    """The pixels decoded again from their blocks' samples: each pixel's luma from its nearest-chroma value, then
    libjpeg-turbo's upsampled chroma added."""
    import torch

    cb_nearest = cb.repeat_interleave(v, 1).repeat_interleave(h, 2)
    cr_nearest = cr.repeat_interleave(v, 1).repeat_interleave(h, 2)
    low_luma, high_luma = _luma_bounds(pixels, _offsets(cb_nearest, cr_nearest, t))
    y = torch.maximum(torch.minimum(luma.round().to(torch.int32), high_luma), low_luma)
    out = y[:, None] + _offsets(_upsampled(cb, h, v), _upsampled(cr, h, v), t)
    return out.clamp(0, 255).to(torch.uint8)


def _offsets(cb: torch.Tensor, cr: torch.Tensor, t: dict[str, torch.Tensor]) -> torch.Tensor:
    """What each (Cb, Cr) adds to luma in R, G and B, stacked on a new axis 1 (after the leading one)."""
    import torch

    cb, cr = cb.long(), cr.long()
    green = (t["cb_g"][cb] + t["cr_g"][cr]) >> _SCALE_BITS
    return torch.stack((t["cr_r"][cr], green, t["cb_b"][cb]), 1)


def _luma_bounds(pixels: torch.Tensor, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The luma range that gives these pixels with these offsets: one value from an unclipped channel; from a channel
    at 255 only a floor, at 0 only a ceiling. Pixels (and offsets) are stacked on axis 1 by channel."""
    import torch

    exact = pixels - offsets
    low = torch.where(pixels == 0, torch.zeros_like(exact), exact).amax(1).clamp(min=0)
    high = torch.where(pixels == 255, torch.full_like(exact, 255), exact).amin(1).clamp(max=255)
    return low, high


_SEARCH = 5  # how far from the least-squares estimate a hidden block's samples are looked for
_SEARCHED_AT_ONCE = 16_384  # hidden blocks per search: 121 candidates each
_MOVED = 1  # the most a rebuilt pixel may move between a hidden block's nearest and farthest samples


def _searched(
    pixels: torch.Tensor, cb: torch.Tensor, cr: torch.Tensor, t: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For blocks whose every pixel clips a channel, (M, 3, P) pixels and estimated samples: the (Cb, Cr) near the
    estimate that explains the pixels best (fewest grey levels of luma left without a value), nearest first; the
    farthest from it that explains them as well (at the search's edge where a saturated colour leaves a wide range);
    and whether any explains them."""
    import torch

    steps = torch.arange(-_SEARCH, _SEARCH + 1, device=cb.device)
    grid = torch.cartesian_prod(steps, steps)
    grid = grid[(grid.abs().sum(1) * 16 + grid.abs().max(1).values).argsort(stable=True)]  # nearest first
    cb_try = (cb[:, None] + grid[:, 0]).clamp(0, 255)  # (M, K)
    cr_try = (cr[:, None] + grid[:, 1]).clamp(0, 255)
    m, k = cb_try.shape
    offsets = _offsets(cb_try.reshape(-1), cr_try.reshape(-1), t).reshape(m, k, 3, 1)
    low, high = _luma_bounds(pixels[:, None].expand(m, k, -1, -1).reshape(m * k, 3, -1), offsets.reshape(m * k, 3, 1))
    unexplained = (low - high).clamp(min=0).sum(-1).reshape(m, k)
    best = unexplained.argmin(1, keepdim=True)  # the first of equals: the nearest
    cb_best, cr_best = cb_try.gather(1, best), cr_try.gather(1, best)
    explains = unexplained == 0
    apart = torch.maximum((cb_try - cb_best).abs(), (cr_try - cr_best).abs())
    far = torch.where(explains, apart, -1).argmax(1, keepdim=True)
    return (
        *(found.squeeze(1).to(cb.dtype) for found in (cb_best, cr_best)),
        *(found.squeeze(1).to(cb.dtype) for found in (cb_try.gather(1, far), cr_try.gather(1, far))),
        explains.any(1),
    )


def _upsampled(samples: torch.Tensor, h: int, v: int) -> torch.Tensor:
    """libjpeg-turbo's fancy upsampling of (N, rows, columns) samples: h2v1 weighs the nearer sample 3:1 with
    rounding 1 and 2 on alternate outputs; h2v2 sums 3:1 vertically first, then 3:1 across with rounding 8 and 7.
    The edges repeat their sample (the filter's rule at a photo's edge; inside a window the margin is never kept)."""
    import torch

    def shifted(plane: torch.Tensor, dim: int, step: int) -> torch.Tensor:
        edge = plane.narrow(dim, 0 if step < 0 else plane.shape[dim] - 1, 1)
        inner = plane.narrow(dim, 0, plane.shape[dim] - 1) if step < 0 else plane.narrow(dim, 1, plane.shape[dim] - 1)
        return torch.cat((edge, inner) if step < 0 else (inner, edge), dim)

    def interleaved(even: torch.Tensor, odd: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.stack((even, odd), dim + 1).flatten(dim, dim + 1)

    if v == 1:
        return interleaved(
            (3 * samples + shifted(samples, 2, -1) + 1) >> 2, (3 * samples + shifted(samples, 2, 1) + 2) >> 2, 2
        )
    sums = interleaved(3 * samples + shifted(samples, 1, -1), 3 * samples + shifted(samples, 1, 1), 1)
    return interleaved((3 * sums + shifted(sums, 2, -1) + 8) >> 4, (3 * sums + shifted(sums, 2, 1) + 7) >> 4, 2)


def interpolated_image(image: torch.Tensor, subsampling: tuple[int, int]) -> torch.Tensor | None:
    """A whole nearest-chroma (3, H, W) image with interpolated chroma (training's whole-photo path), or None where a
    saturated colour hides a chroma sample."""
    _, height, width = image.shape
    return interpolated_windows([image], [(0, 0, width, height)], subsampling)[0]
