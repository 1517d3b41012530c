"""The evaluation's reports on scores made by hand: flipped verdicts, the AUROC per generator family, the operating
point's realised rates and the calibration error before and after; no Ray, no model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from app.degradations import SEVERITIES, sweep
from app.operating_point import Calibration
from app.scoring import Scores
from training.evaluate import (
    EvaluationReport,
    auroc_by_source,
    flip_rate,
    flip_to_ai_rate,
    report_metrics,
    robustness_curves,
    source_accuracy,
    verdict_metrics,
)


def scores(paths: list[str], labels: list[int], probabilities: list[float]) -> Scores:
    p = np.asarray(probabilities, dtype=np.float64)
    return Scores(np.asarray(paths, dtype=object), np.asarray(labels), np.log(p / (1 - p)))


def test_flip_rate_pairs_photos_by_path_and_counts_changed_verdicts() -> None:
    clean = scores(["a", "b", "c", "d"], [0, 0, 1, 1], [0.1, 0.6, 0.7, 0.9])
    # another order, one photo unreadable after the change (d), one verdict flipped (c: 0.7 -> 0.3)
    changed = scores(["c", "a", "b"], [1, 0, 0], [0.3, 0.2, 0.55])
    assert flip_rate(clean, changed, threshold=0.5) == pytest.approx(1 / 3)
    assert np.isnan(flip_rate(clean, scores([], [], []), 0.5))


def test_flips_to_ai_count_only_photos_called_real_before_and_ai_after() -> None:
    clean = scores(["a", "b", "c", "d"], [0, 0, 1, 1], [0.1, 0.4, 0.7, 0.9])
    # b: real -> AI (0.4 -> 0.6); c: AI -> real; a and d unchanged
    changed = scores(["a", "b", "c", "d"], [0, 0, 1, 1], [0.2, 0.6, 0.3, 0.95])
    assert flip_rate(clean, changed, threshold=0.5) == pytest.approx(2 / 4)
    assert flip_to_ai_rate(clean, changed, threshold=0.5) == pytest.approx(1 / 4)
    assert np.isnan(flip_to_ai_rate(clean, scores([], [], []), 0.5))


def test_auroc_by_source_pits_every_real_against_one_family() -> None:
    records = pd.DataFrame(
        {
            "path": ["r1", "r2", "a1", "a2", "b1", "b2"],
            "label": [0, 0, 1, 1, 1, 1],
            "generator": ["none", "none", "alpha", "alpha", "beta", "beta"],
        }
    )
    # alpha is caught perfectly, beta is scored below every real
    clean = scores(list(records["path"]), list(records["label"]), [0.2, 0.3, 0.8, 0.9, 0.1, 0.15])
    assert auroc_by_source(clean, records) == {"alpha": 1.0, "beta": 0.0}
    assert auroc_by_source(clean, records.drop(columns=["generator"])) == {}


def test_source_accuracy_is_the_top_1_hit_rate_of_each_family() -> None:
    records = pd.DataFrame(
        {
            "path": ["r1", "r2", "a1", "a2", "b1", "x1"],
            "label": [0, 0, 1, 1, 1, 1],
            "generator": ["none", "none", "alpha", "alpha", "beta", "unseen"],
        }
    )
    families = ["none", "alpha", "beta"]
    clean = scores(list(records["path"]), list(records["label"]), [0.2, 0.3, 0.8, 0.9, 0.6, 0.7])
    clean.sources = np.array(
        [
            [0.8, 0.1, 0.1],  # r1 right
            [0.2, 0.7, 0.1],  # r2 taken for alpha
            [0.1, 0.6, 0.3],  # a1 right
            [0.1, 0.8, 0.1],  # a2 right
            [0.1, 0.5, 0.4],  # b1 taken for alpha
            [0.3, 0.3, 0.4],  # a family the head does not know: not counted
        ]
    )
    assert source_accuracy(clean, records, families) == {"none": 0.5, "alpha": 1.0, "beta": 0.0}
    assert source_accuracy(clean, records.drop(columns=["generator"]), families) == {}
    clean.sources = None
    assert source_accuracy(clean, records, families) == {}


def test_the_realised_rates_at_the_threshold_and_the_ece_before_calibration() -> None:
    rng = np.random.default_rng(0)
    true_logits = rng.normal(0, 2, 2000)  # calibrated: each label is drawn with its logit's probability
    labels = (rng.uniform(0, 1, 2000) < 1 / (1 + np.exp(-true_logits))).astype(int)
    calibration = Calibration(scale=0.25, bias=0.0)  # the model's own logits were 4x too confident
    calibrated = Scores(np.arange(2000).astype(str).astype(object), labels, true_logits)
    metrics = verdict_metrics(calibrated, threshold=0.5, target_fpr=0.01, calibration=calibration)
    assert metrics["fpr_at_threshold"] == pytest.approx((true_logits[labels == 0] >= 0).mean())
    assert metrics["tpr_at_threshold"] == pytest.approx((true_logits[labels == 1] >= 0).mean())
    assert 0.0 < metrics["tpr_at_target_fpr"] < metrics["tpr_at_threshold"]
    assert metrics["ece_uncalibrated"] > metrics["ece"] + 0.05


def test_robustness_curves_follow_the_sweeps_severities() -> None:
    robustness = {name: 0.9 for name in sweep()}
    curves = robustness_curves(robustness)
    assert set(curves) == set(SEVERITIES)
    assert [name for name, _ in curves["jpeg"]] == ["jpeg_q90", "jpeg_q75", "jpeg_q50", "jpeg_q30"]


def test_report_metrics_are_mlflow_names_without_undefined_values() -> None:
    report = EvaluationReport(
        metrics={"auroc": 0.9, "ece": float("nan"), "threshold": 0.7, "confusion_matrix": {"tn": 1}},
        robustness={"jpeg_q50": 0.8, "blur_sigma1": float("nan")},
        flip_rate={"downscale_0.5_then_jpeg_q75": 0.1},
        flip_to_ai={"downscale_0.5_then_jpeg_q75": 0.0},
        blurred_real_flag_rate=0.05,
        model="m",
        data="d",
        by_source={"alpha": 0.95},
    )
    values = report_metrics(report, "test_")
    assert values == {
        "test_auroc": 0.9,
        "test_threshold": 0.7,
        "test_blurred_real_flag_rate": 0.05,
        "test_robust_jpeg_q50": 0.8,
        "test_flip_downscale_0.5_then_jpeg_q75": 0.1,
        "test_flip_to_ai_downscale_0.5_then_jpeg_q75": 0.0,
        "test_source_auroc_alpha": 0.95,
    }
