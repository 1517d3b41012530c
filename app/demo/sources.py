"""The real photographs that scenes borrow backgrounds and textures from.

Only images that ship inside installed wheels are used, so the demo builds offline. Each photo is either a training
photo or a held-out one: val and test scenes contain only pixels of photos the training split never saw, which is
what makes their score a test of generalisation rather than of memorised backgrounds. Val and test draw from the same
held-out photos, so that validation looks like the new photos the test stands for: the threshold and calibration
set on it must hold there (benchmarks/RESULTS.md, "Verdicts", has what separate photos did to them).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

from app.errors import UserError


@dataclass(frozen=True)
class SourcePhoto:
    name: str
    package: str
    relpath: str
    colour: bool
    licence: str
    split: str  # "train" or "held_out" (the photos of both the val and the test split)


SOURCE_PHOTOS: tuple[SourcePhoto, ...] = (
    SourcePhoto("astronaut", "skimage", "data/astronaut.png", True, "public domain (NASA)", "train"),
    SourcePhoto("chelsea", "skimage", "data/chelsea.png", True, "CC0 (Stefan van der Walt)", "train"),
    SourcePhoto("china", "sklearn", "datasets/images/china.jpg", True, "CC BY 2.0 (danielbuechele, Flickr)", "train"),
    SourcePhoto("hubble_deep_field", "skimage", "data/hubble_deep_field.jpg", True, "public domain (NASA)", "train"),
    SourcePhoto("camera", "skimage", "data/camera.png", False, "CC0 (Lav Varshney)", "train"),
    SourcePhoto("grass", "skimage", "data/grass.png", False, "CC0 (linolafett, DeviantArt)", "train"),
    SourcePhoto("rocket", "skimage", "data/rocket.jpg", True, "public domain (SpaceX)", "held_out"),
    SourcePhoto("retina", "skimage", "data/retina.jpg", True, "CC0 (Mikael Häggström, Wikimedia)", "held_out"),
    SourcePhoto("brick", "skimage", "data/brick.png", False, "CC0 (CC0Textures Bricks25)", "held_out"),
    SourcePhoto("coffee", "skimage", "data/coffee.png", True, "CC0 (Rachel Michetti)", "held_out"),
    SourcePhoto("flower", "sklearn", "datasets/images/flower.jpg", True, "CC BY 2.0 (vultilion, Flickr)", "held_out"),
    SourcePhoto("gravel", "skimage", "data/gravel.png", False, "CC0 (CC0Textures Gravel04)", "held_out"),
)

SPLITS: tuple[str, ...] = ("train", "val", "test")
PHOTO_SETS: dict[str, str] = {"train": "train", "val": "held_out", "test": "held_out"}  # split -> its photos


class SourcePhotoMissingError(UserError, RuntimeError):
    """A wheel that should ship a source photo does not have it (a stripped or unusual install)."""


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it: sklearn.datasets alone costs seconds to import.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourcePhotoMissingError(
            f"the demo dataset needs the '{package}' package for its source photos; "
            "install scikit-image and scikit-learn"
        )
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def load_photo(name: str) -> np.ndarray:
    """The photo as float32 RGB in [0, 1]; grey textures come back with three equal channels."""
    photo = next((p for p in SOURCE_PHOTOS if p.name == name), None)
    if photo is None:
        raise KeyError(f"unknown source photo {name!r}")
    path = _package_dir(photo.package) / photo.relpath
    if not path.is_file():
        raise SourcePhotoMissingError(f"source photo {photo.name} not found at {path}; reinstall {photo.package}")
    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
    rgb.setflags(write=False)
    return rgb


def photos_for_split(split: str) -> tuple[SourcePhoto, ...]:
    return tuple(p for p in SOURCE_PHOTOS if p.split == PHOTO_SETS[split])
