"""The embedded demo dataset: no split leaks, the promised counts, same bytes for the same seed, the cache, and
no shortcut a logistic regression on global image statistics could use."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.ndimage import gaussian_filter, median_filter
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from app.demo import DemoSummary, build_demo_dataset
from app.demo.sources import SOURCE_PHOTOS, load_photo

SPLITS = ("train", "val", "test")
LABELS = ("real", "ai_generated")

# libjpeg's quality-50 luminance table: the reference an encoder scales by its quality setting
_STD_LUMA_MEAN = np.mean(
    [
        16,
        11,
        10,
        16,
        24,
        40,
        51,
        61,
        12,
        12,
        14,
        19,
        26,
        58,
        60,
        55,
        14,
        13,
        16,
        24,
        40,
        57,
        69,
        56,
        14,
        17,
        22,
        29,
        51,
        87,
        80,
        62,
        18,
        22,
        37,
        56,
        68,
        109,
        103,
        77,
        24,
        35,
        55,
        64,
        81,
        104,
        113,
        92,
        49,
        64,
        78,
        87,
        103,
        121,
        120,
        101,
        72,
        92,
        95,
        98,
        112,
        100,
        103,
        99,
    ]
)


def manifest(root: Path) -> list[dict]:
    with (root / "manifest.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def tree_digest(root: Path) -> str:
    """Hash of every file a build writes except summary.json (which records the build time)."""
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "summary.json"):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def estimated_jpeg_quality(image: Image.Image) -> float:
    scale = np.mean(image.quantization[0]) / _STD_LUMA_MEAN * 100
    return (200 - scale) / 2 if scale <= 100 else 5000 / scale


def global_statistics(path: Path) -> list[float]:
    data = path.read_bytes()
    image = Image.open(io.BytesIO(data))
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    return [
        *rgb.mean(axis=(0, 1)),
        *rgb.std(axis=(0, 1)),
        len(data),
        image.width,
        image.height,
        estimated_jpeg_quality(image),
        (grey - gaussian_filter(grey, 1.0)).std(),
        (grey - median_filter(grey, size=3)).std(),
    ]


@pytest.fixture(scope="module")
def demo300(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    """The full recipe at 300 images per class: what the shortcut and split checks need to mean something."""
    return build_demo_dataset(tmp_path_factory.mktemp("demo300"), images_per_class=300, size=128, seed=0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> DemoSummary:
    """A quick build (decoders barely fitted): enough to check layout, cache and determinism."""
    return build_demo_dataset(
        tmp_path_factory.mktemp("tiny"), images_per_class=10, size=32, seed=5, workers=0, decoder_steps=5
    )


def test_every_source_photo_loads_offline() -> None:
    for photo in SOURCE_PHOTOS:
        pixels = load_photo(photo.name)
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and min(pixels.shape[:2]) >= 256, photo.name


def test_source_photos_are_training_or_held_out() -> None:
    by_set = {s: {p.name for p in SOURCE_PHOTOS if p.split == s} for s in ("train", "held_out")}
    assert all(by_set.values()) and not by_set["train"] & by_set["held_out"]
    assert {p.split for p in SOURCE_PHOTOS} == {"train", "held_out"}


def test_tiny_build_layout_matches_manifest_and_summary(tiny: DemoSummary) -> None:
    root = tiny.out_dir
    rows = manifest(root)
    assert {(r["split"], r["label"]) for r in rows} == {(s, lab) for s in SPLITS for lab in LABELS}
    on_disk = sorted(str(p.relative_to(root)) for p in root.glob("*/*/*.jpg"))
    assert on_disk == sorted(r["path"] for r in rows)
    summary = json.loads((root / "summary.json").read_text())
    assert summary["counts"] == tiny.counts
    assert summary["seed"] == 5 and summary["size"] == 32 and summary["images_per_class"] == 10
    assert sum(n for per in tiny.counts.values() for n in per.values()) == 20 == tiny.total_images
    with Image.open(root / rows[0]["path"]) as image:
        assert image.format == "JPEG" and image.size == (32, 32)


def test_cache_returns_the_existing_build_without_touching_it(tiny: DemoSummary) -> None:
    root = tiny.out_dir
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    again = build_demo_dataset(root, images_per_class=10, size=32, seed=5, workers=0, decoder_steps=5)
    assert again.cached and not tiny.cached
    assert again.build_seconds == tiny.build_seconds and again.counts == tiny.counts
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before


def test_other_parameters_rebuild_in_place(tmp_path: Path) -> None:
    first = build_demo_dataset(tmp_path, images_per_class=10, size=32, seed=1, workers=0, decoder_steps=5)
    second = build_demo_dataset(tmp_path, images_per_class=12, size=32, seed=1, workers=0, decoder_steps=5)
    assert first.total_images == 20 and second.total_images == 24
    assert len(list(tmp_path.glob("*/*/*.jpg"))) == 24 == len(manifest(tmp_path))


def test_same_seed_same_bytes(tiny: DemoSummary, tmp_path: Path) -> None:
    again = build_demo_dataset(tmp_path / "again", images_per_class=10, size=32, seed=5, workers=0, decoder_steps=5)
    assert tree_digest(again.out_dir) == tree_digest(tiny.out_dir)
    other = build_demo_dataset(tmp_path / "other", images_per_class=10, size=32, seed=6, workers=0, decoder_steps=5)
    assert tree_digest(other.out_dir) != tree_digest(tiny.out_dir)


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes(tiny: DemoSummary, tmp_path: Path) -> None:
    pooled = build_demo_dataset(tmp_path, images_per_class=10, size=32, seed=5, workers=2, decoder_steps=5)
    assert tree_digest(pooled.out_dir) == tree_digest(tiny.out_dir)


def test_rejects_unusable_parameters(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="images_per_class"):
        build_demo_dataset(tmp_path, images_per_class=2)
    with pytest.raises(ValueError, match="size"):
        build_demo_dataset(tmp_path, images_per_class=10, size=30)


@pytest.mark.slow
def test_counts_and_split_fractions(demo300: DemoSummary) -> None:
    assert demo300.counts == {
        "train": {"real": 180, "ai_generated": 180},
        "val": {"real": 60, "ai_generated": 60},
        "test": {"real": 60, "ai_generated": 60},
    }
    rows = manifest(demo300.out_dir)
    assert len(rows) == 600 and len({r["path"] for r in rows}) == 600


@pytest.mark.slow
def test_splits_share_no_scene_and_training_shares_no_photo(demo300: DemoSummary) -> None:
    """No scene is in two splits; val and test draw from the same held-out photos, none of which training saw."""
    rows = manifest(demo300.out_dir)
    scenes = {s: {r["scene_id"] for r in rows if r["split"] == s} for s in SPLITS}
    photos = {s: {p for r in rows if r["split"] == s for p in r["source"].split("+") if p} for s in SPLITS}
    held_out = {p.name for p in SOURCE_PHOTOS if p.split == "held_out"}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not scenes[a] & scenes[b], (a, b)
    assert not photos["train"] & photos["val"] and not photos["train"] & photos["test"]
    assert photos["val"] <= held_out and photos["test"] <= held_out
    assert all(photos.values())
    assert demo300.sources == {s: sorted(photos[s]) for s in SPLITS}


@pytest.mark.slow
def test_hard_cases_and_decoder_fidelity(demo300: DemoSummary) -> None:
    rows = manifest(demo300.out_dir)
    reals = [r for r in rows if r["label"] == "real"]
    softened = sum("softened" in r["hard_case"] for r in reals) / len(reals)
    assert 0.15 <= softened <= 0.30
    assert any("denoised" in r["hard_case"] for r in reals)
    assert any(r["hard_case"] == "added_noise" for r in rows if r["label"] == "ai_generated")
    assert {r["generator"] for r in rows if r["label"] == "ai_generated"} == set(demo300.decoders)
    for kind, fit in demo300.decoders.items():
        assert fit["psnr_db"] >= 30.0, f"decoder {kind} degrades content: {fit['psnr_db']} dB on held-out scenes"


@pytest.mark.slow
def test_global_statistics_do_not_separate_the_classes(demo300: DemoSummary) -> None:
    root = demo300.out_dir
    rows = manifest(root)
    features = {s: [global_statistics(root / r["path"]) for r in rows if r["split"] == s] for s in ("train", "test")}
    labels = {s: [r["label"] == "ai_generated" for r in rows if r["split"] == s] for s in ("train", "test")}
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    model.fit(features["train"], labels["train"])
    auroc = roc_auc_score(labels["test"], model.predict_proba(features["test"])[:, 1])
    assert auroc <= 0.65, f"a logistic regression on global statistics separates the classes: test AUROC {auroc:.3f}"
