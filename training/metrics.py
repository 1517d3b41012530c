"""Detection metrics on scores in [0, 1] where 1 means AI-generated.

How the threshold is chosen, and the calibration, live in `app.operating_point`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_curve

from app.scoring import auroc


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr_target: float) -> float:
    labels = np.asarray(labels)
    if len(np.unique(labels)) < 2:
        return float("nan")
    fpr, tpr, _ = roc_curve(labels, scores)
    ok = fpr <= fpr_target
    return float(tpr[ok].max()) if ok.any() else 0.0


def expected_calibration_error(labels: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(scores[mask].mean() - labels[mask].mean())
    return float(error)


def reliability_curve(
    labels: np.ndarray, scores: np.ndarray, bins: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean score, observed AI fraction and count per score bin, for the reliability diagram."""
    labels = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    mean_score, observed, counts = [], [], []
    for b in range(bins):
        mask = which == b
        counts.append(int(mask.sum()))
        mean_score.append(scores[mask].mean() if mask.any() else np.nan)
        observed.append(labels[mask].mean() if mask.any() else np.nan)
    return np.array(mean_score), np.array(observed), np.array(counts)


def classification_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Everything ``aipd evaluate`` reports that depends only on one set of scores."""
    labels = np.asarray(labels).astype(int)
    scores = np.asarray(scores, dtype=np.float64)
    flagged = scores >= threshold
    real, ai = labels == 0, labels == 1
    tn = int((~flagged & real).sum())
    fp = int((flagged & real).sum())
    fn = int((~flagged & ai).sum())
    tp = int((flagged & ai).sum())
    return {
        "auroc": auroc(labels, scores),
        "ap": float(average_precision_score(labels, scores)) if ai.any() else float("nan"),
        "accuracy": float((flagged == ai).mean()) if labels.size else float("nan"),
        "real_accuracy": tn / max(1, tn + fp),
        "ai_accuracy": tp / max(1, tp + fn),
        "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores, 0.01),
        "ece": expected_calibration_error(labels, scores),
        "threshold": float(threshold),
        "confusion_matrix": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
        "n": int(labels.size),
    }
