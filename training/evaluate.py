"""Evaluation on a held-out split: the verdicts at the shipped operating point, how stable they are, and where the
detector breaks; a report in Markdown and JSON with its plots.

Scores come from ``app.scoring`` (the same decode and eval preprocessing as serving), every variant of a photo from
one decode of it. The degradations are the ones training draws (``app.degradations``): each at rising severity, and
a half-size thumbnail re-encoded at quality 75, what a marketplace's own pipeline does to every upload.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from app.degradations import SEVERITIES, sweep
from app.operating_point import format_probability
from training.metrics import classification_metrics, expected_calibration_error, reliability_curve, tpr_at_fpr

if TYPE_CHECKING:
    from app.config import ImageLimits
    from app.scoring import Scores

CLEAN = "clean"
# The degradations whose verdict flips are counted: a resize, a re-encoding, and both.
FLIP_VARIANTS = ("downscale_0.5", "jpeg_q75", "downscale_0.5_then_jpeg_q75")
SUMMARY_ROBUSTNESS = ("blur_sigma1", "downscale_0.5", "jpeg_q50")  # the three the targets name


@dataclass
class EvaluationReport:
    metrics: dict[str, Any]
    robustness: dict[str, float]  # AUROC after each degradation of the sweep
    flip_rate: dict[str, float]  # share of photos whose verdict changes after the degradation
    blurred_real_flag_rate: float
    model: str
    data: str
    # the share of photos that change from "real" to "AI" (a seller's photo flagged because it was resized): the
    # flips that cost an honest seller, where the rest are AI photos whose evidence the change removed
    flip_to_ai: dict[str, float] = field(default_factory=dict)
    by_source: dict[str, float] = field(default_factory=dict)  # AUROC of the reals against each generator family
    # top-1 accuracy of the source head on each family's photos ("none": the reals); empty without the head
    source_accuracy: dict[str, float] = field(default_factory=dict)
    operating_point: dict[str, Any] = field(default_factory=dict)  # how the model's threshold was set
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.metrics.items()}
        out["blurred_real_flag_rate"] = self.blurred_real_flag_rate
        out["robustness"] = dict(self.robustness)
        out["robustness_curves"] = robustness_curves(self.robustness)
        out["flip_rate"] = dict(self.flip_rate)
        out["flip_to_ai"] = dict(self.flip_to_ai)
        out["by_source"] = dict(self.by_source)
        out["source_accuracy"] = dict(self.source_accuracy)
        out["operating_point"] = dict(self.operating_point)
        out["model"] = self.model
        out["data"] = self.data
        return _finite(out)

    def to_markdown(self) -> str:
        m = self.metrics
        cm = m["confusion_matrix"]
        lines = [
            "# Detector evaluation",
            "",
            f"- model: `{self.model}`",
            f"- data: `{self.data}` (test split, {m['n']} images)",
            f"- decision threshold: {format_probability(m['threshold'])} on the calibrated probability, set on the "
            f"validation split for a {m['target_fpr']:.1%} false-positive rate",
            "",
            "| metric | value |",
            "| --- | --- |",
        ]
        for key in (
            "auroc",
            "ap",
            "accuracy",
            "real_accuracy",
            "ai_accuracy",
            "fpr_at_threshold",
            "tpr_at_threshold",
            "tpr_at_target_fpr",
            "ece",
            "ece_uncalibrated",
        ):
            lines.append(f"| {key} | {m[key]:.4f} |")
        flagged = self.blurred_real_flag_rate
        lines.append(f"| blurred_real_flag_rate (reals blurred with sigma 1, flagged as AI) | {flagged:.4f} |")
        lines += [
            "",
            "Confusion matrix at the threshold (rows: truth, columns: verdict)",
            "",
            "| | real | ai_generated |",
            "| --- | --- | --- |",
            f"| real | {cm['tn']} | {cm['fp']} |",
            f"| ai_generated | {cm['fn']} | {cm['tp']} |",
            "",
            "Robustness (AUROC after the change) and verdicts that flip",
            "",
            "| change | AUROC | verdicts flipped | of them real to AI |",
            "| --- | --- | --- | --- |",
        ]
        for name, value in self.robustness.items():
            flips, to_ai = self.flip_rate.get(name), self.flip_to_ai.get(name)
            cells = ["" if v is None else f"{v:.4f}" for v in (flips, to_ai)]
            lines.append(f"| {name} | {value:.4f} | {cells[0]} | {cells[1]} |")
        if self.by_source:
            lines += ["", "AUROC of the real photos against each generator family", "", "| family | AUROC |"]
            lines += ["| --- | --- |"] + [f"| {name} | {value:.4f} |" for name, value in self.by_source.items()]
        if self.source_accuracy:
            lines += ["", "Which generator: the source head's top-1 accuracy per family", "", "| family | accuracy |"]
            lines += ["| --- | --- |"] + [f"| {k} | {v:.4f} |" for k, v in self.source_accuracy.items()]
        return "\n".join(lines) + "\n"


def report_metrics(report: EvaluationReport, prefix: str) -> dict[str, float]:
    """The report's numbers as MLflow metrics: the top-level ones, then `robust_<change>` (AUROC), `flip_<change>`,
    `flip_to_ai_<change>` and `source_auroc_<family>`; undefined ones (one class only) are left out."""
    values = {k: v for k, v in report.to_json().items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    values |= {f"robust_{k}": v for k, v in report.robustness.items()}
    values |= {f"flip_{k}": v for k, v in report.flip_rate.items()}
    values |= {f"flip_to_ai_{k}": v for k, v in report.flip_to_ai.items()}
    values |= {f"source_auroc_{k}": v for k, v in report.by_source.items()}
    values |= {f"source_accuracy_{k}": v for k, v in report.source_accuracy.items()}
    return {prefix + k: float(v) for k, v in values.items() if v is not None and math.isfinite(v)}


def robustness_curves(robustness: dict[str, float]) -> dict[str, list[list[Any]]]:
    """AUROC per severity for each degradation of the sweep: {"blur": [["blur_sigma0.5", 0.97], ...], ...}."""
    return {
        kind: [[name, robustness[name]] for name, _ in variants if name in robustness]
        for kind, variants in SEVERITIES.items()
    }


def evaluate_loaded(
    loaded: Any,
    records: pd.DataFrame,
    limits: ImageLimits,
    *,
    model_name: str,
    data_name: str,
    robustness: bool = True,
    target_fpr: float = 0.01,
) -> EvaluationReport:
    """Score the clean split and every degradation of the sweep in one pass; judge the verdicts at the model's
    threshold; pair each photo's verdicts across the changes; split the AUROC by generator family when the records
    name one (a `generator` column)."""
    from app.scoring import auroc, score_variants

    # without the sweep, the blurred reals' flag rate still needs its one variant
    variants = {CLEAN: None, **(sweep() if robustness else sweep(["blur_sigma1"]))}
    scored = score_variants(loaded, records, limits, variants)
    clean = scored[CLEAN]
    if clean.labels.size == 0:
        from app.data import DatasetError

        raise DatasetError(f"no readable test images in {data_name}")
    metrics = verdict_metrics(clean, loaded.threshold, target_fpr, loaded.calibration)
    metrics["_labels"], metrics["_scores"] = clean.labels, clean.probabilities
    sweep_auroc = {name: auroc(s.labels, s.probabilities) for name, s in scored.items() if name != CLEAN and robustness}
    blurred = scored["blur_sigma1"]
    blurred_reals = blurred.probabilities[blurred.labels == 0]
    flag_rate = float((blurred_reals >= loaded.threshold).mean()) if blurred_reals.size else float("nan")
    flipped = [name for name in FLIP_VARIANTS if name in scored]
    flips = {name: flip_rate(clean, scored[name], loaded.threshold) for name in flipped}
    to_ai = {name: flip_to_ai_rate(clean, scored[name], loaded.threshold) for name in flipped}
    return EvaluationReport(
        metrics=metrics,
        robustness=sweep_auroc,
        flip_rate=flips,
        flip_to_ai=to_ai,
        blurred_real_flag_rate=flag_rate,
        model=model_name,
        data=data_name,
        by_source=auroc_by_source(clean, records),
        source_accuracy=source_accuracy(clean, records, list(loaded.model_cfg.source_families)),
        operating_point=dict(loaded.operating_point),
    )


def verdict_metrics(scores: Scores, threshold: float, target_fpr: float, calibration: Any) -> dict[str, Any]:
    """The classification metrics at the threshold, the realised false- and true-positive rates there against what
    the test split's own ROC gives at the target, and the calibration error with and without the calibration."""
    from app.operating_point import sigmoid

    labels, probabilities = scores.labels, scores.probabilities
    metrics = classification_metrics(labels, probabilities, threshold)
    flagged = probabilities >= threshold
    real, ai = labels == 0, labels == 1
    metrics["target_fpr"] = float(target_fpr)
    metrics["fpr_at_threshold"] = float(flagged[real].mean()) if real.any() else float("nan")
    metrics["tpr_at_threshold"] = float(flagged[ai].mean()) if ai.any() else float("nan")
    metrics["tpr_at_target_fpr"] = tpr_at_fpr(labels, probabilities, target_fpr)
    metrics["ece_uncalibrated"] = expected_calibration_error(labels, sigmoid(calibration.raw(scores.logits)))
    return metrics


def flip_rate(clean: Scores, changed: Scores, threshold: float) -> float:
    """The share of photos (readable in both) whose verdict at the threshold differs after the change."""
    before, after = _paired_verdicts(clean, changed, threshold)
    return float(np.mean(before != after)) if before.size else float("nan")


def flip_to_ai_rate(clean: Scores, changed: Scores, threshold: float) -> float:
    """The share of photos (readable in both) called real before the change and AI after it."""
    before, after = _paired_verdicts(clean, changed, threshold)
    return float(np.mean(~before & after)) if before.size else float("nan")


def _paired_verdicts(clean: Scores, changed: Scores, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Each photo's verdict (flagged or not) before and after the change, for the photos readable in both."""
    before = dict(zip(clean.paths, clean.probabilities >= threshold, strict=True))
    after = dict(zip(changed.paths, changed.probabilities >= threshold, strict=True))
    common = [path for path in before if path in after]
    return np.array([before[p] for p in common], dtype=bool), np.array([after[p] for p in common], dtype=bool)


def auroc_by_source(scores: Scores, records: pd.DataFrame) -> dict[str, float]:
    """For each generator family of the records' `generator` column: the AUROC of every real photo against the AI
    photos of that family. Empty when the records name no family."""
    from app.scoring import auroc

    if "generator" not in records.columns:
        return {}
    source = dict(zip(records["path"], records["generator"], strict=True))
    families = np.array([source.get(path) for path in scores.paths], dtype=object)
    real = scores.labels == 0
    out: dict[str, float] = {}
    for family in sorted({f for f, label in zip(families, scores.labels, strict=True) if label == 1 and f}):
        mask = real | ((scores.labels == 1) & (families == family))
        out[str(family)] = auroc(scores.labels[mask], scores.logits[mask])
    return out


def source_accuracy(scores: Scores, records: pd.DataFrame, families: list[str]) -> dict[str, float]:
    """For each family of the records' `generator` column that the source head knows ("none" for the reals): the
    share of its photos whose most likely family is the right one. Empty without the head or the column."""
    if scores.sources is None or not families or "generator" not in records.columns:
        return {}
    source = dict(zip(records["path"], records["generator"], strict=True))
    truth = np.array([source.get(path) for path in scores.paths], dtype=object)
    picked = np.array(families, dtype=object)[scores.sources.argmax(axis=1)]
    return {family: float(np.mean(picked[truth == family] == family)) for family in families if (truth == family).any()}


def write_report(report: EvaluationReport, out_dir: Path) -> dict[str, str]:
    """Markdown, JSON and three PNG plots (ROC, reliability, robustness curves) under ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    out_dir.mkdir(parents=True, exist_ok=True)
    labels, scores = report.metrics["_labels"], report.metrics["_scores"]
    files = {
        "markdown": out_dir / "evaluation.md",
        "json": out_dir / "evaluation.json",
        "roc": out_dir / "roc.png",
        "reliability": out_dir / "reliability.png",
    }
    files["markdown"].write_text(report.to_markdown())
    files["json"].write_text(json.dumps(report.to_json(), indent=2))

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"AUROC {report.metrics['auroc']:.3f}")
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlabel="false-positive rate (reals flagged)", ylabel="true-positive rate", title="ROC, test split")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(files["roc"], dpi=110)
    plt.close(fig)

    mean_score, observed, counts = reliability_curve(labels, scores)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ok = counts > 0
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.plot(mean_score[ok], observed[ok], "o-")
    ax.set(
        xlabel="predicted AI probability",
        ylabel="observed AI fraction",
        title=f"Reliability (ECE {report.metrics['ece']:.3f})",
    )
    fig.tight_layout()
    fig.savefig(files["reliability"], dpi=110)
    plt.close(fig)

    curves = robustness_curves(report.robustness)
    if any(curves.values()):
        files["robustness"] = out_dir / "robustness.png"
        fig, axes = plt.subplots(1, len(curves), figsize=(4.0 * len(curves), 3.6), sharey=True)
        for ax, (kind, points) in zip(np.atleast_1d(axes), curves.items(), strict=True):
            ax.plot([name.split("_", 1)[1] for name, _ in points], [value for _, value in points], "o-")
            ax.axhline(report.metrics["auroc"], color="k", linestyle="--", linewidth=0.8, label="clean")
            ax.set(title=kind, xlabel="severity", ylim=(0.4, 1.0))
        np.atleast_1d(axes)[0].set_ylabel("AUROC")
        np.atleast_1d(axes)[0].legend(loc="lower left")
        fig.tight_layout()
        fig.savefig(files["robustness"], dpi=110)
        plt.close(fig)
    report.files = {k: str(v) for k, v in files.items()}
    return report.files


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined metrics (one class only) become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value
