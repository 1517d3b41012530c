"""The source head's fit after training: a balanced, regularised linear model on the head's fixed inputs, written
into the checkpoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from training.linear_head import fit_linear_head
from training.source_head import SOURCE_FIT_SHIFT, SOURCE_FIT_SHIFTS, Shifted


def _blobs(counts: list[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Classes of unequal size around separate centres, in columns of very different scale and offset."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0, 0.0], [2.0, 0.0, 1.0], [0.0, 2.0, -1.0]])
    x = np.concatenate([rng.normal(centres[k], 0.6, (n, 3)) for k, n in enumerate(counts)])
    y = np.concatenate([np.full(n, k) for k, n in enumerate(counts)])
    return x * np.array([1000.0, 0.001, 1.0]) + np.array([5e4, -3.0, 0.0]), y


def test_the_fitted_head_names_each_class_of_new_inputs_and_applies_to_raw_ones():
    x, y = _blobs([400, 60, 60], seed=0)
    weight, bias = fit_linear_head(x, y, n_classes=4)  # the fourth class has no examples
    assert weight.shape == (4, 3) and bias.shape == (4,)
    test_x, test_y = _blobs([200, 200, 200], seed=1)
    picked = (torch.as_tensor(test_x, dtype=torch.float32) @ weight.T + bias).argmax(dim=1).numpy()
    for k in range(3):
        assert np.mean(picked[test_y == k] == k) > 0.85, f"class {k}: the small classes are not drowned"
    assert not (picked == 3).any(), "a class without examples is never picked"
    again = fit_linear_head(x, y, n_classes=4)
    assert torch.equal(again[0], weight) and torch.equal(again[1], bias), "deterministic"


def test_a_stronger_penalty_shrinks_the_head():
    x, y = _blobs([100, 100, 100], seed=2)
    loose, _ = fit_linear_head(x, y, 3, c=1.0)
    tight, _ = fit_linear_head(x, y, 3, c=0.001)
    assert tight.norm() < loose.norm()


@pytest.mark.parametrize("dy, dx", [(-1, -1), (-1, 1), (1, -1), (1, 1)])
@pytest.mark.parametrize("width, height", [(80, 72), (81, 75)])
def test_a_shifted_photos_evaluation_crop_is_the_photos_own_moved_by_the_shift(dy, dx, width, height):
    from PIL import Image

    from app.transforms import eval_preprocess

    crop = 48
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    photo = Image.fromarray(pixels)
    top, left = (height - crop) // 2 + dy * SOURCE_FIT_SHIFT, (width - crop) // 2 + dx * SOURCE_FIT_SHIFT

    moved = eval_preprocess(Shifted(dy * SOURCE_FIT_SHIFT, dx * SOURCE_FIT_SHIFT, crop)(photo), crop)

    assert np.array_equal(moved, pixels[top : top + crop, left : left + crop])
    assert (top - (height - crop) // 2) % 2 == 0 and (left - (width - crop) // 2) % 2 == 0, "the 2 x 2 grid in phase"


def test_a_photo_too_small_to_shift_is_left_as_it_is():
    from PIL import Image

    photo = Image.new("RGB", (60, 70))
    assert Shifted(SOURCE_FIT_SHIFT, SOURCE_FIT_SHIFT, 48)(photo) is photo


@pytest.mark.slow
def test_training_data_refits_the_checkpoints_source_head_on_its_residual_statistics(
    ray_cluster, small_demo: Path, tmp_path: Path
) -> None:
    from app.config import Settings
    from app.data import index_dataset
    from app.model import build_model, load_checkpoint, save_checkpoint
    from tests.helpers import make_checkpoint
    from training.source_head import refit_source_head

    index = index_dataset(str(small_demo))
    families = index.source_families()
    # crops of 48 from photos of 64: each photo gives its evaluation crop and the shifted ones
    checkpoint = make_checkpoint(tmp_path / "ckpt", seed=1, source_families=families, crop_size=48)
    before = load_checkpoint(checkpoint).model
    settings = Settings(work_dir=tmp_path / "work")

    fit = refit_source_head(settings, checkpoint, index.split("train"))

    assert fit is not None and fit["photos"] == sum(fit["per_class"].values()) > 0
    assert fit["crops"] == (1 + len(SOURCE_FIT_SHIFTS)) * fit["photos"]
    assert set(fit["per_class"]) == set(families)
    assert json.loads((checkpoint / "config.json").read_text())["source_head"] == fit
    after = load_checkpoint(checkpoint).model
    pooled = after.head[0].in_features
    assert torch.count_nonzero(after.source_head.weight[:, :pooled]) == 0, "the pooled features are left out"
    assert not torch.equal(after.source_head.weight, before.source_head.weight)
    for name, value in before.state_dict().items():
        if not name.startswith("source_head"):
            assert torch.equal(value, after.state_dict()[name]), f"{name} changed"

    # a checkpoint from before the residual statistics: its head reads the pooled features, and the fit uses them
    old = tmp_path / "old"
    loaded = load_checkpoint(checkpoint)
    cfg = replace(loaded.model_cfg, source_spectrum=0, source_phase=0)
    save_checkpoint(old, build_model(cfg), cfg, loaded.preprocess)
    old_fit = refit_source_head(settings, old, index.split("train"))
    assert old_fit is not None and old_fit["crops"] == old_fit["photos"], "pooled features: evaluation crops only"
    assert torch.count_nonzero(load_checkpoint(old).model.source_head.weight) > 0

    # photos too small to shift (64 px at a crop of 64): their evaluation crops alone
    small = make_checkpoint(tmp_path / "small", seed=1, source_families=families)
    small_fit = refit_source_head(settings, small, index.split("train"))
    assert small_fit is not None and small_fit["crops"] == small_fit["photos"] == fit["photos"]

    plain = make_checkpoint(tmp_path / "plain", seed=1)
    weights = (plain / "model.pt").read_bytes()
    assert refit_source_head(settings, plain, index.split("train")) is None
    assert (plain / "model.pt").read_bytes() == weights
