"""Scoring a labelled split with a model: the numbers the champion rule, tuning and evaluation compare.

Images stream through Ray Data with the same decode and eval preprocessing as serving (``app.data``,
``app.transforms``); the model runs in this process on whatever device it has.
"""

from __future__ import annotations

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


def score_split(
    loaded: Any,
    records: pd.DataFrame,
    limits: ImageLimits,
    *,
    corrupt: Callable[[Image.Image], Image.Image] | None = None,
    batch_size: int = 64,
    device: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """AI probabilities for every readable file of ``records`` (unreadable ones are skipped and logged)."""
    import torch

    from app.data import DecodeOptions, to_ray_dataset
    from app.transforms import to_model_input

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = loaded.model.to(device, memory_format=torch.channels_last).eval()
    options = DecodeOptions(crop_size=loaded.preprocess.crop_size, train=False, limits=limits, corrupt=corrupt)
    labels, scores = [], []
    dataset = to_ray_dataset(records, options, batch_size=batch_size)
    with torch.inference_mode():
        for batch in dataset.iter_batches(batch_size=batch_size, batch_format="numpy"):
            if len(batch["label"]) == 0:
                continue
            x = to_model_input(batch["image"], device=device, channels_last=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                logits = model(x)
            # float64: float32 sigmoid rounds nearby logits into ties, which blunts AUROC and the threshold.
            scores.append(torch.sigmoid(logits.double()).cpu().numpy())
            labels.append(batch["label"])
    if not labels:
        return np.zeros(0), np.zeros(0)
    return np.concatenate(labels).astype(int), np.concatenate(scores).astype(np.float64)


def validation_auroc(loaded: Any, records: pd.DataFrame, limits: ImageLimits) -> float:
    """A model's AUROC on a split, scored the way evaluation scores it; the champion rule and tuning compare these."""
    import math

    value = auroc(*score_split(loaded, records, limits))
    return 0.0 if math.isnan(value) else value
