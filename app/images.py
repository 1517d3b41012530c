"""The one decoding path for every byte that enters: dataset files and HTTP uploads alike.

Everything that is not a well-formed JPEG, PNG or WebP within the limits becomes one `ImageError`
with a machine-readable `reason`, so callers (Ray Data readers, the HTTP API) can count, skip or map
it to a status code without knowing anything about Pillow's many exception types.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from app.errors import UserError

if TYPE_CHECKING:
    from app.config import ImageLimits

DEFAULT_MAX_BYTES = 10 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000

REASONS = ("empty", "too_large", "too_many_pixels", "unsupported_type", "truncated", "corrupt")

# Calling the format plugins directly (instead of Image.open) means Pillow's global
# MAX_IMAGE_PIXELS check and its DecompressionBombWarning never fire: the pixel limit is ours alone,
# checked from the header before a single pixel is decoded, and no global Pillow state is touched.
_OPENERS: dict[str, type[ImageFile.ImageFile]] = {
    "jpeg": JpegImagePlugin.JpegImageFile,
    "png": PngImagePlugin.PngImageFile,
    "webp": WebPImagePlugin.WebPImageFile,
}

_WHITE = (255, 255, 255)


class ImageError(UserError, ValueError):
    """A byte string that cannot become an RGB image; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown image error reason {reason!r}")
        super().__init__(message)
        self.reason = reason


def sniff_type(data: bytes) -> str | None:
    """The real type from the magic bytes; file names and Content-Type headers are not trusted."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


@dataclass(frozen=True)
class Header:
    """What a photo's header says, read without decoding a pixel: enough to refuse it, or to hand it to a batch
    decoder on another device (`app.pixels`)."""

    kind: str  # jpeg, png, webp
    mode: str  # Pillow's mode of the stored pixels (RGB, L, CMYK, RGBA, ...)
    width: int  # as stored, before the EXIF orientation
    height: int
    orientation: int  # EXIF orientation 1-8; 1 when there is none or it cannot be read
    # a YCbCr JPEG's chroma subsampling, (horizontal, vertical): (1, 1) 4:4:4, (2, 1) 4:2:2, (2, 2) 4:2:0; None for
    # other formats, other colour codings and layouts whose two chroma planes differ
    chroma_subsampling: tuple[int, int] | None = None

    @property
    def upright_size(self) -> tuple[int, int]:
        """(width, height) once the orientation is applied: orientations 5-8 turn the photo on its side."""
        return (self.height, self.width) if self.orientation in (5, 6, 7, 8) else (self.width, self.height)


def check_header(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS) -> Header:
    """The cheap checks of `decode_image` alone - size, type from the content, the pixel limit from the header - so a
    service can refuse a photo (400/413/415) before anything decodes it."""
    image, kind = _checked_header(data, max_bytes, max_pixels)
    return Header(kind, image.mode, image.width, image.height, _orientation(image), _chroma_subsampling(image))


def decode_image(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Validate and decode to an upright RGB image (EXIF orientation applied, alpha on white)."""
    image, kind = _checked_header(data, max_bytes, max_pixels)
    try:
        image.load()  # first frame only for animated PNG/WebP
    except Exception as err:  # noqa: BLE001 - every decoder failure is reported as one ImageError
        raise _decoder_error(err, data, kind, "data") from err

    try:
        return to_rgb(_upright(image))
    except Exception as err:  # noqa: BLE001 - a mode Pillow cannot convert is a corrupt file, not a 500
        raise ImageError("corrupt", f"the {kind.upper()} image cannot be converted to RGB ({err})") from err


def jpeg_ends_early(data: bytes) -> bool:
    """Whether a JPEG's bytes stop before its end marker: Pillow calls such a file truncated, where a device decoder
    may fill the rest with grey and answer."""
    return _jpeg_ends_early(data)


def _checked_header(data: bytes, max_bytes: int, max_pixels: int) -> tuple[ImageFile.ImageFile, str]:
    if len(data) == 0:
        raise ImageError("empty", "the file is empty (0 bytes)")
    if len(data) > max_bytes:
        raise ImageError("too_large", f"the file has {len(data):,} bytes; the limit is {max_bytes:,}")
    kind = sniff_type(data)
    if kind is None:
        raise ImageError("unsupported_type", "not a JPEG, PNG or WebP image (checked by content, not name)")

    image = _open_header(data, kind)
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError("corrupt", f"the {kind.upper()} header declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"the image declares {width}x{height} = {width * height:,} pixels; the limit is {max_pixels:,}",
        )
    return image, kind


def _chroma_subsampling(image: Image.Image) -> tuple[int, int] | None:
    """From the JPEG frame header's sampling factors (Pillow's `layer`: id, horizontal, vertical, table)."""
    layers = getattr(image, "layer", None)
    if image.format != "JPEG" or image.mode != "RGB" or not layers or len(layers) != 3:
        return None
    if image.info.get("adobe_transform") == 0:  # the planes are R, G and B, not luma and chroma
        return None
    (_, luma_h, luma_v, _), (_, cb_h, cb_v, _), (_, cr_h, cr_v, _) = layers
    if (cb_h, cb_v) != (cr_h, cr_v) or luma_h % cb_h or luma_v % cb_v:
        return None
    return luma_h // cb_h, luma_v // cb_v


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation `ImageOps.exif_transpose` would apply; 1 for none or a broken EXIF block."""
    try:
        value = int(image.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - metadata damage leaves the pixels as stored (see _upright)
        return 1
    return value if 1 <= value <= 8 else 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB: transparency composited on white, high bit depths scaled down.

    Pillow's own convert() clips 16-bit and 32-bit greys to 255 instead of scaling them, which turns
    most 16-bit photos white, so those modes go through numpy.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "La":  # premultiplied; Pillow converts it only to LA
        image, mode = image.convert("LA"), "LA"
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "RGBa", "LA", "PA"):
        return _on_white(image.convert("RGBA"))
    if mode.startswith("I;16") or mode == "I":
        grey = np.asarray(image).astype(np.float32) / 257.0
        return _grey_to_rgb(grey)
    if mode == "F":
        grey = np.asarray(image, dtype=np.float32)
        if np.isfinite(grey).all() and float(grey.max(initial=0.0)) <= 1.0:
            grey = grey * 255.0  # float images conventionally hold [0, 1]
        return _grey_to_rgb(grey)
    return image.convert("RGB")


def read_image_bytes(path: str, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Read a local path or any pyarrow filesystem URI (s3://, gs://, file://), never past max_bytes+1.

    The size limit is enforced while reading, so a huge object costs at most max_bytes+1 bytes of
    transfer and memory even when the filesystem cannot report its size up front.
    """
    from app.storage import filesystem_of, is_uri

    path = os.fspath(path)
    if not is_uri(path):
        with open(path, "rb") as handle:
            data = handle.read(max_bytes + 1)
    else:
        from pyarrow import fs as pafs

        filesystem, inner = filesystem_of(path)
        info = filesystem.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"no such file: {path}")
        if info.type == pafs.FileType.Directory:
            raise IsADirectoryError(f"is a directory, not an image file: {path}")
        if info.size is not None and info.size > max_bytes:
            raise ImageError("too_large", f"{path} has {info.size:,} bytes; the limit is {max_bytes:,}")
        with filesystem.open_input_stream(inner) as stream:
            data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError("too_large", f"{path} has more than {max_bytes:,} bytes")
    return data


def read_and_decode(path: str, limits: ImageLimits) -> Image.Image:
    """A dataset file through the one decoding path: read within the byte limit, then validated and decoded."""
    return decode_image(
        read_image_bytes(path, max_bytes=limits.max_bytes), max_bytes=limits.max_bytes, max_pixels=limits.max_pixels
    )


def _open_header(data: bytes, kind: str) -> ImageFile.ImageFile:
    """Parse only the header: size and mode are known, no pixel is decoded yet."""
    try:
        return _OPENERS[kind](io.BytesIO(data))
    except Exception as err:  # noqa: BLE001 - Pillow raises SyntaxError, OSError, struct.error ...
        raise _decoder_error(err, data, kind, "header") from err


def _decoder_error(err: Exception, data: bytes, kind: str, part: str) -> ImageError:
    """Truncated when Pillow says so or the file lacks its end marker; corrupt otherwise.

    Pillow's messages for a cut-off file vary by format and by where the cut falls ("image file is
    truncated", "Truncated File Read", "could not create decoder object" for WebP), so the file's
    own structure decides too.
    """
    text = str(err) or type(err).__name__
    if isinstance(err, Image.DecompressionBombError):  # Pillow's WebP opener checks its own limit first
        return ImageError("too_many_pixels", f"the {kind.upper()} image declares too many pixels ({text})")
    if isinstance(err, EOFError) or "truncated" in text.lower() or _ends_early(data, kind):
        return ImageError("truncated", f"the {kind.upper()} file ends early ({text})")
    return ImageError("corrupt", f"the {kind.upper()} {part} cannot be decoded ({text})")


def _ends_early(data: bytes, kind: str) -> bool:
    if kind == "jpeg":
        return _jpeg_ends_early(data)
    if kind == "png":
        return b"IEND" not in data[-64:]
    if len(data) < 12:  # webp: the RIFF header states the file's length
        return True
    return int.from_bytes(data[4:8], "little") + 8 > len(data)


def _upright(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation; a broken EXIF block leaves the pixels as stored rather than failing."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - metadata damage must not lose an otherwise valid photo
        return image


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def _grey_to_rgb(grey: np.ndarray) -> Image.Image:
    grey = np.nan_to_num(grey, nan=0.0, posinf=255.0, neginf=0.0)
    eight_bit = np.clip(np.rint(grey), 0, 255).astype(np.uint8)
    return Image.fromarray(eight_bit).convert("RGB")


def _jpeg_ends_early(data: bytes) -> bool:
    """Walk the marker segments: running out of bytes is truncation, a non-marker is corruption."""
    index = 2
    while index + 4 <= len(data):
        if data[index] != 0xFF:
            return False
        marker = data[index + 1]
        if marker == 0xFF:  # fill byte
            index += 1
        elif marker == 0xDA:  # start of scan: entropy-coded data runs to the EOI marker
            return not data.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
        elif marker in (0x00, 0xD9):
            return False
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            index += 2
        else:
            index += 2 + int.from_bytes(data[index + 2 : index + 4], "big")
    return True
