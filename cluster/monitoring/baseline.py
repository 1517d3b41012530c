"""Write the drift alerts' training baseline (a Prometheus rules file) from a model's evaluation report.

The drift alerts compare what the service predicts now with what the champion predicted on its held-out test split.
Every training run writes that split's report (`evaluation.json`, also the run's MLflow artifact `evaluation/`), and
two numbers follow from its confusion matrix:

- the share flagged ai_generated at the model's threshold: (tp + fp) / n;
- the mean predicted probability. The report keeps no scores, but for a calibrated model the mean probability equals
  the AI share of the split, (tp + fn) / n, and never differs from it by more than the report's ECE (the per-bin gaps
  it sums bound the gap of the means), so that share is the baseline and the ECE is written next to it.

    mlflow artifacts download -r <run_id> -a evaluation -d /tmp/eval
    python -m cluster.monitoring.baseline /tmp/eval/evaluation/evaluation.json

then reload Prometheus (`curl -X POST :9090/-/reload`, or restart it).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from app.drift import AI_SHARE_RULE, BASELINE_RULES, MEAN_RULE


@dataclass(frozen=True)
class Baseline:
    probability_mean: float
    ai_generated_ratio: float
    ece: float | None
    n: int
    threshold: float | None
    source: str


def baseline_from_report(report: dict, source: str) -> Baseline:
    """Read the confusion matrix of an `evaluation.json`; a report without one cannot be a baseline."""
    try:
        cm = report["confusion_matrix"]
        tn, fp, fn, tp = (int(cm[key]) for key in ("tn", "fp", "fn", "tp"))
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{source} has no confusion_matrix with tn, fp, fn, tp: not an aipd evaluation report"
        ) from err
    n = tn + fp + fn + tp
    if n == 0:
        raise ValueError(f"{source} scored no images; evaluate on a non-empty test split first")
    return Baseline(
        probability_mean=(tp + fn) / n,
        ai_generated_ratio=(tp + fp) / n,
        ece=report.get("ece"),
        n=n,
        threshold=report.get("threshold"),
        source=source,
    )


def rules_text(baseline: Baseline) -> str:
    ece = "unknown" if baseline.ece is None else f"{baseline.ece:.4f}"
    header = (
        "# Training baseline for the drift alerts (aipd-alerts.rules.yml), written by\n"
        "#   python -m cluster.monitoring.baseline <evaluation.json>\n"
        f"# from {baseline.source} on {time.strftime('%Y-%m-%d')}: test split of {baseline.n} images,"
        f" threshold {baseline.threshold}.\n"
        "# ai_generated_ratio: share flagged ai_generated, (tp + fp) / n.\n"
        f"# prediction_probability_mean: AI share of the split, (tp + fn) / n, within ECE {ece} of the mean\n"
        "#   predicted probability (equal for a calibrated model).\n"
    )
    rules = {
        "groups": [
            {
                "name": "aipd-baseline",
                "rules": [
                    {"record": MEAN_RULE, "expr": f"vector({baseline.probability_mean:.6g})"},
                    {"record": AI_SHARE_RULE, "expr": f"vector({baseline.ai_generated_ratio:.6g})"},
                ],
            }
        ]
    }
    return header + yaml.safe_dump(rules, sort_keys=False)


def write_baseline(report_path: Path, out: Path = BASELINE_RULES) -> Baseline:
    baseline = baseline_from_report(json.loads(Path(report_path).read_text()), str(report_path))
    out.write_text(rules_text(baseline))
    return baseline


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="evaluation.json of the champion's training run")
    parser.add_argument(
        "--out", type=Path, default=BASELINE_RULES, help=f"rules file to write (default: {BASELINE_RULES})"
    )
    args = parser.parse_args(argv)
    try:
        baseline = write_baseline(args.report, args.out)
    except (OSError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    print(
        f"wrote {args.out}: mean probability {baseline.probability_mean:.4f}, "
        f"ai_generated share {baseline.ai_generated_ratio:.4f} (n={baseline.n})"
    )


if __name__ == "__main__":
    main()
