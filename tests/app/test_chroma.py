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


def photo_jpeg(
    width: int, height: int, subsampling: int, seed: int = 0, orientation: int = 1, saturated: bool = False
) -> bytes:
    """A photo-like JPEG: smooth colour fields with sensor-like grain, and with ``saturated`` colours that clip a
    channel at 0 or 255 in places (as a pure red product does)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.float32)
    scaled = base * 1.3 - 40 if saturated else base * 0.6 + 50
    pixels = np.clip(scaled + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
    return _jpeg(pixels, subsampling, orientation)


def _jpeg(pixels: np.ndarray, subsampling: int, orientation: int = 1) -> bytes:
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
    rebuilt = chroma.interpolated_image(nearest(data), subsampling)
    expected = libjpeg_turbo(data).astype(int)
    assert np.abs(before - expected).mean() > 0.5, "the emulated decoder must start from nearest-neighbour chroma"
    assert rebuilt is not None
    assert np.array_equal(rebuilt.numpy().transpose(1, 2, 0), expected)


@needs_turbojpeg
@pytest.mark.parametrize("subsampling", list(LAYOUTS))
def test_a_chroma_sample_that_clipping_hides_leaves_the_photo_to_the_cpu(subsampling: tuple[int, int]) -> None:
    """Pure red (green and blue at 0) leaves its red-difference sample a range; so does the near-white ringing where
    a product meets a white background, enough to move the product's edge by a grey level or more. Neither is
    guessed: the window comes back None, for the CPU to decode."""
    rng = np.random.default_rng(5)
    shade = rng.normal(0, 3, (120, 160, 1))
    red = np.zeros((120, 160, 3))
    red[..., 0] = np.clip(150 + np.linspace(-60, 60, 160)[None, :] + shade[..., 0], 0, 255)
    on_white = np.full((120, 160, 3), 255.0)
    product = np.array([120.0, 90, 70]) + np.linspace(-40, 40, 80)[None, :, None] + shade[30:90, 40:120]
    on_white[30:90, 40:120] = product
    for pixels in (red, on_white):
        data = _jpeg(np.clip(pixels, 0, 255).astype(np.uint8), LAYOUTS[subsampling])
        assert chroma.interpolated_image(nearest(data), subsampling) is None


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
    """Every crop is the CPU path's, pixel for pixel: rebuilt on the device, or, where a saturated colour hides a
    chroma sample, decoded on the CPU."""
    photos = [
        photo_jpeg(260 + 7 * o, 231 + 3 * o, pillow, seed=o, orientation=o, saturated=o % 3 == 0)
        for pillow in (2, 1, 0)
        for o in range(1, 9)
    ]
    side = 224
    crops = decode_crops(photos, side, "cpu", LIMITS)
    on_device = [isinstance(crop, torch.Tensor) for crop in crops]
    assert on_device == [o % 3 != 0 or pillow == 0 for pillow in (2, 1, 0) for o in range(1, 9)]
    for data, crop in zip(photos, crops, strict=True):
        pixels = crop.numpy() if isinstance(crop, torch.Tensor) else crop
        assert np.array_equal(pixels, cpu_crop(data, side, LIMITS)), check_header(data)
    for data, image in zip(photos[:8], decode_upright(photos[:8], "cpu", LIMITS), strict=True):
        assert np.array_equal(image.permute(1, 2, 0).numpy(), np.asarray(decode_image(data))), check_header(data)


@needs_turbojpeg
@pytest.mark.usefixtures("nearest_chroma_decoder")
def test_the_demo_test_split_from_a_nearest_chroma_decoder_gets_the_cpu_paths_crops(small_demo) -> None:
    """The GPU parity test's photos (tests/gpu), here with nvJPEG's chroma emulated: every crop is the CPU path's,
    and enough of them are rebuilt, not left to the CPU, for that test to test the rebuild."""
    import csv

    with (small_demo / "manifest.csv").open(newline="") as fh:
        photos = [(small_demo / row["path"]).read_bytes() for row in csv.DictReader(fh) if row["split"] == "test"]
    crops = decode_crops(photos, 64, "cpu", LIMITS)
    rebuilt = sum(isinstance(crop, torch.Tensor) for crop in crops)
    assert rebuilt >= len(photos) // 4, f"{rebuilt} of {len(photos)}"
    for data, crop in zip(photos, crops, strict=True):
        pixels = crop.numpy() if isinstance(crop, torch.Tensor) else crop
        assert np.array_equal(pixels, cpu_crop(data, 64, LIMITS)), check_header(data)


def test_the_header_names_the_chroma_layout_and_the_device_takes_only_those_it_rebuilds() -> None:
    layouts = {pillow: check_header(photo_jpeg(64, 48, pillow)).chroma_subsampling for pillow in (0, 1, 2)}
    assert layouts == {0: (1, 1), 1: (2, 1), 2: (2, 2)}
    grey = io.BytesIO()
    Image.new("L", (64, 48)).save(grey, "JPEG")
    assert check_header(grey.getvalue()).chroma_subsampling is None
    for layout, taken in (((1, 1), True), ((2, 1), True), ((2, 2), True), ((1, 2), False), ((4, 1), False)):
        header = Header("jpeg", "RGB", 640, 480, 1, layout)
        assert device_decodable(header, 224) is taken, layout
