"""Scoring a labelled split with a model: the numbers the champion rule, tuning and evaluation compare.

Images stream through Ray Data with the same decode and eval preprocessing as serving (``app.data``,
``app.transforms``); the model runs in this process on whatever device it has.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from PIL import Image

    from app.config import ImageLimits

# What checkpoints, trials and champions are ranked by: AUROC on the validation split, higher is better.
SELECTION_METRIC = "val_auroc"
SELECTION_MODE = "max"


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """NaN when only one class is present (a tiny validation shard), instead of an exception."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


@dataclass
class Scores:
    """A model's answers on a split: one row per readable file, in no particular order (pair them by path)."""

    paths: np.ndarray
    labels: np.ndarray
    logits: np.ndarray  # the model's calibrated logits, float64
    # (n, families) probabilities of the source head, in the order of the model's source_families; None without one
    sources: np.ndarray | None = None

    @property
    def probabilities(self) -> np.ndarray:
        from app.operating_point import sigmoid

        return sigmoid(self.logits)

    def where(self, mask: np.ndarray) -> Scores:
        sources = None if self.sources is None else self.sources[mask]
        return Scores(self.paths[mask], self.labels[mask], self.logits[mask], sources)


def score_variants(
    loaded: Any,
    records: pd.DataFrame,
    limits: ImageLimits,
    variants: Mapping[str, Callable[[Image.Image], Image.Image] | None],
    *,
    batch_size: int = 64,
    device: str | None = None,
) -> dict[str, Scores]:
    """Scores of every readable file of ``records`` under each named change (None: the photo as it is), in one
    pass: each file is read and decoded once, and every variant is cropped from it. Unreadable files are skipped
    and logged."""
    import torch

    from app.data import DecodeOptions, to_ray_dataset
    from app.model import AllLogits, source_probabilities
    from app.transforms import to_model_input

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AllLogits(loaded.model.to(device, memory_format=torch.channels_last).eval())
    options = DecodeOptions(
        crop_size=loaded.preprocess.crop_size, train=False, limits=limits, variants=tuple(variants.items())
    )
    parts: dict[str, list[tuple[np.ndarray, ...]]] = {name: [] for name in variants}
    dataset = to_ray_dataset(records, options, batch_size=batch_size)
    with torch.inference_mode():
        for batch in dataset.iter_batches(batch_size=batch_size * len(variants), batch_format="numpy"):
            if len(batch["label"]) == 0:
                continue
            x = to_model_input(batch["image"], device=device, channels_last=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = model(x)
            # float64: float32 sigmoid rounds nearby logits into ties, which blunts AUROC and the threshold.
            values = logits.double().cpu().numpy()
            for name in variants:
                mine = batch["variant"] == name
                parts[name].append((batch["path"][mine], batch["label"][mine].astype(int), values[mine]))
    return {name: _joined(rows, source_probabilities) for name, rows in parts.items()}


def _joined(rows: list[tuple[np.ndarray, ...]], softmax: Callable[[np.ndarray], np.ndarray]) -> Scores:
    if not rows:
        return Scores(np.zeros(0, dtype=object), np.zeros(0, dtype=int), np.zeros(0))
    paths, labels, values = (np.concatenate([row[i] for row in rows]) for i in range(3))
    sources = softmax(values[:, 1:]) if values.shape[1] > 1 else None
    return Scores(paths, labels, values[:, 0], sources)


def score_split(
    loaded: Any,
    records: pd.DataFrame,
    limits: ImageLimits,
    *,
    corrupt: Callable[[Image.Image], Image.Image] | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, AI probabilities) of every readable file of ``records``, after ``corrupt`` when given."""
    scores = score_variants(loaded, records, limits, {"": corrupt}, batch_size=batch_size, device=device)[""]
    return scores.labels, scores.probabilities


def validation_auroc(loaded: Any, records: pd.DataFrame, limits: ImageLimits) -> float:
    """A model's AUROC on a split, scored the way evaluation scores it; the champion rule and tuning compare these."""
    import math

    value = auroc(*score_split(loaded, records, limits))
    return 0.0 if math.isnan(value) else value
