"""Encoded photos to the detector's center crops on the model's device, in batches: nvJPEG on a GPU.

On a GPU node the bytes travel to the process that holds the model, and the pixels never leave the card: the JPEGs of
a batch are decoded together (`torchvision.io.decode_jpeg` on CUDA), turned upright by their EXIF orientation and
center-cropped there. Anything the device decoder should not or cannot take goes through the one CPU decoding path
(`app.images.decode_image`, `app.transforms.eval_preprocess`) with the same result: PNG and WebP, JPEGs that are not
3-channel YCbCr/RGB (grey, CMYK), files that end early (Pillow calls them truncated, a device decoder would fill
them with grey), photos smaller than the crop (the CPU path upscales them), and any JPEG the device decoder refuses
(some progressive or corrupt files). The crop is the same box as `eval_preprocess`'s, so the two paths differ only
by the decoders' rounding (tests/gpu bounds the gap on a GPU).

Which device decoder: nvImageCodec with interpolated ("fancy") chroma upsampling where it is installed, since
libjpeg-turbo upsamples chroma that way and a model that reads the high-pass residual sees the difference; otherwise
torchvision's nvJPEG call, whose default flags upsample 4:2:0 chroma by nearest neighbour.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from app.images import Header, ImageError, check_header, decode_image, jpeg_ends_early

if TYPE_CHECKING:
    import torch

    from app.config import ImageLimits


def device_decodable(header: Header, crop_size: int = 0) -> bool:
    """Whether the batched device decoder takes this photo (see the module docstring for the others)."""
    return header.kind == "jpeg" and header.mode == "RGB" and min(header.upright_size) >= crop_size


def decode_upright(photos: Sequence[bytes], device: Any, limits: ImageLimits) -> list[torch.Tensor | ImageError]:
    """Each photo whole and upright as a uint8 (3, H, W) tensor on ``device`` (for training's augmentation, which
    crops after degrading), or its `ImageError`; what the device decoder leaves is decoded by the CPU path and moved."""
    results, upright = _decode_batch(photos, 0, device, limits)
    for i, image in upright.items():
        results[i] = image
    for i, data in enumerate(photos):
        if results[i] is None:
            results[i] = _cpu_upright(data, device, limits)
    return results


def decode_crops(
    photos: Sequence[bytes], crop_size: int, device: Any, limits: ImageLimits
) -> list[torch.Tensor | np.ndarray | ImageError]:
    """Each photo's uint8 (crop, crop, 3) center crop - a tensor on ``device`` when the device decoded it, an array
    when the CPU path did - or the `ImageError` the CPU path gives it, in the order of ``photos``."""
    results, upright = _decode_batch(photos, crop_size, device, limits)
    for i, image in upright.items():
        _, height, width = image.shape
        left, top = (width - crop_size) // 2, (height - crop_size) // 2  # eval_preprocess's box
        results[i] = image[:, top : top + crop_size, left : left + crop_size].permute(1, 2, 0).contiguous()
    for i, data in enumerate(photos):
        if results[i] is None:
            results[i] = cpu_crop(data, crop_size, limits)
    return results


def _decode_batch(
    photos: Sequence[bytes], crop_size: int, device: Any, limits: ImageLimits
) -> tuple[list[Any], dict[int, torch.Tensor]]:
    """The header checks of every photo (their refusals in the first list, None elsewhere), and the photos the
    device decoded, upright (3, H, W), by index; the photos in neither are the CPU path's."""
    import torch

    refusals: list[Any] = [None] * len(photos)
    batch: list[int] = []
    orientations: dict[int, int] = {}
    for i, data in enumerate(photos):
        try:
            header = check_header(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
        except ImageError as err:
            refusals[i] = err
            continue
        if device_decodable(header, crop_size) and not jpeg_ends_early(data):
            batch.append(i)
            orientations[i] = header.orientation
    decoded = _decode_on_device([photos[i] for i in batch], torch.device(device))
    upright = {i: _orient(image, orientations[i]) for i, image in zip(batch, decoded, strict=True) if image is not None}
    return refusals, upright


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
    return sum(image is not None for image in _decode_on_device([data, data], torch.device(device)))


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
    """JPEG(s) decoded as RGB (3, H, W) uint8 on ``device`` (one encoded CPU tensor or a list), raising if any fails.
    nvImageCodec decodes on the caller's stream; torchvision's nvJPEG writes on a stream of its own, into blocks the
    caching allocator may have just taken back from tensors that kernels still queued on the caller's stream read
    (pytorch/vision#9606; NaN logits in a GPU-decoding training run), so that path waits for the queued work first."""
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    decoder = interpolating_decoder(device)
    if decoder is None:
        _wait_for_queued_work(device)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    single = isinstance(encoded, torch.Tensor)
    images = decode_interpolated(decoder, [encoded] if single else list(encoded), device)
    return images[0] if single else images


def device_decoder(device: Any) -> str:
    """The name of the decoder `decode_jpeg_on` uses on ``device``, for reports."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return "libjpeg-turbo (torchvision, CPU)"
    return "nvImageCodec, interpolated chroma" if interpolating_decoder(device) else "nvJPEG (torchvision)"


def interpolating_decoder(device: torch.device) -> Any:
    """An nvImageCodec decoder on this GPU with libjpeg-turbo's chroma upsampling; None off a GPU or where
    nvImageCodec is not installed (the package is optional: `nvidia-nvimgcodec-cu12`/`-cu13`)."""
    import torch

    if device.type != "cuda":
        return None
    return _nvimgcodec_decoder(device.index if device.index is not None else torch.cuda.current_device())


def interpolating_decoder_installed() -> bool:
    """Whether nvImageCodec is installed here, found without importing it (its import loads CUDA libraries)."""
    import importlib.util

    try:
        return importlib.util.find_spec("nvidia.nvimgcodec") is not None
    except ModuleNotFoundError:  # no `nvidia` namespace at all
        return False


# nvImageCodec's decoder option for libjpeg-turbo's interpolated chroma (its JPEG plug-ins default to nearest neighbour)
INTERPOLATED_CHROMA = ":fancy_upsampling=1"


@functools.cache
def _nvimgcodec_decoder(device_index: int) -> Any:
    try:
        from nvidia import nvimgcodec
    except ImportError:
        return None
    return nvimgcodec.Decoder(device_id=device_index, options=INTERPOLATED_CHROMA)


def decode_interpolated(decoder: Any, encoded: list[Any], device: torch.device) -> list[torch.Tensor]:
    """One batched nvImageCodec call on the caller's stream; its (H, W, 3) images copied into (3, H, W) tensors the
    caching allocator owns, so nothing outlives the decoder's own buffers."""
    import torch
    from nvidia import nvimgcodec

    streams = [nvimgcodec.CodeStream(bytes(t.numpy()) if isinstance(t, torch.Tensor) else bytes(t)) for t in encoded]
    params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)
    decoded = decoder.decode(streams, params=params, cuda_stream=torch.cuda.current_stream(device).cuda_stream)
    if any(image is None for image in decoded):
        raise ValueError("nvImageCodec could not decode a JPEG of the batch")
    # a CPU backend of a full nvImageCodec install returns host images: `.to` moves only those
    return [torch.from_dlpack(image).to(device).permute(2, 0, 1).contiguous() for image in decoded]


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
