"""Builds the odd and hostile image corpus at test time (no binary fixtures in the repository).

Each builder returns the file's bytes; tests write them to a tmp dir where a path is needed.
"""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image

RED = (255, 0, 0)
BLUE = (0, 0, 255)
GREEN = (0, 255, 0)


def encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, idat: bytes) -> bytes:
    """A PNG assembled chunk by chunk, for what Pillow cannot write (16-bit RGB, bombs)."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def png_rgb16(width: int = 16, height: int = 8, value: int = 0x8000) -> bytes:
    """16-bit RGB, every sample `value` (Pillow reads it as 8-bit RGB: value >> 8)."""
    row = b"\x00" + struct.pack(">H", value) * (3 * width)
    return raw_png(width, height, 16, 2, zlib.compress(row * height))


@functools.lru_cache(maxsize=1)
def png_bomb(side: int = 50_000) -> bytes:
    """A complete, valid 1-bit side x side PNG of zeros: ~300 KB on disk, 7.5 GB once decoded to RGB.

    Built cheaply: one 1000-row piece is deflated once, ending on a full flush (byte-aligned, no
    references back), and the same compressed piece is repeated; only the Adler-32 checksum walks
    all 312 MB of rows, in 6 MB steps.
    """
    rows_per_piece = 1000
    if side % rows_per_piece:
        raise ValueError("side must be a multiple of 1000")
    piece = bytes((1 + (side + 7) // 8) * rows_per_piece)
    deflater = zlib.compressobj(9, zlib.DEFLATED, -15)
    compressed_piece = deflater.compress(piece) + deflater.flush(zlib.Z_FULL_FLUSH)
    checksum = 1
    for _ in range(side // rows_per_piece):
        checksum = zlib.adler32(piece, checksum)
    final_block = b"\x03\x00"  # an empty final block with fixed Huffman codes
    stream = b"\x78\xda" + compressed_piece * (side // rows_per_piece) + final_block + struct.pack(">I", checksum)
    return raw_png(side, side, 1, 0, stream)


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header is rewritten to claim width x height."""
    data = bytearray(encode(noise(16, 16), "JPEG"))
    index = 2
    while index < len(data):
        marker = data[index + 1]
        length = int.from_bytes(data[index + 2 : index + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):
            data[index + 5 : index + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        index += 2 + length
    raise AssertionError("no SOF marker in the JPEG Pillow wrote")


def webp_claiming(width: int, height: int) -> bytes:
    """A small lossy WebP whose VP8 frame header is rewritten to claim width x height (max 16383)."""
    data = bytearray(encode(noise(16, 16), "WEBP", quality=80))
    if data[12:16] != b"VP8 " or data[23:26] != b"\x9d\x01\x2a":
        raise AssertionError("Pillow wrote an unexpected WebP layout")
    data[26:30] = struct.pack("<HH", width, height)
    return bytes(data)


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """20x10 as stored: left half red, right half blue; orientation 6 means 'rotate 90 clockwise'."""
    image = Image.new("RGB", (20, 10), BLUE)
    image.paste(RED, (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes())


def animated(fmt: str) -> bytes:
    """Two frames, red then blue: the decoder must return the red first frame."""
    frames = [Image.new("RGB", (12, 12), RED), Image.new("RGB", (12, 12), BLUE)]
    params = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)


def palette_with_transparency() -> bytes:
    """Palette image, index 0 transparent: transparent pixels must come out white."""
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
    image.paste(1, (0, 0, 4, 8))  # left half red, right half transparent
    return encode(image, "PNG", transparency=0)


def truncated(data: bytes, keep: float = 0.5) -> bytes:
    return data[: int(len(data) * keep)]


def png_bad_crc() -> bytes:
    data = bytearray(encode(noise(16, 16), "PNG"))
    data[29] ^= 0xFF  # last CRC byte of IHDR (8 signature + 4 length + 4 type + 13 data)
    return bytes(data)


def png_broken_idat() -> bytes:
    data = bytearray(encode(noise(32, 32), "PNG"))
    start = data.index(b"IDAT") + 4
    data[start + 20 : start + 120] = bytes(100)
    chunk_len = int.from_bytes(data[start - 8 : start - 4], "big")
    crc = zlib.crc32(bytes(data[start - 4 : start + chunk_len]))
    data[start + chunk_len : start + chunk_len + 4] = struct.pack(">I", crc)
    return bytes(data)


SVG = (
    b'<?xml version="1.0"?>\n'
    b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>\n'
)
TEXT = b"this is not a photo, just text in a file named photo.jpg\n"
HTML = b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>"
PDF = b"%PDF-1.4\n1 0 obj << >> endobj\ntrailer << >>\n%%EOF\n"
