"""An upload's bytes to the detector's crop, or to the contract's refusal: 400 not an image, 413 too large, 415 a
real image of a type the service does not take (GIF, SVG, HEIC, ...), told apart by content, not by name."""

from __future__ import annotations

import numpy as np

from app.config import ImageLimits
from app.contract import ApiError

_ERROR_STATUS = {"empty": 400, "truncated": 400, "corrupt": 400, "too_large": 413, "too_many_pixels": 413}

# Magic bytes of images that are real images but not ones we accept: these get 415, anything else 400.
_OTHER_IMAGE_TYPES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


def other_image_type(data: bytes) -> str | None:
    """The name of an image format we do not accept (GIF, SVG, HEIC, ...), or None when the bytes are no image."""
    for magic, name in _OTHER_IMAGE_TYPES:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"hevc"):
        return "HEIF/AVIF"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def image_error(err: Exception, data: bytes) -> ApiError:
    """Map `app.images.ImageError` reasons to the contract: 400 not an image, 413 too large, 415 unsupported type."""
    reason = getattr(err, "reason", "corrupt")
    if reason == "unsupported_type":
        other = other_image_type(data)
        if other is not None:
            return ApiError(415, "unsupported_type", f"{other} images are not supported; send a JPEG, PNG or WebP")
        return ApiError(400, "not_an_image", "the file is not an image (checked by its content, not its name)")
    return ApiError(_ERROR_STATUS.get(reason, 400), reason, str(err))


def decode_and_crop(data: bytes, crop_size: int, limits: ImageLimits) -> np.ndarray:
    """Validate, decode and center-crop one upload; the only CPU-heavy step of the ingress (runs in a thread)."""
    from app.images import ImageError, decode_image
    from app.transforms import eval_preprocess

    try:
        image = decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
        return eval_preprocess(image, crop_size)
    except ImageError as err:
        raise image_error(err, data) from err
    except MemoryError as err:
        raise ApiError(413, "too_many_pixels", "the image is too large to decode") from err
    except Exception as err:  # noqa: BLE001 - no decoder surprise may become a 500
        raise ApiError(400, "corrupt", f"the image cannot be decoded ({type(err).__name__}: {err})") from err


def check_upload(data: bytes, limits: ImageLimits) -> None:
    """The cheap half of `decode_and_crop`, for photos the detector decodes: the same refusals, from the header."""
    from app.images import ImageError, check_header

    try:
        check_header(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    except ImageError as err:
        raise image_error(err, data) from err
    except Exception as err:  # noqa: BLE001 - no header surprise may become a 500
        raise ApiError(400, "corrupt", f"the image cannot be decoded ({type(err).__name__}: {err})") from err


def check_with_evidence(data: bytes, limits: ImageLimits) -> tuple[bytes, dict]:
    """The upload as it goes to a detector that decodes (checked, not decoded) and its provenance evidence."""
    from serving.provenance import read_provenance

    check_upload(data, limits)
    return data, read_provenance(data, max_bytes=limits.max_bytes).model_dump()


def refused_image(reason: str, detail: str) -> ApiError:
    """A photo the detector could not decode, answered as the ingress would have answered it."""
    from app.images import ImageError

    return image_error(ImageError(reason, detail), b"")


def decode_with_evidence(data: bytes, crop_size: int, limits: ImageLimits) -> tuple[np.ndarray, dict]:
    """The crop and the file's provenance evidence (C2PA, IPTC/XMP, EXIF), in one trip to a worker thread: both read
    the same bytes, and the evidence never refuses an image the crop accepts."""
    from serving.provenance import read_provenance

    crop = decode_and_crop(data, crop_size, limits)
    return crop, read_provenance(data, max_bytes=limits.max_bytes).model_dump()
