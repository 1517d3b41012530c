"""The residual verdict fitted once the backbone is trained: the network's logit blended with a linear model on the
fixed residual statistics, so the verdict survives blur, downscaling and JPEG.

Why: the binary head reads the backbone's pooled features, which a blur or a re-encoding strips of most of what
told the classes apart; the residual's log spectrum and 2-periodic correlations (``Detector.residual_statistics``)
keep evidence a linear model still reads. Two convex fits, on inputs fixed once training ends: a strongly
regularised logistic regression on the statistics of the training photos' evaluation crops, each clean and once
through a random degradation chain (the same chain for the same photo in every run), then a two-input logistic
regression on validation (clean and degraded) that weighs that model's logit against the network's. Both fold into
one linear layer (``app.model.ResidualVerdict``) written into the checkpoint's config.json; the validation photos'
blended logits become the checkpoint's validation scores, so the operating point is set on the verdict it serves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.config import Settings
from app.degradations import DegradationConfig, PhotoChain
from app.logging import get_logger
from training.crop_rows import CropRows, read_crop_rows
from training.linear_head import fit_binary_logit

log = get_logger("aipd.train")

# Inverse L2 strength of the model on ~1,000 statistics, in scikit-learn's convention (as fit_linear_head): a strong
# penalty, since a few thousand photos would otherwise fit the statistics' noise. fit_linear_head's two softmax rows
# share the penalty, so 0.005 is a binary logistic regression's 0.01.
RESIDUAL_VERDICT_C = 0.005
# The second crop of each photo: each kind of degradation at even odds, so the model learns what survives them.
RESIDUAL_FIT_DEGRADATIONS = DegradationConfig(blur_prob=0.5, downscale_prob=0.5, jpeg_prob=0.5)
# Training photos per label the fit reads at most: a linear model on ~1,000 inputs needs no more, and the driver
# scores them.
RESIDUAL_FIT_MAX_PER_LABEL = 2500
# The photos' sample and their degradation chains follow it, so a refit repeats.
RESIDUAL_FIT_SEED = 0
# The blend has two inputs against every validation photo: next to no penalty.
BLEND_C = 1e4
DEGRADED = "degraded"


def fit_residual_verdict(
    settings: Settings, checkpoint_dir: Path, train_records: pd.DataFrame, val_records: pd.DataFrame
) -> dict[str, Any] | None:
    """Fit the checkpoint's residual verdict (its residual model on ``train_records``, the blend on ``val_records``)
    and write it into its config.json, with the validation photos' blended logits as its validation scores.
    Returns how it was fitted (the `residual_verdict` entry of config.json, less the weights), or None where there is
    nothing to fit, and nothing is written: no residual verdict in the model, or a split without both labels among
    its readable photos."""
    from app.model import load_checkpoint, save_val_scores, set_residual_verdict

    loaded = load_checkpoint(checkpoint_dir)
    if loaded.model.residual_verdict is None or train_records.empty or val_records.empty:
        return None
    train = fit_sample(train_records)
    fit_rows = _residual_rows(loaded, train, settings, with_logits=False)
    if len(np.unique(fit_rows.labels)) < 2:
        return None
    val_rows = _residual_rows(loaded, val_records, settings, with_logits=True)
    if len(np.unique(val_rows.labels)) < 2:
        return None
    statistics, labels = fit_rows.columns["statistics"], fit_rows.labels
    val_statistics, head, val_labels = val_rows.columns["statistics"], val_rows.columns["logit"], val_rows.labels
    paths, variants = val_rows.paths, val_rows.variants

    residual_weight, residual_bias = fit_binary_logit(statistics, labels, RESIDUAL_VERDICT_C)
    residual = val_statistics @ residual_weight + residual_bias
    blend_weight, intercept = fit_binary_logit(np.column_stack([head, residual]), val_labels, BLEND_C)
    head_scale, residual_scale = (float(v) for v in blend_weight)

    clean = variants == ""
    fit = {
        "fit": "logistic regression on the residual statistics of training photos clean and degraded, blended with "
        "the network's logit on validation",
        "c": RESIDUAL_VERDICT_C,
        "photos": int(np.count_nonzero(fit_rows.variants == "")),
        "val_photos": int(clean.sum()),
        "residual_weight": round(residual_scale, 4),
        "head_weight": round(head_scale, 4),
    }
    values = {
        **fit,
        "head_scale": head_scale,
        "weight": [float(v) for v in residual_scale * residual_weight],
        "bias": residual_scale * residual_bias + intercept,
    }
    set_residual_verdict(checkpoint_dir, values)
    # the clean photos' verdicts, in the split's order: the operating point is fitted on them
    position = {str(path): i for i, path in enumerate(val_records["path"])}
    order = sorted(np.flatnonzero(clean), key=lambda i: position[paths[i]])
    blended = head_scale * head[order] + residual_scale * residual[order] + intercept
    save_val_scores(checkpoint_dir, val_labels[order], blended)
    log.info(
        "residual_verdict_fitted",
        photos=fit["photos"],
        val_photos=fit["val_photos"],
        residual_weight=fit["residual_weight"],
        head_weight=fit["head_weight"],
    )
    return fit


def fit_sample(records: pd.DataFrame) -> pd.DataFrame:
    """The training photos the residual model is fitted on: at most RESIDUAL_FIT_MAX_PER_LABEL of each label."""
    shuffled = records.sample(frac=1.0, random_state=RESIDUAL_FIT_SEED)
    return shuffled.groupby("label").head(RESIDUAL_FIT_MAX_PER_LABEL).reset_index(drop=True)


def network_logit(model: Any, x: Any) -> Any:
    """The network's own logit: its head on its pooled features, not ``forward``, so a verdict fitted before does not
    leak in."""
    return model.head(model.backbone(model.stem(x))).squeeze(1)


def _residual_rows(loaded: Any, records: pd.DataFrame, settings: Settings, *, with_logits: bool) -> CropRows:
    """For the evaluation crop of each readable photo, clean and through its degradation chain: the residual
    statistics and, ``with_logits``, the network's own logit (``network_logit``)."""

    def read(model: Any, x: Any) -> dict[str, Any]:
        columns = {"statistics": model.residual_statistics(x)}
        if with_logits:
            columns["logit"] = network_logit(model, x)
        return columns

    variants = (("", None), (DEGRADED, PhotoChain(RESIDUAL_FIT_DEGRADATIONS, RESIDUAL_FIT_SEED)))
    return read_crop_rows(loaded, records, settings, variants, read)
