"""The metric functions evaluation and the champion rule rely on."""

import itertools

import numpy as np
import pytest

from training.loop import lr_factor
from training.metrics import classification_metrics, expected_calibration_error, tpr_at_fpr


def test_perfect_and_random_scores() -> None:
    labels = np.array([0, 0, 1, 1])
    perfect = classification_metrics(labels, np.array([0.1, 0.2, 0.8, 0.9]), threshold=0.5)
    assert perfect["auroc"] == 1.0 and perfect["accuracy"] == 1.0
    assert perfect["confusion_matrix"] == {"tn": 2, "fp": 0, "fn": 0, "tp": 2}
    assert tpr_at_fpr(labels, np.array([0.1, 0.2, 0.8, 0.9]), 0.01) == 1.0
    inverted = classification_metrics(labels, np.array([0.9, 0.8, 0.2, 0.1]), threshold=0.5)
    assert inverted["auroc"] == 0.0 and inverted["real_accuracy"] == 0.0


def test_ece_is_zero_when_calibrated_and_large_when_not() -> None:
    labels = np.array([0] * 50 + [1] * 50)
    assert expected_calibration_error(labels, labels.astype(float)) == pytest.approx(0.0)
    assert expected_calibration_error(labels, np.full(100, 0.99)) == pytest.approx(0.49, abs=0.01)


def test_lr_warms_up_then_decays_to_zero() -> None:
    factors = [lr_factor(s, warmup_steps=10, total_steps=100) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(factors[10:]))
    assert lr_factor(100, 10, 100) == pytest.approx(0.0)
