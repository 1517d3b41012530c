"""Seeded training: the same data order, augmentations and initialisation in every rerun."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import tiny_settings, write_learnable_dataset

pytestmark = pytest.mark.slow


def test_training_is_seeded(ray_cluster, tmp_path: Path) -> None:
    """Two runs of the same seeded training on one worker see the same data in the same order and augmentations from
    the same initial weights, so their losses agree (up to floating-point noise)."""
    from mlflow import MlflowClient

    from training.trainer import run_training

    data = write_learnable_dataset(tmp_path / "data", per_class=24)
    losses = []
    for name in ("a", "b"):
        settings = tiny_settings(tmp_path / name, data, epochs=1, num_workers=1)
        outcome = run_training(settings)
        history = MlflowClient(tracking_uri=settings.tracking_uri).get_metric_history(outcome.run_id, "train_loss")
        losses.append([point.value for point in history])
    assert len(losses[0]) == 1
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def test_training_data_order_and_augmentations_follow_the_seed(ray_cluster, tmp_path: Path) -> None:
    """The same seed gives the same batches; each epoch (each execution) its own order; another seed another."""
    import numpy as np

    from app.config import ImageLimits
    from app.data import DecodeOptions, index_dataset, to_ray_dataset
    from app.transforms import AugmentConfig

    records = index_dataset(str(write_learnable_dataset(tmp_path / "data", per_class=16))).split("train")

    def epochs(seed: int, count: int = 2) -> list[np.ndarray]:
        options = DecodeOptions(crop_size=48, train=True, limits=ImageLimits(), augment=AugmentConfig(), seed=seed)
        dataset = to_ray_dataset(records, options, batch_size=8)
        dataset.context.execution_options.preserve_order = True
        return [np.concatenate([b["image"] for b in dataset.iter_batches(batch_format="numpy")]) for _ in range(count)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[0], first[1]), "every epoch has its own order and augmentations"
    assert not np.array_equal(first[0], other[0])
