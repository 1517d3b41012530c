"""How each model version is doing, from the application's metrics totals, and when a challenger must go.

Every detector replica records, per version, the photos it scored (by verdict, or error when the forward pass
failed), the forward time that scored them, and in shadow mode whether the challenger's verdict agreed with the
champion's on the same photo. From those totals, summed over every replica by the metrics store, come the figures
`aipd rollout status` shows and the rule that rolls a challenger back: after the minimum number of its photos, its
error rate or p99 latency above the champion's by more than the set margin, or (shadow) its verdicts apart from the
champion's on more than the set share of the photos.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from app.config import DetectorSettings
from serving.metrics import METRICS, Delta

ROLLOUT_METRICS = ("model_scores_total", "model_latency_seconds", "shadow_comparisons_total")


@dataclass(frozen=True)
class VersionFigures:
    """One version's photos so far: how many, how many failed, its AI share, its latency and, as a shadow, how often
    it agreed with the champion."""

    version: str
    requests: int
    errors: int
    ai_generated: int
    p50_ms: float | None
    p99_ms: float | None
    compared: int = 0
    agreed: int = 0

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def ai_share(self) -> float | None:
        answered = self.requests - self.errors
        return self.ai_generated / answered if answered else None

    @property
    def agreement(self) -> float | None:
        return self.agreed / self.compared if self.compared else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "error_rate": self.error_rate, "ai_share": self.ai_share, "agreement": self.agreement}


def version_figures(totals: Delta) -> dict[str, VersionFigures]:
    """Per version, from the totals of `ROLLOUT_METRICS`."""
    scores: dict[str, dict[str, float]] = {}
    latency: dict[str, list[float]] = {}
    shadow: dict[str, dict[str, float]] = {}
    for (name, labels), value in totals.items():
        if name == "model_scores_total":
            version, verdict = labels
            scores.setdefault(version, {})[verdict] = scores.get(version, {}).get(verdict, 0.0) + value
        elif name == "model_latency_seconds":
            latency[labels[0]] = value
        elif name == "shadow_comparisons_total":
            version, agree = labels
            shadow.setdefault(version, {})[agree] = shadow.get(version, {}).get(agree, 0.0) + value
    figures = {}
    for version in sorted(set(scores) | set(latency) | set(shadow)):
        counts, compared = scores.get(version, {}), shadow.get(version, {})
        row = latency.get(version)
        figures[version] = VersionFigures(
            version=version,
            requests=int(sum(counts.values())),
            errors=int(counts.get("error", 0)),
            ai_generated=int(counts.get("ai_generated", 0)),
            p50_ms=_quantile_ms(row, 0.5),
            p99_ms=_quantile_ms(row, 0.99),
            compared=int(sum(compared.values())),
            agreed=int(compared.get("true", 0)),
        )
    return figures


def roll_back_reason(
    champion: VersionFigures | None, challenger: VersionFigures | None, config: DetectorSettings, shadow: bool
) -> str | None:
    """Why the challenger must go now, or None: nothing is judged before it has scored the minimum of photos."""
    if challenger is None or challenger.requests < config.rollout_min_requests:
        return None
    reference = champion or VersionFigures("none", 0, 0, 0, None, None)
    if challenger.error_rate > reference.error_rate + config.rollout_error_margin:
        return (
            f"its error rate {challenger.error_rate:.1%} exceeds the champion's {reference.error_rate:.1%} by more "
            f"than {config.rollout_error_margin:.0%} over {challenger.requests} photos"
        )
    if (
        challenger.p99_ms is not None
        and reference.p99_ms is not None
        and challenger.p99_ms > reference.p99_ms * (1 + config.rollout_latency_margin)
    ):
        return (
            f"its p99 latency {challenger.p99_ms:.0f} ms exceeds the champion's {reference.p99_ms:.0f} ms by more "
            f"than {config.rollout_latency_margin:.0%} over {challenger.requests} photos"
        )
    agreement = challenger.agreement
    if (
        shadow
        and agreement is not None
        and challenger.compared >= config.rollout_min_requests
        and 1 - agreement > config.rollout_max_disagreement
    ):
        return (
            f"its verdicts disagree with the champion's on {1 - agreement:.1%} of {challenger.compared} photos, "
            f"more than {config.rollout_max_disagreement:.0%}"
        )
    return None


def _quantile_ms(row: list[float] | None, q: float) -> float | None:
    """The upper bound of the histogram bucket that holds the q-quantile, in milliseconds (a bound, not a guess)."""
    if not row:
        return None
    counts = row[:-1]
    total = sum(counts)
    if total == 0:
        return None
    bounds = list(METRICS["model_latency_seconds"].buckets) + [float("inf")]
    seen = 0.0
    for bound, count in zip(bounds, counts, strict=True):
        seen += count
        if seen >= q * total:
            return bound * 1000.0 if bound != float("inf") else float("inf")
    return None
