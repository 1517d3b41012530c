"""The drift alerts' terms, one owner for the service and the monitoring files: where the training baseline lives,
the names of its recording rules, and the shifts that count as drift.

`/drift` (serving/metrics.py) judges the answers so far by these numbers, `python -m cluster.monitoring.baseline`
writes the baseline file under these rule names, and Prometheus's alert rules
(cluster/monitoring/rules/aipd-alerts.rules.yml) use the same thresholds, which a test holds to these.
"""

from __future__ import annotations

import re
from pathlib import Path

from app.contract import DriftBaseline

RULES_DIR = Path(__file__).resolve().parents[1] / "cluster" / "monitoring" / "rules"
BASELINE_RULES = RULES_DIR / "aipd-baseline.rules.yml"
ALERT_RULES = RULES_DIR / "aipd-alerts.rules.yml"

MEAN_RULE = "aipd:baseline:prediction_probability_mean"
AI_SHARE_RULE = "aipd:baseline:ai_generated_ratio"

DRIFT_ALERTS = ("AipdPredictionDrift", "AipdVerdictShareDrift")  # the alert rules' names, which start a retraining

DRIFT_MIN_PREDICTIONS = 200  # drift is judged over at least this many answers
PROBABILITY_SHIFT_ALERT = 0.15  # the mean predicted probability moved this far from the baseline's
AI_SHARE_SHIFT_ALERT = 0.2  # the share flagged ai_generated moved this far from the baseline's

_VECTOR = re.compile(r"^\s*vector\(\s*([-+0-9.eE]+)\s*\)\s*$")


def read_baseline(path: Path = BASELINE_RULES) -> tuple[DriftBaseline | None, str]:
    """The training baseline the drift alerts compare with, and a sentence on where it came from or why there is none.

    It is the recording-rules file `python -m cluster.monitoring.baseline` writes from the champion's evaluation
    report, read on each call, so regenerating it changes /drift without a redeploy.
    """
    import yaml

    how = f"write one with `python -m cluster.monitoring.baseline <evaluation.json>` (to {path})"
    try:
        groups = (yaml.safe_load(path.read_text()) or {}).get("groups") or []
    except (OSError, yaml.YAMLError) as err:
        return None, f"no drift baseline is configured ({type(err).__name__}: {err}); {how}"
    values: dict[str, float] = {}
    for group in groups:
        for rule in group.get("rules") or []:
            match = _VECTOR.match(str(rule.get("expr", "")))
            if rule.get("record") and match:
                values[rule["record"]] = float(match.group(1))
    try:
        baseline = DriftBaseline(
            probability_mean=values[MEAN_RULE], ai_generated_ratio=values[AI_SHARE_RULE], source=str(path)
        )
    except KeyError as err:
        return None, f"the drift baseline {path} has no {err.args[0]} recording rule; {how}"
    return baseline, f"compared with the training baseline in {path}"
