"""Procedural product shots: the content both classes share.

Each scene is drawn from its own seeded generator, so thousands of distinct shots come from a few photos: a
background (a crop of a real photo, a studio gradient or a tabletop), then one to three products (boxes,
bottles, cans, discs, balls, tubes) with shading, highlights, soft shadows and printed or photographic labels.
Scenes are rendered at twice the output size so that the camera and the decoders both start from detail finer
than their own sampling grid, as they do with the world.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from functools import cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from scipy.ndimage import gaussian_filter

from app.demo.sources import SourcePhoto, load_photo, photos_for_split

_PRODUCTS = ("box", "bottle", "can", "disc", "ball", "tube")


@dataclass(frozen=True)
class Scene:
    image: np.ndarray  # float32 (H, W, 3) in [0, 1], sRGB-encoded
    sources: tuple[str, ...]  # names of the photos whose pixels appear in it
    products: tuple[str, ...]


@cache
def _photo_image(name: str) -> Image.Image:
    return Image.fromarray((load_photo(name) * 255.0 + 0.5).astype(np.uint8))


@cache
def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _random_colour(rng: np.random.Generator, lo: float = 0.05, hi: float = 0.95) -> np.ndarray:
    return rng.uniform(lo, hi, size=3).astype(np.float32)


def _photo_crop(rng: np.random.Generator, photo: SourcePhoto, h: int, w: int) -> np.ndarray:
    """A random crop resized to (h, w), flipped and colour-jittered; grey textures get a random two-tone tint."""
    src = _photo_image(photo.name)
    sw, sh = src.size
    scale = rng.uniform(0.6, 2.5)
    cw = int(min(sw, max(8, w * scale)))
    ch = int(min(sh, max(8, h * scale)))
    x0 = int(rng.integers(0, sw - cw + 1))
    y0 = int(rng.integers(0, sh - ch + 1))
    crop = src.resize((w, h), Image.BICUBIC, box=(x0, y0, x0 + cw, y0 + ch))
    arr = np.asarray(crop, dtype=np.float32) / 255.0
    if rng.random() < 0.5:
        arr = arr[:, ::-1]
    if rng.random() < 0.3:
        arr = arr[::-1]
    if not photo.colour:
        grey = arr[..., :1]
        dark, light = _random_colour(rng, 0.0, 0.5), _random_colour(rng, 0.45, 1.0)
        arr = dark + (light - dark) * grey
    else:
        arr = arr * rng.uniform(0.75, 1.2, size=3).astype(np.float32)
        grey = arr.mean(axis=2, keepdims=True)
        arr = grey + (arr - grey) * rng.uniform(0.6, 1.3)
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    yy, xx = _grid(h, w)
    c0, c1 = _random_colour(rng, 0.2, 1.0), _random_colour(rng, 0.1, 0.9)
    if rng.random() < 0.5:
        angle = rng.uniform(0, 2 * np.pi)
        t = (np.cos(angle) * (xx - w / 2) + np.sin(angle) * (yy - h / 2)) / max(h, w) + 0.5
    else:
        cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
        t = np.hypot(yy - cy, xx - cx) / (rng.uniform(0.6, 1.4) * max(h, w))
    t = np.clip(t, 0.0, 1.0)[..., None]
    return c0 + (c1 - c0) * t


def _blur_mask(mask: np.ndarray, sigma: float) -> np.ndarray:
    img = Image.fromarray((np.clip(mask, 0, 1) * 255.0 + 0.5).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32) / 255.0


def _mask(h: int, w: int, draw_fn) -> np.ndarray:
    img = Image.new("L", (w, h), 0)
    draw_fn(ImageDraw.Draw(img))
    return np.asarray(img, dtype=np.float32) / 255.0


def _background(
    rng: np.random.Generator, photos: tuple[SourcePhoto, ...], h: int, w: int
) -> tuple[np.ndarray, set[str]]:
    used: set[str] = set()
    kind = rng.choice(["photo", "studio", "tabletop"], p=[0.4, 0.3, 0.3])
    if kind == "photo":
        photo = photos[int(rng.integers(len(photos)))]
        bg = _photo_crop(rng, photo, h, w)
        used.add(photo.name)
        if rng.random() < 0.6:  # depth of field: the products stay sharp, the backdrop does not
            sigma = rng.uniform(0.5, 4.0)
            bg = gaussian_filter(bg, sigma=(sigma, sigma, 0))
    elif kind == "studio":
        bg = _gradient(rng, h, w)
        if rng.random() < 0.6:
            photo = photos[int(rng.integers(len(photos)))]
            tex = _photo_crop(rng, photo, h, w)
            bg = bg * (1 - 0.25) + 0.25 * tex * bg.mean() / max(float(tex.mean()), 1e-3)
            used.add(photo.name)
    else:
        wall = _gradient(rng, h, w)
        photo = photos[int(rng.integers(len(photos)))]
        floor = _photo_crop(rng, photo, h, w)
        used.add(photo.name)
        horizon = int(rng.uniform(0.35, 0.65) * h)
        yy = np.arange(h, dtype=np.float32)[:, None, None]
        t = np.clip((yy - horizon) / 2.0 + 0.5, 0.0, 1.0)
        floor = floor * np.linspace(0.75, 1.1, h, dtype=np.float32)[:, None, None]
        bg = wall * (1 - t) + floor * t
    return np.clip(bg, 0.0, 1.0).astype(np.float32), used


def _label(rng: np.random.Generator, photos: tuple[SourcePhoto, ...], h: int, w: int) -> tuple[np.ndarray, set[str]]:
    """A printed label (brand text, rules, a logo) or a photographic one."""
    h, w = max(h, 4), max(w, 4)
    if rng.random() < 0.4:
        photo = photos[int(rng.integers(len(photos)))]
        return _photo_crop(rng, photo, h, w), {photo.name}
    paper = _random_colour(rng, 0.3, 1.0)
    ink = _random_colour(rng, 0.0, 0.6)
    img = Image.new("RGB", (w, h), tuple(int(c * 255) for c in paper))
    draw = ImageDraw.Draw(img)
    ink8 = tuple(int(c * 255) for c in ink)
    size = int(np.clip(h * rng.uniform(0.18, 0.35), 6, 60))
    brand = "".join(rng.choice(list(string.ascii_uppercase), size=int(rng.integers(3, 8))))
    draw.text((int(w * rng.uniform(0.02, 0.2)), int(h * rng.uniform(0.05, 0.3))), brand, font=_font(size), fill=ink8)
    y = int(h * 0.55)
    while y < h - 3:
        x = int(w * 0.08)
        word_h = max(2, size // 3)
        while x < w * 0.9 - 3:
            ww = int(rng.integers(3, max(4, w // 5)))
            draw.rectangle([x, y, max(x, min(x + ww, w - 2)), y + word_h], fill=ink8)
            x += ww + int(rng.integers(2, 6))
        y += word_h + int(rng.integers(3, 8))
    if rng.random() < 0.6:
        r = int(min(h, w) * rng.uniform(0.1, 0.25))
        cx, cy = int(w * rng.uniform(0.6, 0.9)), int(h * rng.uniform(0.2, 0.4))
        accent = tuple(int(c * 255) for c in _random_colour(rng))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=accent)
    return np.asarray(img, dtype=np.float32) / 255.0, set()


def _cylinder_shade(u: np.ndarray, light: float, gloss: float) -> tuple[np.ndarray, np.ndarray]:
    """Diffuse and specular terms across a cylinder, u in [-1, 1] from edge to edge."""
    u = np.clip(u, -1.0, 1.0)
    nz = np.sqrt(1.0 - u * u)
    diffuse = np.clip(0.35 + 0.75 * (nz * 0.8 + u * light), 0.0, 1.3)
    spec = gloss * np.exp(-(((u - light * 0.6) / 0.12) ** 2))
    return diffuse.astype(np.float32), spec.astype(np.float32)


def _grid(h: int, w: int, y0: float = 0.0, x0: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    return (np.arange(h, dtype=np.float32)[:, None] + y0, np.arange(w, dtype=np.float32)[None, :] + x0)


def _product(
    rng: np.random.Generator, kind: str, photos: tuple[SourcePhoto, ...], cx: float, base: float, scale: float
) -> tuple[np.ndarray, np.ndarray, int, int, set[str]]:
    """One product drawn in its own window: (rgb, alpha, top, left, photos used).

    Working in the product's bounding window rather than the whole frame keeps a scene at a few milliseconds.
    """
    colour = _random_colour(rng)
    light = rng.uniform(-0.7, 0.7)
    gloss = rng.uniform(0.1, 0.9)
    used: set[str] = set()
    top, left = int(base - 1.6 * scale) - 2, int(cx - 0.8 * scale) - 2
    h, w = int(base - top) + 4, int(1.6 * scale) + 6
    cx, base = cx - left, base - top
    yy, xx = _grid(h, w)
    layer = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w), np.float32)

    def add(part_alpha: np.ndarray, part: np.ndarray) -> None:
        nonlocal alpha
        a = part_alpha[..., None]
        layer[...] = layer * (1 - a) + part * a
        alpha = np.maximum(alpha, part_alpha)

    if kind == "box":
        bw, bh = scale * rng.uniform(0.5, 0.9), scale * rng.uniform(0.6, 1.1)
        depth = scale * rng.uniform(0.1, 0.3)
        x0, x1, y1 = cx - bw / 2, cx + bw / 2, base
        y0 = y1 - bh
        dx, dy = depth * (1 if light < 0 else -1) * 0.6, -depth * 0.6
        front = _mask(h, w, lambda d: d.rectangle([x0, y0, x1, y1], fill=255))
        top_face = _mask(
            h, w, lambda d: d.polygon([(x0, y0), (x1, y0), (x1 + dx, y0 + dy), (x0 + dx, y0 + dy)], fill=255)
        )
        sx = x1 if dx > 0 else x0
        side = _mask(h, w, lambda d: d.polygon([(sx, y0), (sx + dx, y0 + dy), (sx + dx, y1 + dy), (sx, y1)], fill=255))
        grad = (1.0 + 0.25 * light * (xx - cx) / max(bw, 1) - 0.15 * (yy - y0) / max(bh, 1))[..., None]
        face = colour * grad
        lh, lw = int(bh * rng.uniform(0.3, 0.6)), int(bw * rng.uniform(0.6, 0.9))
        label, lused = _label(rng, photos, lh, lw)
        used |= lused
        ly, lx = int(y0 + (bh - lh) * rng.uniform(0.2, 0.8)), int(cx - lw / 2)
        _inset(face, label, ly, lx, grad)
        add(side, colour * 0.55 * grad)
        add(top_face, np.broadcast_to(np.minimum(colour * 1.25 + 0.05, 1.0), (h, w, 3)))
        add(front, face)
    elif kind in ("bottle", "can"):
        bw = scale * (rng.uniform(0.3, 0.45) if kind == "bottle" else rng.uniform(0.35, 0.6))
        bh = scale * (rng.uniform(0.9, 1.4) if kind == "bottle" else rng.uniform(0.5, 0.9))
        x0, x1, y1 = cx - bw / 2, cx + bw / 2, base
        y0 = y1 - bh
        diffuse, spec = _cylinder_shade((xx - cx) / max(bw / 2, 1), light, gloss)
        diffuse, spec = np.broadcast_to(diffuse, (h, w)), np.broadcast_to(spec, (h, w))
        body_top = y0 + (bh * 0.35 if kind == "bottle" else 0)
        body = _mask(h, w, lambda d: d.rounded_rectangle([x0, body_top, x1, y1], radius=bw * 0.12, fill=255))
        shaded = colour * diffuse[..., None] + spec[..., None]
        lh, lw = int((y1 - body_top) * rng.uniform(0.35, 0.6)), int(bw)
        label, lused = _label(rng, photos, lh, lw)
        used |= lused
        ly = int(body_top + (y1 - body_top - lh) * rng.uniform(0.3, 0.7))
        _inset(shaded, label, ly, int(x0), diffuse[..., None], 0.5 * spec[..., None])
        if kind == "bottle":
            nw = bw * rng.uniform(0.25, 0.4)
            shoulder = _mask(h, w, lambda d: d.ellipse([x0, body_top - bh * 0.18, x1, body_top + bh * 0.18], fill=255))
            neck = _mask(h, w, lambda d: d.rectangle([cx - nw / 2, y0 + bh * 0.05, cx + nw / 2, body_top], fill=255))
            cap_col = _random_colour(rng)
            cap = _mask(
                h,
                w,
                lambda d: d.rounded_rectangle([cx - nw * 0.6, y0, cx + nw * 0.6, y0 + bh * 0.1], radius=2, fill=255),
            )
            add(np.maximum(shoulder, neck), colour * diffuse[..., None] + spec[..., None])
            add(body, shaded)
            add(cap, cap_col * diffuse[..., None] + 0.5 * spec[..., None])
        else:
            lid = _mask(h, w, lambda d: d.ellipse([x0, y0 - bw * 0.15, x1, y0 + bw * 0.15], fill=255))
            add(body, shaded)
            add(lid, np.broadcast_to(np.minimum(colour * 0.5 + 0.45, 1.0) * (1.0 + 0.2 * light), (h, w, 3)))
    elif kind == "disc":
        rx, ry = scale * rng.uniform(0.35, 0.6), scale * rng.uniform(0.1, 0.35)
        cy = base - ry
        outer = _mask(h, w, lambda d: d.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255))
        k = rng.uniform(0.5, 0.8)
        inner = _mask(h, w, lambda d: d.ellipse([cx - rx * k, cy - ry * k, cx + rx * k, cy + ry * k], fill=255))
        r = np.hypot((xx - cx) / max(rx, 1), (yy - cy) / max(ry, 1))
        shade = (0.8 + 0.3 * light * (xx - cx) / max(rx, 1) - 0.2 * r)[..., None]
        rim = (gloss * np.exp(-(((r - 0.95) / 0.05) ** 2)))[..., None]
        add(outer, colour * shade + rim)
        centre = _random_colour(rng) if rng.random() < 0.5 else colour * 0.8
        add(inner, centre * shade)
    elif kind == "ball":
        r = scale * rng.uniform(0.2, 0.4)
        cy = base - r
        circle = _mask(h, w, lambda d: d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255))
        nx, ny = (xx - cx) / max(r, 1), (yy - cy) / max(r, 1)
        nz = np.sqrt(np.clip(1 - nx * nx - ny * ny, 0, 1))
        lx, ly, lz = light, -0.5, 0.7
        ndotl = np.clip((nx * lx + ny * ly + nz * lz) / np.sqrt(lx * lx + ly * ly + lz * lz), 0, 1)
        add(circle, colour * (0.25 + 0.85 * ndotl)[..., None] + (gloss * ndotl**40)[..., None])
    else:  # a tube lying down
        tw, th = scale * rng.uniform(0.7, 1.2), scale * rng.uniform(0.15, 0.3)
        y0, y1 = base - th, base
        tube = _mask(
            h, w, lambda d: d.rounded_rectangle([cx - tw / 2, y0, cx + tw / 2, y1], radius=th * 0.45, fill=255)
        )
        diffuse, spec = _cylinder_shade((yy - (y0 + y1) / 2) / max(th / 2, 1), -0.4, gloss)
        add(tube, colour * diffuse[..., None] + spec[..., None])
    return np.clip(layer, 0.0, 1.0), _blur_mask(alpha, 0.6), top, left, used


def _inset(face: np.ndarray, label: np.ndarray, ly: int, lx: int, gain, offset=0.0) -> None:
    """Print a label onto a face in place, lit by the face's own shading (gain, offset) so it wraps the product."""
    h, w, _ = face.shape
    lh, lw, _ = label.shape
    ys, xs = slice(max(ly, 0), min(ly + lh, h)), slice(max(lx, 0), min(lx + lw, w))
    if ys.start >= ys.stop or xs.start >= xs.stop:
        return
    gain = np.broadcast_to(gain, face.shape[:2] + (gain.shape[-1],))[ys, xs]
    off = np.broadcast_to(offset, face.shape[:2] + (1,))[ys, xs] if np.ndim(offset) else offset
    face[ys, xs] = label[ys.start - ly : ys.stop - ly, xs.start - lx : xs.stop - lx] * gain + off


def _paste_window(canvas: np.ndarray, layer: np.ndarray, alpha: np.ndarray, top: int, left: int) -> None:
    H, W, _ = canvas.shape
    h, w = alpha.shape
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, H), min(left + w, W)
    if y0 >= y1 or x0 >= x1:
        return
    a = alpha[y0 - top : y1 - top, x0 - left : x1 - left, None]
    region = canvas[y0:y1, x0:x1]
    region *= 1.0 - a
    region += layer[y0 - top : y1 - top, x0 - left : x1 - left] * a


def _full_frame(alpha: np.ndarray, top: int, left: int, H: int, W: int) -> np.ndarray:
    out = np.zeros((H, W), np.float32)
    h, w = alpha.shape
    y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + h, H), min(left + w, W)
    if y0 < y1 and x0 < x1:
        out[y0:y1, x0:x1] = alpha[y0 - top : y1 - top, x0 - left : x1 - left]
    return out


def render_scene(rng: np.random.Generator, split: str, size: int) -> Scene:
    """One product shot of size x size pixels whose photo pixels all come from the given split's photos."""
    photos = photos_for_split(split)
    canvas, used = _background(rng, photos, size, size)
    n_products = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
    scale = size * rng.uniform(0.35, 0.6) / (1 + 0.25 * (n_products - 1))
    bases = np.sort(rng.uniform(0.65, 0.95, size=n_products) * size)
    slots = rng.permutation(n_products)
    kinds = []
    shadow_dir = rng.uniform(-0.4, 0.4) * size
    for i, base in enumerate(bases):
        kind = str(rng.choice(_PRODUCTS))
        kinds.append(kind)
        cx = size * (slots[i] + 0.5) / n_products + rng.uniform(-0.08, 0.08) * size
        layer, alpha, top, left, p_used = _product(rng, kind, photos, cx, base, scale * rng.uniform(0.85, 1.15))
        used |= p_used
        canvas *= 1.0 - _shadow(_full_frame(alpha, top, left, size, size), base, shadow_dir / 6, rng)[..., None]
        _paste_window(canvas, layer, alpha, top, left)
    yy, xx = _grid(size, size)
    yy, xx = yy / size, xx / size
    vignette = 1.0 - rng.uniform(0.0, 0.35) * ((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 2
    tint = rng.uniform(0.9, 1.1, size=3).astype(np.float32)
    image = np.clip(canvas * vignette[..., None] * tint * rng.uniform(0.8, 1.15), 0.0, 1.0).astype(np.float32)
    return Scene(image=image, sources=tuple(sorted(used)), products=tuple(kinds))


def _shadow(silhouette: np.ndarray, base: float, skew: float, rng: np.random.Generator) -> np.ndarray:
    """A soft drop shadow: the silhouette squashed onto the floor line, shifted away from the light, blurred.

    Computed at a quarter of the resolution: a shadow this soft has no detail to lose.
    """
    h, w = silhouette.shape
    f = 4
    squash = rng.uniform(0.15, 0.4)
    img = Image.fromarray((silhouette * 255).astype(np.uint8)).resize((w // f, h // f), Image.BILINEAR)
    b = base / f
    coeffs = (1.0, -skew / max(h, 1) / squash, 0.0, 0.0, 1.0 / squash, b - b / squash)
    flat = img.transform((w // f, h // f), Image.AFFINE, coeffs, resample=Image.BILINEAR)
    flat = flat.filter(ImageFilter.GaussianBlur(rng.uniform(3.0, 10.0) / f)).resize((w, h), Image.BILINEAR)
    return np.asarray(flat, dtype=np.float32) / 255.0 * rng.uniform(0.25, 0.6)
