import resource
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.images import (
    DEFAULT_MAX_BYTES,
    ImageError,
    decode_image,
    read_image_bytes,
    sniff_type,
    to_rgb,
)
from tests import hostile_images as h


def _mode_png(mode: str, color) -> bytes:
    return h.encode(Image.new(mode, (9, 7), color), "PNG")


# name -> (bytes builder, expected size, expected RGB at (0, 0) or None)
ACCEPTED = {
    "rgb_jpeg": (lambda: h.encode(h.noise(), "JPEG"), (64, 48), None),
    "rgb_png": (lambda: h.encode(h.noise(), "PNG"), (64, 48), None),
    "rgb_webp_lossy": (lambda: h.encode(h.noise(), "WEBP", quality=80), (64, 48), None),
    "rgb_webp_lossless": (lambda: h.encode(h.noise(), "WEBP", lossless=True), (64, 48), None),
    "mode_1_png": (lambda: _mode_png("1", 1), (9, 7), (255, 255, 255)),
    "mode_L_png": (lambda: _mode_png("L", 100), (9, 7), (100, 100, 100)),
    "mode_L_jpeg": (lambda: h.encode(Image.new("L", (9, 7), 100), "JPEG", quality=95), (9, 7), None),
    "mode_LA_transparent": (lambda: _mode_png("LA", (0, 0)), (9, 7), (255, 255, 255)),
    "mode_LA_opaque": (lambda: _mode_png("LA", (40, 255)), (9, 7), (40, 40, 40)),
    "mode_P": (lambda: h.encode(Image.new("RGB", (9, 7), h.GREEN).convert("P"), "PNG"), (9, 7), h.GREEN),
    "mode_P_transparency": (h.palette_with_transparency, (8, 8), h.RED),
    "mode_RGBA_transparent": (lambda: _mode_png("RGBA", (0, 0, 0, 0)), (9, 7), (255, 255, 255)),
    "mode_RGBA_half": (lambda: _mode_png("RGBA", (0, 0, 0, 128)), (9, 7), (127, 127, 127)),
    "mode_RGBA_webp": (
        lambda: h.encode(Image.new("RGBA", (9, 7), (0, 0, 0, 0)), "WEBP", lossless=True),
        (9, 7),
        (255, 255, 255),
    ),
    "mode_CMYK_jpeg": (lambda: h.encode(Image.new("CMYK", (9, 7), (0, 0, 0, 0)), "JPEG", quality=95), (9, 7), None),
    "mode_I16_png": (lambda: _mode_png("I;16", 65535), (9, 7), (255, 255, 255)),
    "rgb_16bit_png": (h.png_rgb16, (16, 8), (128, 128, 128)),
    "animated_png": (lambda: h.animated("PNG"), (12, 12), h.RED),
    "animated_webp": (lambda: h.animated("WEBP"), (12, 12), h.RED),
    "one_pixel_png": (lambda: h.encode(Image.new("RGB", (1, 1), h.BLUE), "PNG"), (1, 1), h.BLUE),
    "one_pixel_jpeg": (lambda: h.encode(Image.new("RGB", (1, 1), h.BLUE), "JPEG"), (1, 1), None),
    "one_pixel_webp": (lambda: h.encode(Image.new("RGB", (1, 1), h.BLUE), "WEBP", lossless=True), (1, 1), h.BLUE),
    "exif_rotated_jpeg": (h.exif_rotated_jpeg, (10, 20), None),
}


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_accepted_files_decode_to_rgb(name):
    build, size, corner = ACCEPTED[name]
    image = decode_image(build())
    assert image.mode == "RGB"
    assert image.size == size
    if corner is not None:
        assert np.allclose(image.getpixel((0, 0)), corner, atol=2)


def test_cmyk_jpeg_white_stays_white():
    # Adobe CMYK JPEGs store inverted ink; zero ink must come out white, not black
    image = decode_image(ACCEPTED["mode_CMYK_jpeg"][0]())
    assert min(image.getpixel((4, 3))) > 245


def test_exif_orientation_is_applied():
    image = decode_image(h.exif_rotated_jpeg(orientation=6))
    assert image.size == (10, 20)
    top, bottom = np.asarray(image)[2, 5], np.asarray(image)[17, 5]
    assert top[0] > 200 and top[2] < 60  # the stored left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def _oversize() -> bytes:
    return b"\xff\xd8\xff" + bytes(DEFAULT_MAX_BYTES)


REJECTED = {
    "zero_bytes": (lambda: b"", "empty"),
    "oversize_bytes": (_oversize, "too_large"),
    "text_named_jpg": (lambda: h.TEXT, "unsupported_type"),
    "svg": (lambda: h.SVG, "unsupported_type"),
    "html": (lambda: h.HTML, "unsupported_type"),
    "pdf": (lambda: h.PDF, "unsupported_type"),
    "gif": (lambda: h.encode(h.noise().convert("P"), "GIF"), "unsupported_type"),
    "animated_gif": (lambda: h.animated("GIF"), "unsupported_type"),
    "bmp": (lambda: h.encode(h.noise(), "BMP"), "unsupported_type"),
    "tiff": (lambda: h.encode(h.noise(), "TIFF"), "unsupported_type"),
    "ico": (lambda: h.encode(h.noise(32, 32), "ICO"), "unsupported_type"),
    "truncated_jpeg": (lambda: h.truncated(h.encode(h.noise(), "JPEG")), "truncated"),
    "truncated_png": (lambda: h.truncated(h.encode(h.noise(), "PNG")), "truncated"),
    "truncated_webp": (lambda: h.truncated(h.encode(h.noise(), "WEBP")), "truncated"),
    "jpeg_magic_only": (lambda: b"\xff\xd8\xff", "truncated"),
    "png_signature_only": (lambda: b"\x89PNG\r\n\x1a\n", "truncated"),
    "png_bad_crc": (h.png_bad_crc, "corrupt"),
    "png_broken_idat": (h.png_broken_idat, "corrupt"),
    "jpeg_garbage": (lambda: b"\xff\xd8\xff" + bytes(range(256)) * 2, "corrupt"),
    "png_zero_size": (lambda: h.raw_png(0, 0, 8, 0, b""), "corrupt"),
    "png_bomb_50k": (h.png_bomb, "too_many_pixels"),
    "jpeg_claims_60k": (lambda: h.jpeg_claiming(60_000, 60_000), "too_many_pixels"),
    "webp_claims_16k": (lambda: h.webp_claiming(16_000, 16_000), "too_many_pixels"),
}


@pytest.mark.parametrize("name", sorted(REJECTED))
def test_rejected_files_raise_one_error_with_reason(name):
    build, reason = REJECTED[name]
    with pytest.raises(ImageError) as info:
        decode_image(build())
    assert info.value.reason == reason
    assert str(info.value)  # a message a user can read


def test_png_bomb_is_refused_from_the_header_quickly():
    bomb = h.png_bomb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    with pytest.raises(ImageError) as info:
        decode_image(bomb)
    assert time.perf_counter() - started < 0.5
    assert info.value.reason == "too_many_pixels"
    assert "50000x50000" in str(info.value)
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before
    assert grown_kib < 50 * 1024  # decoding it would need 7.5 GB


def test_limits_are_the_callers():
    data = h.encode(h.noise(64, 48), "PNG")
    assert decode_image(data, max_bytes=len(data), max_pixels=64 * 48).size == (64, 48)
    with pytest.raises(ImageError) as info:
        decode_image(data, max_bytes=len(data) - 1)
    assert info.value.reason == "too_large"
    with pytest.raises(ImageError) as info:
        decode_image(data, max_pixels=64 * 48 - 1)
    assert info.value.reason == "too_many_pixels"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_mutated_files_never_leak_another_exception(fmt):
    rng = np.random.default_rng(7)
    original = h.encode(h.noise(24, 24), fmt)
    for _ in range(60):
        data = bytearray(original)
        for position in rng.integers(0, len(data), size=int(rng.integers(1, 8))):
            data[position] = int(rng.integers(0, 256))
        data = bytes(data[: int(rng.integers(1, len(data) + 1))])
        try:
            image = decode_image(data)
        except ImageError as err:
            assert err.reason in {"truncated", "corrupt", "too_many_pixels", "unsupported_type"}
        else:
            assert image.mode == "RGB"


@pytest.mark.parametrize(
    "data, expected",
    [
        (h.encode(h.noise(8, 8), "JPEG"), "jpeg"),
        (h.encode(h.noise(8, 8), "PNG"), "png"),
        (h.encode(h.noise(8, 8), "WEBP"), "webp"),
        (h.encode(h.noise(8, 8), "GIF"), None),
        (h.SVG, None),
        (b"RIFF\x00\x00\x00\x00WAVEfmt ", None),
        (b"", None),
    ],
    ids=["jpeg", "png", "webp", "gif", "svg", "riff_wave", "empty"],
)
def test_sniff_type_reads_magic_bytes(data, expected):
    assert sniff_type(data) == expected


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("I;16", (2, 2), 65535), 255),
        (Image.fromarray(np.full((2, 2), 32896, dtype=np.int32)), 128),  # mode I, 16-bit range
        (Image.fromarray(np.full((2, 2), 0.5, dtype=np.float32)), 128),  # mode F in [0, 1]
        (Image.fromarray(np.full((2, 2), 200.0, dtype=np.float32)), 200),  # mode F in [0, 255]
        (Image.new("La", (2, 2), (0, 0)), 255),
        (Image.new("PA", (2, 2), (0, 0)), 255),
        (Image.new("YCbCr", (2, 2), (128, 128, 128)), 128),
    ],
    ids=["I;16", "I", "F_unit", "F_255", "La", "PA", "YCbCr"],
)
def test_to_rgb_scales_every_mode_to_8_bit(image, expected):
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.allclose(np.asarray(rgb), expected, atol=1)


def test_read_image_bytes_local_path_and_file_uri(tmp_path: Path):
    data = h.encode(h.noise(), "PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    assert read_image_bytes(str(path)) == data
    assert read_image_bytes(path.as_uri()) == data


def test_text_named_jpg_is_refused_by_content(tmp_path: Path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(h.TEXT)
    with pytest.raises(ImageError) as info:
        decode_image(read_image_bytes(str(path)))
    assert info.value.reason == "unsupported_type"


@pytest.mark.parametrize("uri", [False, True], ids=["path", "uri"])
def test_read_image_bytes_stops_past_the_limit(uri):
    # /dev/zero never ends: returning at all proves the read is bounded
    source = "file:///dev/zero" if uri else "/dev/zero"
    with pytest.raises(ImageError) as info:
        read_image_bytes(source, max_bytes=1000)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize("uri", [False, True], ids=["path", "uri"])
def test_read_image_bytes_too_large_file(tmp_path: Path, uri):
    path = tmp_path / "big.jpg"
    path.write_bytes(b"\xff\xd8\xff" + bytes(5000))
    with pytest.raises(ImageError) as info:
        read_image_bytes(path.as_uri() if uri else str(path), max_bytes=4096)
    assert info.value.reason == "too_large"


@pytest.mark.parametrize("uri", [False, True], ids=["path", "uri"])
def test_read_image_bytes_missing_file(tmp_path: Path, uri):
    path = tmp_path / "nope.jpg"
    with pytest.raises(FileNotFoundError):
        read_image_bytes(path.as_uri() if uri else str(path))
