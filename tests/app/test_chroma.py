"""`app.chroma` on this CPU: nvJPEG's nearest-neighbour chroma (emulated by libjpeg-turbo's fast upsampling,
tests/turbojpeg.py) rebuilt into libjpeg-turbo's interpolated decode, for whole photos, for crop windows at every
edge, and through `app.pixels.decode_crops` for every EXIF orientation."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from app import chroma
from app.config import ImageLimits
from app.images import Header, check_header, decode_image
from app.pixels import cpu_crop, decode_crops, decode_upright, device_decodable
from tests import turbojpeg

needs_turbojpeg = pytest.mark.skipif(
    not turbojpeg.available(), reason="needs Debian's libturbojpeg0 (make test installs it)"
)
LAYOUTS = {(2, 2): 2, (2, 1): 1}  # chroma subsampling -> Pillow's `subsampling` for it
LIMITS = ImageLimits()


def photo_jpeg(width: int, height: int, subsampling: int, seed: int = 0, orientation: int = 1) -> bytes:
    """A photo-like JPEG: smooth colour fields, saturated in places, with sensor-like grain."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    pixels = np.clip(base * 1.3 - 40 + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, subsampling=subsampling, exif=exif.tobytes())
    return buffer.getvalue()


def nearest(data: bytes) -> torch.Tensor:
    return torch.from_numpy(turbojpeg.decode_nearest_chroma(data)).permute(2, 0, 1).contiguous()


def libjpeg_turbo(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def test_every_chroma_pair_is_found_again_from_its_colour_differences() -> None:
    """The rebuild rests on this: (B - R, G - R) of an unclipped pixel names its block's (Cb, Cr), for all 65,536."""
    tables = chroma._tables("cpu")
    cb, cr = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    blue_minus_red = tables["cb_b"][cb] - tables["cr_r"][cr]
    green_minus_red = ((tables["cb_g"][cb] + tables["cr_g"][cr]) >> 16) - tables["cr_r"][cr]
    low, span = tables["low"], tables["span"]
    found = tables["pairs"][((blue_minus_red - low[0]) * span[1] + green_minus_red - low[1]).long()]
    assert torch.equal(found, (cb * 256 + cr).to(found.dtype))


@needs_turbojpeg
@pytest.mark.parametrize("subsampling", list(LAYOUTS))
@pytest.mark.parametrize("size", [(333, 251), (256, 256), (97, 140)])
def test_a_nearest_chroma_photo_becomes_libjpeg_turbos_decode(
    subsampling: tuple[int, int], size: tuple[int, int]
) -> None:
    data = photo_jpeg(*size, LAYOUTS[subsampling], seed=sum(size))
    before = nearest(data).numpy().transpose(1, 2, 0).astype(int)
    rebuilt = chroma.interpolated_image(nearest(data), subsampling).numpy().transpose(1, 2, 0).astype(int)
    expected = libjpeg_turbo(data).astype(int)
    assert np.abs(before - expected).mean() > 0.5, "the emulated decoder must start from nearest-neighbour chroma"
    wrong = np.abs(rebuilt - expected)
    # only blocks whose every pixel clips a channel (saturated colour) hide their sample: under one pixel in a hundred
    assert (wrong > 0).mean() < 0.01 and wrong.mean() < 0.01 and wrong.max() <= 8, (wrong.mean(), wrong.max())


@needs_turbojpeg
@pytest.mark.parametrize("subsampling", list(LAYOUTS))
def test_a_window_equals_the_same_pixels_of_the_whole_photo_at_every_edge(subsampling: tuple[int, int]) -> None:
    """Windows are rebuilt with one sample of margin; at a photo's edge the margin repeats the edge sample, as the
    filter does there."""
    data = photo_jpeg(301, 233, LAYOUTS[subsampling], seed=3)
    image = nearest(data)
    whole = chroma.interpolated_image(image, subsampling)
    side = 96
    corners = [(0, 0), (1, 1), (301 - side, 233 - side), (301 - side - 1, 233 - side - 1), (102, 37), (0, 233 - side)]
    windows = chroma.interpolated_windows([image] * len(corners), [(x, y, side, side) for x, y in corners], subsampling)
    for (x, y), window in zip(corners, windows, strict=True):
        assert torch.equal(window, whole[:, y : y + side, x : x + side]), (x, y)


@pytest.fixture
def nearest_chroma_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's decoder replaced by the nearest-chroma one, and `app.pixels` told it decodes that way (on a GPU
    it is told by the device)."""
    import torchvision.io

    import app.pixels

    def decode(encoded, **_):
        items = encoded if isinstance(encoded, list) else [encoded]
        images = [nearest(bytes(item.numpy())) for item in items]
        return images if isinstance(encoded, list) else images[0]

    monkeypatch.setattr(torchvision.io, "decode_jpeg", decode)
    monkeypatch.setattr(
        app.pixels,
        "_rebuilds_chroma",
        lambda device, header=None: header is None or header.chroma_subsampling in chroma.SUBSAMPLINGS,
    )


@needs_turbojpeg
@pytest.mark.usefixtures("nearest_chroma_decoder")
def test_decode_crops_from_a_nearest_chroma_decoder_equal_the_cpu_paths_in_every_orientation() -> None:
    photos = [
        photo_jpeg(260 + 7 * o, 231 + 3 * o, pillow, seed=o, orientation=o) for pillow in (2, 1, 0) for o in range(1, 9)
    ]
    side = 224
    crops = decode_crops(photos, side, "cpu", LIMITS)
    for data, crop in zip(photos, crops, strict=True):
        assert isinstance(crop, torch.Tensor), check_header(data)
        wrong = np.abs(crop.numpy().astype(int) - cpu_crop(data, side, LIMITS))
        assert wrong.mean() < 0.01 and wrong.max() <= 8, (check_header(data), wrong.mean(), wrong.max())
    for data, image in zip(photos[:8], decode_upright(photos[:8], "cpu", LIMITS), strict=True):
        wrong = np.abs(image.permute(1, 2, 0).numpy().astype(int) - np.asarray(decode_image(data), dtype=int))
        assert wrong.mean() < 0.01, (check_header(data), wrong.mean())


def test_the_header_names_the_chroma_layout_and_the_device_takes_only_those_it_rebuilds() -> None:
    layouts = {pillow: check_header(photo_jpeg(64, 48, pillow)).chroma_subsampling for pillow in (0, 1, 2)}
    assert layouts == {0: (1, 1), 1: (2, 1), 2: (2, 2)}
    grey = io.BytesIO()
    Image.new("L", (64, 48)).save(grey, "JPEG")
    assert check_header(grey.getvalue()).chroma_subsampling is None
    for layout, taken in (((1, 1), True), ((2, 1), True), ((2, 2), True), ((1, 2), False), ((4, 1), False)):
        header = Header("jpeg", "RGB", 640, 480, 1, layout)
        assert device_decodable(header, 224) is taken, layout
