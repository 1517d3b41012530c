"""The fixed inputs of the post-training fits (the source head, the residual verdict), read crop by crop.

Both fits score every named variant of each readable photo with the trained model and need the rows in an order that
does not depend on how Ray Data delivered them, or a refit would not repeat: one reader, sorted by (path, variant).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from app.config import Settings


@dataclass(frozen=True)
class CropRows:
    """One row per crop, sorted by (path, variant): each column ``read`` returned (float64), the label, the photo's
    path and the variant's name ("" for the evaluation crop)."""

    columns: dict[str, np.ndarray]
    labels: np.ndarray
    paths: np.ndarray
    variants: np.ndarray


def read_crop_rows(
    loaded: Any,
    records: pd.DataFrame,
    settings: Settings,
    variants: tuple[tuple[str, Callable[[Any], Any] | None], ...],
    read: Callable[[Any, Any], dict[str, Any]],
) -> CropRows:
    """``read(model, x)`` of every crop of ``records`` under each variant (``app.data.DecodeOptions.variants``), on the
    GPU where there is one, without gradients; unreadable photos are skipped as in evaluation."""
    import torch

    from app.data import DecodeOptions, to_ray_dataset
    from app.transforms import to_model_input

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = loaded.model.to(device).eval()
    options = DecodeOptions(
        crop_size=loaded.preprocess.crop_size, train=False, limits=settings.images, variants=variants
    )
    columns: dict[str, list[np.ndarray]] = {}
    labels: list[int] = []
    keys: list[tuple[str, str]] = []
    with torch.inference_mode():
        for batch in to_ray_dataset(records, options, batch_size=64).iter_batches(batch_size=64, batch_format="numpy"):
            if len(batch["path"]) == 0:
                continue
            for name, value in read(model, to_model_input(batch["image"], device=device)).items():
                columns.setdefault(name, []).append(value.double().cpu().numpy())
            labels.extend(int(label) for label in batch["label"])
            keys.extend(
                (str(path), str(variant)) for path, variant in zip(batch["path"], batch["variant"], strict=True)
            )
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return CropRows(
        columns={name: np.concatenate(parts)[order] for name, parts in columns.items()},
        labels=np.asarray(labels, dtype=np.int64)[order],
        paths=np.asarray([keys[i][0] for i in order], dtype=object),
        variants=np.asarray([keys[i][1] for i in order], dtype=object),
    )
