"""A JPEG decoder with nvJPEG's chroma on this CPU: libjpeg-turbo's TurboJPEG API with its fast upsampling, which
repeats each chroma sample over its block as nvJPEG's default does (their gaps from the interpolating decode agree
to a hundredth of a grey level on the decoder benchmark's photos). Debian's `libturbojpeg0`; None where missing."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np

_RGB = 0  # TJPF_RGB
_FAST_UPSAMPLE = 256  # TJFLAG_FASTUPSAMPLE


@functools.cache
def _library() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("turbojpeg")
    if name is None:
        return None
    lib = ctypes.CDLL(name)
    lib.tjInitDecompress.restype = ctypes.c_void_p
    lib.tjDecompressHeader3.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_ulong, *[ctypes.c_void_p] * 4]
    lib.tjDecompress2.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_void_p,
        *[ctypes.c_int] * 5,
    ]
    lib.tjDestroy.argtypes = [ctypes.c_void_p]
    return lib


def available() -> bool:
    return _library() is not None


def decode_nearest_chroma(data: bytes) -> np.ndarray:
    """(H, W, 3) uint8 RGB with each chroma sample repeated over its block."""
    lib = _library()
    assert lib is not None, "libturbojpeg is not installed"
    handle = lib.tjInitDecompress()
    try:
        width, height, subsampling, colorspace = (ctypes.c_int() for _ in range(4))
        sizes = (ctypes.byref(width), ctypes.byref(height), ctypes.byref(subsampling), ctypes.byref(colorspace))
        if lib.tjDecompressHeader3(handle, data, len(data), *sizes) != 0:
            raise ValueError("libturbojpeg cannot read the header")
        out = np.empty((height.value, width.value, 3), np.uint8)
        pitch = 0  # rows packed
        flags = _FAST_UPSAMPLE
        if lib.tjDecompress2(handle, data, len(data), out.ctypes.data, width.value, pitch, height.value, _RGB, flags):
            raise ValueError("libturbojpeg cannot decode the photo")
        return out
    finally:
        lib.tjDestroy(handle)
