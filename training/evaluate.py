"""Evaluation on a held-out split: the metrics, a robustness sweep, and a report in Markdown with two plots.

Scores come from ``app.scoring`` (the same decode and eval preprocessing as serving). The robustness sweep re-encodes
or blurs each decoded photo before preprocessing, the way a marketplace's own pipeline or a seller's editing would.
"""

from __future__ import annotations

import functools
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from training.metrics import classification_metrics, reliability_curve

if TYPE_CHECKING:
    from app.config import ImageLimits

ROBUSTNESS = ("jpeg_q90", "jpeg_q75", "jpeg_q50", "downscale_0.5", "blur_sigma1")


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def downscale(image: Image.Image, factor: float) -> Image.Image:
    size = (max(1, round(image.width * factor)), max(1, round(image.height * factor)))
    return image.resize(size, Image.Resampling.BICUBIC)


def blur(image: Image.Image, sigma: float) -> Image.Image:
    return image.filter(ImageFilter.GaussianBlur(sigma))


def corruption(name: str) -> Callable[[Image.Image], Image.Image]:
    """Picklable corruptions, so Ray Data workers can apply them."""
    table: dict[str, Callable[[Image.Image], Image.Image]] = {
        "jpeg_q90": functools.partial(jpeg, quality=90),
        "jpeg_q75": functools.partial(jpeg, quality=75),
        "jpeg_q50": functools.partial(jpeg, quality=50),
        "downscale_0.5": functools.partial(downscale, factor=0.5),
        "blur_sigma1": functools.partial(blur, sigma=1.0),
    }
    return table[name]


@dataclass
class EvaluationReport:
    metrics: dict[str, Any]
    robustness: dict[str, float]
    blurred_real_flag_rate: float
    model: str
    data: str
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.metrics.items()}
        out["blurred_real_flag_rate"] = self.blurred_real_flag_rate
        out["robustness"] = dict(self.robustness)
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
            f"- decision threshold: {m['threshold']:.4f} "
            "(chosen on the validation split for a target false-positive rate)",
            "",
            "| metric | value |",
            "| --- | --- |",
        ]
        for key in ("auroc", "ap", "accuracy", "real_accuracy", "ai_accuracy", "tpr_at_1pct_fpr", "ece"):
            lines.append(f"| {key} | {m[key]:.4f} |")
        flagged = self.blurred_real_flag_rate
        lines.append(f"| blurred_real_flag_rate (reals blurred with sigma 1, flagged as AI) | {flagged:.4f} |")
        lines += [
            "",
            "Confusion matrix (rows: truth, columns: verdict)",
            "",
            "| | real | ai_generated |",
            "| --- | --- | --- |",
            f"| real | {cm['tn']} | {cm['fp']} |",
            f"| ai_generated | {cm['fn']} | {cm['tp']} |",
            "",
            "Robustness (AUROC after the change)",
            "",
            "| change | AUROC |",
            "| --- | --- |",
        ]
        lines += [f"| {name} | {value:.4f} |" for name, value in self.robustness.items()]
        return "\n".join(lines) + "\n"


def evaluate_loaded(
    loaded: Any,
    records: pd.DataFrame,
    limits: ImageLimits,
    *,
    model_name: str,
    data_name: str,
    robustness: bool = True,
) -> EvaluationReport:
    """Score the clean split, every robustness variant, and the blurred reals."""
    from app.scoring import auroc, score_split

    score = functools.partial(score_split, loaded, limits=limits)
    labels, scores = score(records)
    if labels.size == 0:
        from app.data import DatasetError

        raise DatasetError(f"no readable test images in {data_name}")
    metrics = classification_metrics(labels, scores, loaded.threshold)
    metrics["_labels"], metrics["_scores"] = labels, scores
    sweep: dict[str, float] = {}
    blurred_scores = None
    if robustness:
        for name in ROBUSTNESS:
            l2, s2 = score(records, corrupt=corruption(name))
            sweep[name] = auroc(l2, s2)
            if name == "blur_sigma1":
                blurred_scores = s2[l2 == 0]
    if blurred_scores is None:
        _, blurred_scores = score(records[records["label"] == 0], corrupt=corruption("blur_sigma1"))
    flag_rate = float((blurred_scores >= loaded.threshold).mean()) if blurred_scores.size else float("nan")
    return EvaluationReport(metrics, sweep, flag_rate, model_name, data_name)


def write_report(report: EvaluationReport, out_dir: Path) -> dict[str, str]:
    """Markdown, JSON and two PNG plots (ROC and reliability) under ``out_dir``; returns their paths."""
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
    report.files = {k: str(v) for k, v in files.items()}
    return report.files


def _finite(value: Any) -> Any:
    """JSON has no NaN: undefined metrics (one class only) become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value
