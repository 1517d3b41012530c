"""Encoded photos to the detector's center crops on the model's device, in batches: nvJPEG on a GPU.

On a GPU node the bytes travel to the process that holds the model, and the pixels never leave the card: the JPEGs of
a batch are decoded together (`torchvision.io.decode_jpeg` on CUDA), their chroma interpolated as libjpeg-turbo does
(`app.chroma`: nvJPEG upsamples it by nearest neighbour, and a model that reads the high-pass residual sees the
difference), turned upright by their EXIF orientation and center-cropped there. Anything the device decoder should
not or cannot take goes through the one CPU decoding path (`app.images.decode_image`, `app.transforms.eval_preprocess`)
with the same result: PNG and WebP, JPEGs that are not 3-channel YCbCr/RGB (grey, CMYK) or whose chroma layout
`app.chroma` does not rebuild (4:4:0, 4:1:1), files that end early (Pillow calls them truncated, a device decoder
would fill them with grey), photos smaller than the crop (the CPU path upscales them), and any JPEG the device decoder
refuses (some progressive or corrupt files); so is a photo where clipped colour hides a chroma sample the crop needs
(`app.chroma`). The crop is the same box as `eval_preprocess`'s, so the two paths give the same pixels (tests/gpu
bounds the gap on a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from app.chroma import SUBSAMPLINGS, interpolated_image, interpolated_windows, warm_tables
from app.images import Header, ImageError, check_header, decode_image, jpeg_ends_early

if TYPE_CHECKING:
    import torch

    from app.config import ImageLimits


def device_decodable(header: Header, crop_size: int = 0) -> bool:
    """Whether the batched device decoder takes this photo (see the module docstring for the others)."""
    return (
        header.kind == "jpeg"
        and header.mode == "RGB"
        and header.chroma_subsampling in _DEVICE_SUBSAMPLINGS
        and min(header.upright_size) >= crop_size
    )


_DEVICE_SUBSAMPLINGS = ((1, 1), *SUBSAMPLINGS)


def decode_upright(photos: Sequence[bytes], device: Any, limits: ImageLimits) -> list[torch.Tensor | ImageError]:
    """Each photo whole and upright as a uint8 (3, H, W) tensor on ``device`` (for training's augmentation, which
    crops after degrading), or its `ImageError`; what the device decoder leaves is decoded by the CPU path and moved."""
    results, decoded = _decode_batch(photos, 0, device, limits)
    for i, (image, header) in decoded.items():
        if _rebuilds_chroma(image.device, header):
            image = interpolated_image(image, header.chroma_subsampling)
        if image is not None:
            results[i] = _orient(image, header.orientation)
    for i, data in enumerate(photos):
        if results[i] is None:
            results[i] = _cpu_upright(data, device, limits)
    return results


def decode_crops(
    photos: Sequence[bytes], crop_size: int, device: Any, limits: ImageLimits
) -> list[torch.Tensor | np.ndarray | ImageError]:
    """Each photo's uint8 (crop, crop, 3) center crop - a tensor on ``device`` when the device decoded it, an array
    when the CPU path did - or the `ImageError` the CPU path gives it, in the order of ``photos``."""
    results, decoded = _decode_batch(photos, crop_size, device, limits)
    boxes = {i: _stored_box(image, header.orientation, crop_size) for i, (image, header) in decoded.items()}
    windows: dict[int, torch.Tensor | None] = {}
    rebuilt: dict[tuple[int, int], list[int]] = {}
    for i, (image, header) in decoded.items():
        if _rebuilds_chroma(image.device, header):
            rebuilt.setdefault(header.chroma_subsampling, []).append(i)
        else:
            left, top, _, _ = boxes[i]
            windows[i] = image[:, top : top + crop_size, left : left + crop_size]
    for subsampling, indices in rebuilt.items():
        crops = interpolated_windows([decoded[i][0] for i in indices], [boxes[i] for i in indices], subsampling)
        windows.update(zip(indices, crops, strict=True))
    for i, window in windows.items():
        if window is not None:
            results[i] = _orient(window, decoded[i][1].orientation).permute(1, 2, 0).contiguous()
    for i, data in enumerate(photos):
        if results[i] is None:
            results[i] = cpu_crop(data, crop_size, limits)
    return results


def decode_jpeg_interpolated(encoded: torch.Tensor, device: Any) -> torch.Tensor:
    """One JPEG (an encoded CPU tensor) as libjpeg-turbo decodes it, (3, H, W) uint8 on ``device``: for a JPEG this
    process made itself (the augmentation's re-encoding), so no header check."""
    import torch

    device = torch.device(device)
    image = decode_jpeg_on(encoded, device)
    subsampling = check_header(bytes(encoded.numpy())).chroma_subsampling
    if _rebuilds_chroma(device) and subsampling in SUBSAMPLINGS:
        image = interpolated_image(image, subsampling)
        if image is None:  # a saturated colour hides a chroma sample: libjpeg-turbo itself, on the CPU
            image = decode_jpeg_on(encoded, "cpu").to(device)
    return image


def _rebuilds_chroma(device: torch.device, header: Header | None = None) -> bool:
    """nvJPEG upsamples chroma by nearest neighbour (torchvision passes no flag to change it); on a CPU torchvision
    decodes with libjpeg-turbo, which interpolates already."""
    return device.type == "cuda" and (header is None or header.chroma_subsampling in SUBSAMPLINGS)


def _stored_box(image: torch.Tensor, orientation: int, crop_size: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) in the stored photo of the center crop `eval_preprocess` takes from the upright
    one: the upright box's corners mapped back through the EXIF orientation."""
    _, height, width = image.shape
    upright_width, upright_height = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
    left, top = (upright_width - crop_size) // 2, (upright_height - crop_size) // 2

    def stored(x: int, y: int) -> tuple[int, int]:
        return {
            1: (x, y),
            2: (width - 1 - x, y),
            3: (width - 1 - x, height - 1 - y),
            4: (x, height - 1 - y),
            5: (y, x),
            6: (y, height - 1 - x),
            7: (width - 1 - y, height - 1 - x),
            8: (width - 1 - y, x),
        }[orientation]

    corners = (stored(left, top), stored(left + crop_size - 1, top + crop_size - 1))
    return min(x for x, _ in corners), min(y for _, y in corners), crop_size, crop_size


def _decode_batch(
    photos: Sequence[bytes], crop_size: int, device: Any, limits: ImageLimits
) -> tuple[list[Any], dict[int, tuple[torch.Tensor, Header]]]:
    """The header checks of every photo (their refusals in the first list, None elsewhere), and the photos the
    device decoded, as stored (3, H, W), with their headers, by index; the photos in neither are the CPU path's."""
    import torch

    refusals: list[Any] = [None] * len(photos)
    batch: list[int] = []
    headers: dict[int, Header] = {}
    for i, data in enumerate(photos):
        try:
            header = check_header(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
        except ImageError as err:
            refusals[i] = err
            continue
        if device_decodable(header, crop_size) and not jpeg_ends_early(data):
            batch.append(i)
            headers[i] = header
    decoded = _decode_on_device([photos[i] for i in batch], torch.device(device))
    stored = {i: (image, headers[i]) for i, image in zip(batch, decoded, strict=True) if image is not None}
    return refusals, stored


def _cpu_upright(data: bytes, device: Any, limits: ImageLimits) -> torch.Tensor | ImageError:
    import torch

    try:
        image = decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
    except ImageError as err:
        return err
    except MemoryError:
        return ImageError("too_many_pixels", "the image is too large to decode")
    except Exception as err:  # noqa: BLE001 - as cpu_crop
        return ImageError("corrupt", f"the image cannot be decoded ({type(err).__name__}: {err})")
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(device)


def cpu_crop(data: bytes, crop_size: int, limits: ImageLimits) -> np.ndarray | ImageError:
    """The CPU decoding path for one photo: its crop, or the reason it has none."""
    from app.transforms import eval_preprocess

    try:
        return eval_preprocess(decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels), crop_size)
    except ImageError as err:
        return err
    except MemoryError:
        return ImageError("too_many_pixels", "the image is too large to decode")
    except Exception as err:  # noqa: BLE001 - no decoder surprise may become a failure of the whole batch
        return ImageError("corrupt", f"the image cannot be decoded ({type(err).__name__}: {err})")


def stack_on(crops: Sequence[torch.Tensor | np.ndarray], device: Any) -> torch.Tensor:
    """One uint8 (N, H, W, 3) batch on ``device`` from crops decoded on either side."""
    import torch

    device = torch.device(device)
    return torch.stack([_on(crop, device) for crop in crops])


def _on(crop: torch.Tensor | np.ndarray, device: torch.device) -> torch.Tensor:
    import torch

    if isinstance(crop, torch.Tensor):
        return crop.to(device, non_blocking=True)
    return torch.from_numpy(np.require(crop, np.uint8, ["C", "W"])).to(device, non_blocking=True)


def warm_decoder(device: Any) -> int:
    """Decode two small JPEGs on ``device`` in one batch, so that the decoder's first-call setup (nvJPEG's handle and
    buffers, hundreds of milliseconds on a GPU) is spent at start and not by a request; how many it decoded. Call it
    on the thread that decodes."""
    import torch
    from torchvision.io import encode_jpeg

    pattern = torch.arange(3 * 32 * 48, dtype=torch.int64).reshape(3, 32, 48).remainder(251).to(torch.uint8)
    data = bytes(encode_jpeg(pattern, quality=90).numpy())
    device = torch.device(device)
    if device.type == "cuda":
        warm_tables(device)
    return sum(image is not None for image in _decode_on_device([data, data], device))


def _decode_on_device(photos: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """(3, H, W) uint8 per photo; None where the device decoder refused it. One batched call, and one call per photo
    only when the batch fails, to find which photo it failed on."""
    if not photos:
        return []
    import torch

    encoded = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in photos]
    try:
        return list(decode_jpeg_on(encoded, device))
    except Exception:  # noqa: BLE001 - a photo the device cannot decode falls back to the CPU path, alone
        pass
    images: list[torch.Tensor | None] = []
    for one in encoded:
        try:
            images.append(decode_jpeg_on(one, device))
        except Exception:  # noqa: BLE001 - see above
            images.append(None)
    return images


def decode_jpeg_on(encoded: Any, device: Any) -> Any:
    """JPEG(s) decoded as RGB (3, H, W) uint8 on ``device`` (one encoded CPU tensor or a list), raising if any fails;
    on a GPU with nearest-neighbour chroma (see `app.chroma`). nvJPEG writes on a stream of its own, into blocks the
    caching allocator may have just taken back from tensors that kernels still queued on the caller's stream read
    (pytorch/vision#9606; NaN logits in a GPU-decoding training run), so the queued work is waited for first."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    _wait_for_queued_work(device)
    return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)


def device_decoder(device: Any) -> str:
    """The name of the decoding `decode_crops` does on ``device``, for reports."""
    import torch

    if torch.device(device).type != "cuda":
        return "libjpeg-turbo (torchvision, CPU)"
    return "nvJPEG (torchvision), chroma interpolated as libjpeg-turbo's (app.chroma)"


def encode_jpeg_on(image: torch.Tensor, quality: int) -> torch.Tensor:
    """`torchvision.io.encode_jpeg` of a uint8 (3, H, W) image where it lives; on CUDA the encoder reads on a stream
    of its own, so the pixels queued for writing are written first."""
    from torchvision.io import encode_jpeg

    image = image.contiguous()
    _wait_for_queued_work(image.device)
    return encode_jpeg(image, quality=quality)


def _wait_for_queued_work(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (3, H, W) image turned as Pillow's `ImageOps.exif_transpose` turns it for this EXIF orientation."""
    import torch

    height_dim, width_dim = 1, 2
    if orientation == 2:
        image = image.flip(width_dim)
    elif orientation == 3:
        image = image.flip(height_dim, width_dim)
    elif orientation == 4:
        image = image.flip(height_dim)
    elif orientation == 5:
        image = image.transpose(height_dim, width_dim)
    elif orientation == 6:
        image = torch.rot90(image, -1, (height_dim, width_dim))
    elif orientation == 7:
        image = image.transpose(height_dim, width_dim).flip(height_dim, width_dim)
    elif orientation == 8:
        image = torch.rot90(image, 1, (height_dim, width_dim))
    return image
