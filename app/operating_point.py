"""The operating point a model ships with: a calibration that makes its probability mean what it says, and the
threshold that holds its false-positive rate on new photos, both fitted on the validation split.

The costly mistake for a marketplace is flagging an honest seller's real photo, so the threshold is set from the
real photos' scores for a target false-positive rate, not at 0.5. The plain empirical quantile of a few hundred real
photos rests on the top one or two of them and moves with every split; the Harrell-Davis estimator weighs the
order statistics around the quantile instead (a Beta-weighted mean), which is smooth and has a smaller error on the
same data. The threshold is stored with the share of validation reals above it and that share's 95% interval, so
how much to trust the operating point is written next to it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

# Calibration in logit space; an identity calibration leaves the model's own sigmoid.
_MIN_SCALE = 1e-3


@dataclass(frozen=True)
class Calibration:
    """Platt scaling of the model's logit: ``p = sigmoid(scale * logit + bias)``; monotone, so AUROC is unchanged."""

    scale: float = 1.0
    bias: float = 0.0

    def logits(self, raw: np.ndarray) -> np.ndarray:
        return self.scale * np.asarray(raw, dtype=np.float64) + self.bias

    def probabilities(self, raw: np.ndarray) -> np.ndarray:
        return sigmoid(self.logits(raw))

    def raw(self, calibrated_logits: np.ndarray) -> np.ndarray:
        """The model's own logit back from a calibrated one (for the uncalibrated ECE)."""
        return (np.asarray(calibrated_logits, dtype=np.float64) - self.bias) / self.scale

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class OperatingPoint:
    """What a model ships with: its calibration and its threshold on the calibrated probability, with the evidence
    behind the threshold (how many validation reals it rests on, the share of them above it and its interval)."""

    calibration: Calibration
    threshold: float
    target_fpr: float
    val_fpr: float
    val_fpr_interval: tuple[float, float]
    n_real: int

    def tags(self) -> dict[str, float | int]:
        """The registry's version tags for it."""
        low, high = self.val_fpr_interval
        return {
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "val_fpr": round(self.val_fpr, 6),
            "val_fpr_low": round(low, 6),
            "val_fpr_high": round(high, 6),
            "val_n_real": self.n_real,
            "calibration_scale": round(self.calibration.scale, 6),
            "calibration_bias": round(self.calibration.bias, 6),
        }


def format_probability(p: float) -> str:
    """A probability with digits enough to tell it from 0 and 1: a threshold of 1e-5 or 1 - 1e-5 reads as itself, not
    as "0.0000" or "1.0000"."""
    if not math.isfinite(p):
        return str(p)
    distance = min(abs(p), abs(1.0 - p))
    digits = 4 if distance >= 1e-3 or distance == 0 else min(12, 2 - math.floor(math.log10(distance) + 1e-9))
    return f"{p:.{digits}f}"


def evidence_warning(point: dict[str, Any]) -> str | None:
    """One line when fewer than one validation real is expected above the threshold (n x target < 1): the quantile
    then lies beyond the highest real photo, an extrapolation whose false-positive rate on new photos can be many
    times the target. None when the reals suffice or the tags are missing."""
    try:
        n, high, target = int(point["val_n_real"]), float(point["val_fpr_high"]), float(point["target_fpr"])
    except (KeyError, TypeError, ValueError):
        return None
    if n * target >= 1:
        return None
    return (
        f"the threshold rests on {n} real validation photos, too few for a {target:.1%} false-positive rate: on "
        f"new real photos it may be up to {high:.1%}; a validation split with {math.ceil(1 / target)} or more reals "
        "holds it"
    )


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def fit_calibration(labels: np.ndarray, raw_logits: np.ndarray) -> Calibration:
    """Platt scaling: the scale and bias of the logit that minimise the log loss on these labels.

    Two parameters fit well on a few hundred photos where isotonic regression would overfit its steps; a split of
    one class only (nothing to fit) gives the identity.
    """
    from scipy.optimize import minimize

    y = np.asarray(labels, dtype=np.float64)
    z = np.asarray(raw_logits, dtype=np.float64)
    if y.size == 0 or y.min() == y.max():
        return Calibration()

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        a, b = params
        t = a * z + b
        # log(1 + e^t) - y t, and its gradient (sigmoid(t) - y) through a and b
        value = float(np.mean(np.logaddexp(0.0, t) - y * t))
        residual = sigmoid(t) - y
        return value, np.array([np.mean(residual * z), np.mean(residual)])

    fitted = minimize(loss, np.array([1.0, 0.0]), jac=True, method="L-BFGS-B")
    scale, bias = (float(v) for v in fitted.x)
    if not (math.isfinite(scale) and math.isfinite(bias)) or scale < _MIN_SCALE:
        return Calibration()  # scores that anti-correlate with the labels: keep the model's own order
    return Calibration(scale, bias)


def harrell_davis_quantile(values: np.ndarray, q: float) -> float:
    """The Harrell-Davis estimate of the q-quantile: every order statistic weighted by the Beta((n+1)q, (n+1)(1-q))
    mass of its slot, a smooth estimate with less error than one order statistic on small samples."""
    from scipy.stats import beta

    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    if n == 0:
        raise ValueError("no values to take a quantile of")
    if n == 1:
        return float(x[0])
    edges = beta.cdf(np.arange(n + 1) / n, (n + 1) * q, (n + 1) * (1 - q))
    return float(np.dot(np.diff(edges), x))


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The exact binomial interval of a share k/n."""
    from scipy.stats import beta

    if n == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def threshold_for_fpr(real_scores: np.ndarray, target_fpr: float) -> float:
    """The score at or above which ``target_fpr`` of real photos are expected to fall (Harrell-Davis), so that a
    score is flagged when ``score >= threshold``. No reals: 0.5."""
    real = np.asarray(real_scores, dtype=np.float64)
    if real.size == 0:
        return 0.5
    return float(min(1.0, harrell_davis_quantile(real, 1.0 - target_fpr)))


def fit_operating_point(labels: np.ndarray, raw_logits: np.ndarray, target_fpr: float) -> OperatingPoint:
    """Calibrate on the validation split, then set the threshold on the calibrated probabilities of its reals."""
    labels = np.asarray(labels).astype(int)
    calibration = fit_calibration(labels, raw_logits)
    probabilities = calibration.probabilities(raw_logits)
    real = probabilities[labels == 0]
    threshold = threshold_for_fpr(real, target_fpr)
    above = int((real >= threshold).sum())
    return OperatingPoint(
        calibration=calibration,
        threshold=threshold,
        target_fpr=target_fpr,
        val_fpr=above / real.size if real.size else float("nan"),
        val_fpr_interval=clopper_pearson(above, int(real.size)),
        n_real=int(real.size),
    )
