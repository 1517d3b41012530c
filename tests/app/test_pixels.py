"""The batched decoder of photos sent as bytes (app/pixels.py) against the one CPU decoding path, on this machine's CPU:
the same crops, pixel for pixel, for every JPEG the device path takes (every EXIF orientation included), the CPU
path's own crop for what it leaves to it, and the same refusal for every photo of the bad-input corpus."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.config import ImageLimits
from app.images import ImageError, check_header
from app.pixels import cpu_crop, decode_crops, device_decodable, stack_on
from tests import hostile_images as hostile
from tests.helpers import CROP, jpeg, make_checkpoint

LIMITS = ImageLimits(max_bytes=2 * 1024 * 1024, max_pixels=20_000_000)
SIDE = 96


def photo(width: int = 200, height: int = 150, seed: int = 0) -> Image.Image:
    """A smooth scene with grain, so JPEG keeps detail in both its chroma and its luma."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    scene = np.stack([x * 255 / width, y * 255 / height, (x + y) % 256], -1) + rng.normal(0, 8, (height, width, 3))
    return Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8))


def oriented(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return hostile.encode(photo(211, 137, seed=orientation), "JPEG", quality=92, exif=exif.tobytes())


JPEGS = {
    "4:2:0 q75": lambda: hostile.encode(photo(seed=1), "JPEG", quality=75),
    "4:4:4 q95": lambda: hostile.encode(photo(seed=2), "JPEG", quality=95, subsampling=0),
    "4:2:2 q60": lambda: hostile.encode(photo(seed=3), "JPEG", quality=60, subsampling=1),
    "progressive": lambda: hostile.encode(photo(seed=4), "JPEG", quality=85, progressive=True, optimize=True),
    "odd sizes": lambda: hostile.encode(photo(203, 117, seed=5), "JPEG", quality=88),
    **{f"exif orientation {o}": (lambda o=o: oriented(o)) for o in range(1, 9)},
}

CPU_ONLY = {  # decoded on the CPU path by design, each for its reason
    "png": lambda: hostile.encode(photo(seed=6), "PNG"),
    "webp": lambda: hostile.encode(photo(seed=7), "WEBP", quality=90),
    "grey jpeg": lambda: hostile.encode(photo(seed=8).convert("L"), "JPEG"),
    "cmyk jpeg": lambda: hostile.encode(Image.new("CMYK", (150, 120), (0, 120, 255, 10)), "JPEG"),
    "smaller than the crop": lambda: hostile.encode(photo(80, 300, seed=9), "JPEG"),
    "rgba png": lambda: hostile.encode(Image.new("RGBA", (130, 130), (255, 0, 0, 90)), "PNG"),
}

BAD = {
    "text": lambda: hostile.TEXT,
    "empty": lambda: b"",
    "truncated jpeg": lambda: hostile.truncated(hostile.encode(photo(seed=10), "JPEG")),
    "truncated at a quarter": lambda: hostile.truncated(hostile.encode(photo(seed=11), "JPEG"), 0.25),
    "broken png": hostile.png_broken_idat,
    "png bad crc": hostile.png_bad_crc,
    "jpeg claiming 40000x40000": lambda: hostile.jpeg_claiming(40_000, 40_000),
    "webp claiming 16000x16000": lambda: hostile.webp_claiming(16_000, 16_000),
    "svg": lambda: hostile.SVG,
    "gif": lambda: hostile.animated("GIF"),
    "oversize": lambda: b"\xff\xd8\xff" + bytes(LIMITS.max_bytes),
}


def as_array(crop: torch.Tensor | np.ndarray) -> np.ndarray:
    return crop.numpy() if isinstance(crop, torch.Tensor) else crop


def test_jpegs_decoded_in_a_batch_equal_the_cpu_path() -> None:
    photos = [make() for make in JPEGS.values()]
    crops = decode_crops(photos, SIDE, "cpu", LIMITS)
    for name, data, crop in zip(JPEGS, photos, crops, strict=True):
        assert isinstance(crop, torch.Tensor), f"{name}: the batch decoder takes it"
        assert crop.shape == (SIDE, SIDE, 3) and crop.dtype == torch.uint8, name
        np.testing.assert_array_equal(crop.numpy(), cpu_crop(data, SIDE, LIMITS), err_msg=name)


def test_what_the_batch_decoder_leaves_gets_the_cpu_paths_crop() -> None:
    photos = [make() for make in CPU_ONLY.values()]
    crops = decode_crops(photos, SIDE, "cpu", LIMITS)
    for name, data, crop in zip(CPU_ONLY, photos, crops, strict=True):
        assert isinstance(crop, np.ndarray), f"{name}: left to the CPU path"
        np.testing.assert_array_equal(crop, cpu_crop(data, SIDE, LIMITS), err_msg=name)


def test_every_bad_photo_gets_the_cpu_paths_refusal_and_spoils_nothing_else() -> None:
    good = JPEGS["4:2:0 q75"]()
    photos = [good, *(make() for make in BAD.values()), good]
    crops = decode_crops(photos, SIDE, "cpu", LIMITS)
    for name, data, crop in zip(BAD, photos[1:-1], crops[1:-1], strict=True):
        expected = cpu_crop(data, SIDE, LIMITS)
        assert isinstance(expected, ImageError), name
        assert isinstance(crop, ImageError) and crop.reason == expected.reason, (name, crop)
    for crop in (crops[0], crops[-1]):
        np.testing.assert_array_equal(as_array(crop), cpu_crop(good, SIDE, LIMITS))


def test_a_jpeg_the_device_decoder_refuses_falls_back_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """nvJPEG refuses some files libjpeg-turbo decodes (some progressive ones); none is known on a CPU, so the device
    decoder is told to refuse one photo: the batch is retried photo by photo and only that one goes to the CPU."""
    import torchvision.io

    real = torchvision.io.decode_jpeg
    refused = JPEGS["progressive"]()
    calls = []

    def refusing(encoded, **kwargs):
        calls.append(len(encoded) if isinstance(encoded, list) else 1)
        items = encoded if isinstance(encoded, list) else [encoded]
        if any(bytes(item.numpy()) == refused for item in items):
            raise RuntimeError("nvjpeg: unsupported")
        return real(encoded, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", refusing)
    photos = [JPEGS["4:2:0 q75"](), refused, JPEGS["odd sizes"]()]
    crops = decode_crops(photos, SIDE, "cpu", LIMITS)
    assert calls == [3, 1, 1, 1], "one batched call, then one call per photo"
    assert [type(c).__name__ for c in crops] == ["Tensor", "ndarray", "Tensor"]
    for data, crop in zip(photos, crops, strict=True):
        np.testing.assert_array_equal(as_array(crop), cpu_crop(data, SIDE, LIMITS))


def test_the_header_says_what_the_decoder_needs() -> None:
    header = check_header(oriented(6))
    assert (header.kind, header.mode, header.orientation) == ("jpeg", "RGB", 6)
    assert (header.width, header.height) == (211, 137) and header.upright_size == (137, 211)
    assert device_decodable(header, 137) and not device_decodable(header, 138)
    assert check_header(hostile.encode(photo(), "PNG")).kind == "png"
    with pytest.raises(ImageError) as refused:
        check_header(hostile.jpeg_claiming(40_000, 40_000), max_pixels=LIMITS.max_pixels)
    assert refused.value.reason == "too_many_pixels"


def test_a_batch_mixes_both_kinds_of_crop() -> None:
    crops = [np.full((4, 4, 3), 7, np.uint8), torch.full((4, 4, 3), 9, dtype=torch.uint8)]
    batch = stack_on(crops, "cpu")
    assert batch.shape == (2, 4, 4, 3) and batch.dtype == torch.uint8
    assert batch[0].eq(7).all() and batch[1].eq(9).all()


def test_the_demo_test_split_scores_the_same_on_both_paths(small_demo: Path) -> None:
    """The parity the service and the scan rely on: the model's probabilities for the demo test split, from crops
    decoded in batches and from the CPU path. On a CPU both use libjpeg-turbo, so they are equal; the GPU machine's
    tolerance is in tests/gpu."""
    from app.model import load_checkpoint
    from serving.runtime import ActiveModel, score_batch

    with (small_demo / "manifest.csv").open(newline="") as fh:
        paths = [small_demo / row["path"] for row in csv.DictReader(fh) if row["split"] == "test"]
    assert len(paths) >= 20
    photos = [path.read_bytes() for path in paths]
    checkpoint = make_checkpoint(small_demo.parent / "pixels-ckpt", seed=4)
    loaded = load_checkpoint(checkpoint, device="cpu")
    active = ActiveModel(
        model=loaded.model.eval(), uri="", version="1", crop_size=CROP, threshold=0.5, device=torch.device("cpu"),
        bf16=False,
    )  # fmt: skip
    batched = score_batch(active, decode_crops(photos, CROP, "cpu", LIMITS))[:, 0]
    one_by_one = score_batch(active, [cpu_crop(data, CROP, LIMITS) for data in photos])[:, 0]
    np.testing.assert_allclose(batched, one_by_one, atol=1e-6)


def test_a_crop_on_the_device_fits_a_model_of_another_crop_size() -> None:
    from serving.runtime import fit_crop

    crop = decode_crops([jpeg(seed=2)], SIDE, "cpu", LIMITS)[0]
    assert isinstance(crop, torch.Tensor)
    assert fit_crop(crop, SIDE) is crop
    smaller = fit_crop(crop, 64)
    assert isinstance(smaller, np.ndarray) and smaller.shape == (64, 64, 3)


def test_the_decoder_warms_on_a_batch_it_can_decode() -> None:
    from app.pixels import warm_decoder

    assert warm_decoder("cpu") == 2, "both warm-up photos decode, so the batched path itself was run"
