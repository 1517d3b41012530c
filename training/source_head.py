"""The source head fitted to convergence once the backbone is trained: which generator family made an AI photo.

Why a second fit: trained beside the verdict for a dozen epochs, at the backbone's learning rate and under its
augmentation, the head ends far short of what a linear model on the same inputs reaches (benchmarks/RESULTS.md,
"Which generator"). Its inputs are fixed once training ends (the pooled features, the residual's spectrum and its
2-periodic correlations), so the best linear head on them is a convex problem: a class-balanced, L2-regularised
multinomial logistic regression on the training split's evaluation crops, solved here and written into the
checkpoint (on the residual statistics alone where the model has them: see ``refit_source_head``). Balanced,
because the families are unequal (the autoencoder's photos are twice any other's) and a moderator needs each named
as reliably as the next. The final fit also reads two more crops of each photo, moved diagonally by an even number
of pixels: the same photo's statistics elsewhere, with the residual's 2 x 2 grid where it was, three times the rows
for a model of ~1,000 inputs (benchmarks/RESULTS.md, "Which generator").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from app.config import Settings
from app.logging import get_logger
from training.crop_rows import read_crop_rows
from training.linear_head import fit_linear_head

log = get_logger("aipd.train")

# Inverse L2 strengths the fit chooses from, in scikit-learn's convention (loss summed over photos, times C, plus
# half the squared weights) on standardised inputs: the one of the best balanced accuracy across folds of the
# training photos.
SOURCE_FIT_CS = (0.01, 0.03, 0.1, 0.3)
SOURCE_FIT_FOLDS = 4
# Photos per class the fit reads at most: a linear head on ~1,000 inputs needs no more, and the driver scores them.
SOURCE_FIT_MAX_PER_CLASS = 1000
SOURCE_FIT_SEED = 0
# How far the extra crops move from the evaluation crop, on each axis (even: the 2 x 2 grid stays in phase), and
# in which directions: up-left and down-right named each family as well as all four diagonals, at 3x the rows, not 5x.
SOURCE_FIT_SHIFT = 8
SOURCE_FIT_SHIFTS = ((-1, -1), (1, 1))


def refit_source_head(settings: Settings, checkpoint_dir: Path, records: pd.DataFrame) -> dict[str, Any] | None:
    """Fit the checkpoint's source head on ``records`` (the training split) and write it into the checkpoint.
    Returns what was fitted (written into config.json as `source_head`), or None where there is nothing to fit: no
    source head, no `generator` column, or fewer than two of its classes among the readable photos."""
    import torch

    from app.data import source_targets
    from app.model import load_checkpoint, set_source_head

    loaded = load_checkpoint(checkpoint_dir)
    families = list(loaded.model_cfg.source_families)
    if loaded.model.source_head is None or "generator" not in records.columns:
        return None
    targets = source_targets(records, families)
    chosen = _sample(records.assign(source=targets)[targets >= 0])
    inputs, classes, centred = _source_inputs(loaded, chosen, settings)
    if len(np.unique(classes[centred])) < 2:
        return None
    # the penalty by cross-validation on the evaluation crops alone (no photo on both sides of a fold), then the
    # fit on every crop
    c, expected = choose_c(inputs[centred], classes[centred], len(families))
    weight, bias = fit_linear_head(inputs, classes, len(families), c)
    first = loaded.model.source_head.in_features - inputs.shape[1]  # the pooled features' columns, left at zero
    if first:
        weight = torch.cat([torch.zeros((len(families), first), dtype=weight.dtype), weight], dim=1)
    fit = {
        "fit": "balanced logistic regression on the residual statistics" if first else "balanced logistic regression",
        "c": c,
        "cross_validated_balanced_accuracy": round(expected, 4),
        "photos": int(centred.sum()),
        "crops": int(len(classes)),
        "per_class": {families[k]: int((classes[centred] == k).sum()) for k in range(len(families))},
    }
    set_source_head(checkpoint_dir, weight, bias, fit)
    log.info("source_head_fitted", photos=fit["photos"], families=len(families))
    return fit


def choose_c(inputs: np.ndarray, classes: np.ndarray, n_classes: int) -> tuple[float, float]:
    """The penalty of the best mean per-class accuracy over stratified folds (ties: the stronger penalty), and that
    accuracy: what the fitted head is expected to do on photos it did not see."""
    rng = np.random.default_rng(SOURCE_FIT_SEED)
    fold = np.empty(len(classes), dtype=np.int64)
    for k in np.unique(classes):
        members = np.flatnonzero(classes == k)
        fold[rng.permutation(members)] = np.arange(len(members)) % SOURCE_FIT_FOLDS
    best, best_score = SOURCE_FIT_CS[0], -1.0
    for c in SOURCE_FIT_CS:
        picked = np.empty(len(classes), dtype=np.int64)
        for f in range(SOURCE_FIT_FOLDS):
            held = fold == f
            if held.all() or not held.any():
                continue
            weight, bias = fit_linear_head(inputs[~held], classes[~held], n_classes, c)
            picked[held] = (_logits(inputs[held], weight, bias)).argmax(axis=1)
        score = float(np.mean([np.mean(picked[classes == k] == k) for k in np.unique(classes)]))
        if score > best_score + 1e-9:
            best, best_score = c, score
    return best, best_score


def _logits(inputs: np.ndarray, weight: Any, bias: Any) -> np.ndarray:
    return inputs @ weight.double().numpy().T + bias.double().numpy()


def _sample(records: pd.DataFrame) -> pd.DataFrame:
    shuffled = records.sample(frac=1.0, random_state=SOURCE_FIT_SEED)
    return shuffled.groupby("source").head(SOURCE_FIT_MAX_PER_CLASS).reset_index(drop=True)


@dataclass(frozen=True)
class Shifted:
    """The photo cut so that its evaluation crop moves by (dy, dx) pixels; the photo itself where it is too small
    to cut (that crop is then the evaluation crop again, and the fit leaves it out)."""

    dy: int
    dx: int
    crop_size: int

    def __call__(self, image: Any) -> Any:
        width, height = image.size
        cut_x, cut_y = 2 * abs(self.dx), 2 * abs(self.dy)
        if min(width - cut_x, height - cut_y) < self.crop_size:
            return image
        left, top = (cut_x if self.dx > 0 else 0), (cut_y if self.dy > 0 else 0)
        return image.crop((left, top, left + width - cut_x, top + height - cut_y))


def _source_inputs(loaded: Any, records: pd.DataFrame, settings: Settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the fit reads for each crop of each readable photo (the evaluation crop, then the shifted ones), each
    crop's class, and which rows are evaluation crops. The backbone was trained on these very photos, so their
    pooled features separate them better than they do new ones; the fixed residual statistics do not, and where the
    model has them the fit reads them alone (no forward pass of the backbone either); a model without them is
    fitted on its pooled features, evaluation crops only."""
    crop = loaded.preprocess.crop_size
    shifts = SOURCE_FIT_SHIFTS if loaded.model.has_residual_statistics else ()
    variants = (("", None),) + tuple(
        (f"shift{dy:+d}{dx:+d}", Shifted(dy * SOURCE_FIT_SHIFT, dx * SOURCE_FIT_SHIFT, crop)) for dy, dx in shifts
    )

    def read(model: Any, x: Any) -> dict[str, Any]:
        statistics = model.residual_statistics(x)
        return {"inputs": model.backbone(model.stem(x)) if statistics is None else statistics}

    found = read_crop_rows(loaded, records, settings, variants, read)
    if found.paths.size == 0:
        return np.zeros((0, 0)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    source = dict(zip(records["path"].astype(str), records["source"], strict=True))
    rows, path, variant = found.columns["inputs"], found.paths, found.variants
    labels = np.asarray([source[p] for p in path], dtype=np.int64)
    centred = variant == ""
    # a shifted crop of a photo too small to shift repeats its evaluation crop: left out, not counted twice
    first = {p: i for i, p in enumerate(path) if centred[i]}
    keep = np.asarray([centred[i] or not np.array_equal(rows[i], rows[first[path[i]]]) for i in range(len(path))])
    return rows[keep], labels[keep], centred[keep]
