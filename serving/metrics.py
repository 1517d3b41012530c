"""Prometheus metrics that are right for the whole application, however many replicas answer.

Why a named actor: a prometheus_client registry lives in one process, so with per-replica registries a scrape of
`/metrics` would see whichever ingress replica the proxy picked, and counters would jump back whenever the autoscaler
removed a replica. `ray.util.metrics` aggregates properly, but only behind Ray's per-node metrics agent port, with a
`ray_` prefix on every name, so the contract's names (`predictions_total`, ...) could not be served at `/metrics`.

So every replica (ingress and detector) adds to a local delta under a lock - no network hop on the request path -
and a background thread merges the delta into one detached actor per application every half second
(`MetricsStore`, named `aipd-metrics-<app>` in the `aipd` namespace). `/metrics` flushes the answering replica's
own delta, then renders the actor's totals with prometheus_client's text format. Detached, so counters survive the
replica that created the actor; a replica going away flushes on shutdown, and what it had not flushed in its last
half second is the only loss.

The original service's clients read `aidetect_*` names (its k6 test checks that `/metrics` names one, its dashboards
query them): the latency and probability histograms are rendered a second time under those names, the verdict
counter with its labels is recorded beside `predictions_total`, and `aidetect_model_loaded` is read at scrape time.
The same totals give `/drift`: the probability distribution of every answer so far against the training baseline
that the drift alerts use (cluster/monitoring/rules/aipd-baseline.rules.yml).

Ray Serve's own metrics (`ray_serve_num_http_requests`, replica counts, queue lengths, per-deployment latencies) are
exported by Ray's metrics agent on every node, at the port `ray start --metrics-export-port=8080` (or
`aipd serve --ray-metrics-port 8080` for a local cluster) names: scrape that port on each node alongside `/metrics`.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from app.contract import DriftBaseline, DriftResponse
from app.drift import AI_SHARE_SHIFT_ALERT, DRIFT_MIN_PREDICTIONS, PROBABILITY_SHIFT_ALERT

STORE_NAMESPACE = "aipd"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FLUSH_INTERVAL_S = 0.5


@dataclass(frozen=True)
class MetricSpec:
    kind: str  # "counter" | "histogram"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


LATENCY_BUCKETS = (0.005, 0.01, 0.015, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
METRICS: dict[str, MetricSpec] = {
    "predictions_total": MetricSpec(
        "counter",
        "Prediction requests (one per file on /predict/batch), by HTTP status, verdict and the model version that "
        "answered (none when none did)",
        ("status", "result", "version"),
    ),
    "prediction_errors_total": MetricSpec("counter", "Refused or failed requests and files, by error code", ("type",)),
    "prediction_latency_seconds": MetricSpec(
        "histogram",
        "Server-side time of a prediction request, from the ingress receiving it to answering, by route and the model "
        "version that answered (none when none did; a batch: the version of its last answer)",
        ("route", "version"),
        LATENCY_BUCKETS,
    ),
    "prediction_probability": MetricSpec(
        "histogram",
        "Predicted probability of ai_generated; a shift here is the first sign of drift",
        (),
        tuple(round(0.05 * i, 2) for i in range(1, 21)),
    ),
    "prediction_batch_size": MetricSpec(
        "histogram", "Images per forward pass of the detector", (), (1, 2, 4, 8, 16, 32, 64, 128, 256)
    ),
    "model_inference_seconds": MetricSpec("histogram", "Detector forward pass time per batch", (), LATENCY_BUCKETS),
    "model_scores_total": MetricSpec(
        "counter",
        "Photos each model version scored (a shadow challenger's too), by verdict; error when its forward pass failed",
        ("version", "verdict"),
    ),
    "model_latency_seconds": MetricSpec(
        "histogram", "Forward time of the batch that scored a photo, by model version", ("version",), LATENCY_BUCKETS
    ),
    "shadow_comparisons_total": MetricSpec(
        "counter",
        "Photos a shadow challenger scored beside the champion, by whether their verdicts agreed",
        ("version", "agree"),
    ),
    "cache_lookups_total": MetricSpec(
        "counter", "Answer cache lookups of the prediction routes: hit, miss (Redis down counts as one)", ("result",)
    ),
    "model_loads_total": MetricSpec(
        "counter", "Model loads by the detector, by version and result", ("version", "result")
    ),
    "aidetect_predictions_total": MetricSpec(
        "counter",
        "Predictions under the original service's name and labels: status success|error, verdict and confidence "
        "(none on errors)",
        ("status", "prediction", "confidence"),
    ),
}
# The same series again under the original service's names.
ORIGINAL_NAMES = {
    "prediction_latency_seconds": "aidetect_prediction_latency_seconds",
    "prediction_probability": "aidetect_prediction_probability",
}
# Read when /metrics is scraped, not stored: a stored gauge would outlive the replica that set it.
GAUGES = {
    "aidetect_model_loaded": "1 when a detector replica answered with a loaded model at this scrape, else 0",
}

# key: (metric name, label values); counters hold a float, histograms [per-bucket counts..., +Inf count, sum]
Delta = dict[tuple[str, tuple[str, ...]], Any]


def _labels(name: str, labels: dict[str, str] | None) -> tuple[str, ...]:
    spec = METRICS[name]
    labels = labels or {}
    if set(labels) != set(spec.labels):
        raise ValueError(f"metric {name} takes labels {spec.labels}, got {tuple(labels)}")
    return tuple(str(labels[label]) for label in spec.labels)


def add_counter(delta: Delta, name: str, value: float, labels: dict[str, str] | None = None) -> None:
    key = (name, _labels(name, labels))
    delta[key] = delta.get(key, 0.0) + value


def add_observation(delta: Delta, name: str, value: float, labels: dict[str, str] | None = None) -> None:
    spec = METRICS[name]
    key = (name, _labels(name, labels))
    row = delta.get(key)
    if row is None:
        row = delta[key] = [0] * (len(spec.buckets) + 1) + [0.0]
    index = next((i for i, bound in enumerate(spec.buckets) if value <= bound), len(spec.buckets))
    row[index] += 1
    row[-1] += float(value)


def merge_into(total: Delta, delta: Delta) -> None:
    for key, value in delta.items():
        if METRICS[key[0]].kind == "counter":
            total[key] = total.get(key, 0.0) + value
        else:
            row = total.get(key)
            if row is None:
                total[key] = list(value)
            else:
                for i, item in enumerate(value):
                    row[i] += item


class MetricsState:
    """The application's totals, and whether it is stopping; the body of the `MetricsStore` actor, usable without
    Ray. Every replica hears the draining flag at its next flush, which is how a stopping `aipd serve` tells all of
    them at once (no Serve handle reaches every replica of a deployment); the ingress replicas report the requests
    they are answering, so the stop can wait for them."""

    def __init__(self) -> None:
        self.totals: Delta = {}
        self.draining = False
        self._in_flight: dict[str, int] = {}

    def merge(self, delta: Delta, replica: str | None = None, in_flight: int | None = None) -> bool:
        """Add a replica's delta (and its requests in flight); whether the application is draining."""
        merge_into(self.totals, delta)
        if replica is not None and in_flight is not None:
            self._in_flight[replica] = in_flight
        return self.draining

    def drain(self) -> None:
        self.draining = True

    def in_flight(self) -> int:
        """Requests the ingress replicas were answering at their last flush."""
        return sum(self._in_flight.values())

    def read(self, names: tuple[str, ...]) -> Delta:
        return {key: value for key, value in self.totals.items() if key[0] in names}

    def render(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self.totals))
        return generate_latest(registry)


class _Collector:
    def __init__(self, totals: Delta) -> None:
        self.totals = totals

    def collect(self) -> Iterable[Any]:
        for name, spec in METRICS.items():
            rows = [(labels, value) for (metric, labels), value in sorted(self.totals.items()) if metric == name]
            yield _family(name, spec, rows)
            if name in ORIGINAL_NAMES:
                yield _family(ORIGINAL_NAMES[name], spec, rows)


class _Gauges:
    def __init__(self, values: dict[str, float]) -> None:
        self.values = values

    def collect(self) -> Iterable[Any]:
        for name, value in sorted(self.values.items()):
            yield GaugeMetricFamily(name, GAUGES[name], value=value)


def render_gauges(values: dict[str, float]) -> bytes:
    """Scrape-time gauges in the text format, rendered by the replica (the store's actor keeps only totals)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gauges(values))
    return generate_latest(registry)


def _family(name: str, spec: MetricSpec, rows: list[tuple[tuple[str, ...], Any]]) -> Any:
    if spec.kind == "counter":
        family = CounterMetricFamily(name.removesuffix("_total"), spec.help, labels=list(spec.labels))
        for labels, value in rows:
            family.add_metric(list(labels), value)
        return family
    family = HistogramMetricFamily(name, spec.help, labels=list(spec.labels))
    for labels, row in rows:
        cumulative, buckets = 0, []
        for bound, count in zip(list(spec.buckets) + [float("inf")], row[:-1], strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        family.add_metric(list(labels), buckets, sum_value=row[-1])
    return family


def store_name(app_name: str) -> str:
    return f"aipd-metrics-{app_name}"


def get_store(app_name: str) -> Any:
    """The application's metrics actor, created by whichever replica asks first."""
    import ray

    actor_cls = ray.remote(num_cpus=0, max_restarts=-1)(MetricsState)
    return actor_cls.options(
        name=store_name(app_name), namespace=STORE_NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


def drop_store(app_name: str) -> None:
    """Forget an application's totals (after `serve.delete`), so a redeploy under the same name starts from zero."""
    import ray

    with contextlib.suppress(ValueError):  # no such actor: nothing to forget
        ray.kill(ray.get_actor(store_name(app_name), namespace=STORE_NAMESPACE))


class MetricsRecorder:
    """One per replica: cheap local adds on the request path, merged into the application's store off it."""

    def __init__(
        self, app_name: str, flush_interval_s: float = FLUSH_INTERVAL_S, in_flight: Callable[[], int] | None = None
    ) -> None:
        """``in_flight`` (an ingress replica's count of the requests it is answering) makes every flush report it,
        even with nothing to add, and learn whether the application is draining."""
        from app.logging import get_logger

        self._app_name = app_name
        self._in_flight = in_flight
        self._replica = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.draining = False
        self._delta: Delta = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._store: Any = None
        self._log = get_logger("serving.metrics")
        self._stopped = threading.Event()
        self._interval = flush_interval_s
        self._thread = threading.Thread(target=self._loop, name="aipd-metrics-flush", daemon=True)
        self._thread.start()

    def inc(self, name: str, labels: dict[str, str] | None = None, value: float = 1.0) -> None:
        with self._lock:
            add_counter(self._delta, name, value, labels)

    def observe(self, name: str, value: float, labels: dict[str, str] | None = None) -> None:
        with self._lock:
            add_observation(self._delta, name, value, labels)

    def flush(self, timeout_s: float = 10.0) -> None:
        """Send what accumulated; on failure (store restarting) it is put back and sent with the next flush."""
        import ray

        with self._flush_lock:
            with self._lock:
                delta, self._delta = self._delta, {}
            if not delta and self._in_flight is None:
                return
            in_flight = None if self._in_flight is None else self._in_flight()
            try:
                self.draining = ray.get(self.store().merge.remote(delta, self._replica, in_flight), timeout=timeout_s)
            except Exception as err:  # noqa: BLE001 - metrics must never take a replica down
                self._store = None
                with self._lock:
                    merge_into(delta, self._delta)
                    self._delta = delta
                self._log.warning("metrics flush failed; will retry", error=str(err))

    def render(self, gauges: dict[str, float] | None = None, timeout_s: float = 10.0) -> bytes:
        """The application's totals, then these scrape-time gauges."""
        import ray

        self.flush(timeout_s)
        return ray.get(self.store().render.remote(), timeout=timeout_s) + render_gauges(gauges or {})

    def read(self, names: tuple[str, ...], timeout_s: float = 10.0) -> Delta:
        """The application's totals of these metrics, this replica's latest adds included."""
        import ray

        self.flush(timeout_s)
        return ray.get(self.store().read.remote(names), timeout=timeout_s)

    def store(self) -> Any:
        if self._store is None:
            self._store = get_store(self._app_name)
        return self._store

    def close(self) -> None:
        self._stopped.set()
        self.flush(timeout_s=2.0)

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval):
            self.flush()


# ------------------------------------------------------------------------------------------------------- drift
DRIFT_METRICS = ("prediction_probability", "aidetect_predictions_total")


def drift_report(totals: Delta, baseline: DriftBaseline | None, about: str) -> DriftResponse:
    """The original's DriftMetrics over every answer so far (all replicas), judged like the drift alerts judge it."""
    count, mean, std = _probability_stats(totals)
    verdicts, low = _verdict_counts(totals)
    answered = sum(verdicts.values())
    ratio = {verdict: verdicts.get(verdict, 0.0) / answered for verdict in ("real", "ai_generated")} if answered else {}
    score, alerts = None, []
    if baseline is not None and mean is not None:
        probability_shift = abs(mean - baseline.probability_mean)
        ai_share_shift = abs(ratio.get("ai_generated", 0.0) - baseline.ai_generated_ratio)
        score = max(probability_shift, ai_share_shift)
        if count >= DRIFT_MIN_PREDICTIONS and probability_shift > PROBABILITY_SHIFT_ALERT:
            alerts.append(f"Probability drift: {probability_shift:.3f}")
        if count >= DRIFT_MIN_PREDICTIONS and ai_share_shift > AI_SHARE_SHIFT_ALERT:
            alerts.append(f"Prediction ratio drift: AI {ratio.get('ai_generated', 0.0):.1%}")
    detail = about if baseline is None else f"{about}, over {count} predictions since the application started"
    if baseline is not None and count < DRIFT_MIN_PREDICTIONS:
        detail += f"; drift is judged from {DRIFT_MIN_PREDICTIONS} predictions on, like the drift alerts"
    return DriftResponse(
        timestamp=datetime.now(UTC).isoformat(),
        window_size=count,
        mean_probability=mean,
        std_probability=std,
        low_confidence_ratio=low / answered if answered else None,
        prediction_ratio=ratio,
        drift_detected=bool(alerts),
        drift_score=score,
        alerts=alerts,
        has_baseline=baseline is not None,
        baseline=baseline,
        detail=detail,
    )


def _probability_stats(totals: Delta) -> tuple[int, float | None, float | None]:
    """Count and exact mean of the probability histogram; the spread from its bucket midpoints."""
    row = totals.get(("prediction_probability", ()))
    counts = row[:-1] if row else []
    count = int(sum(counts))
    if count == 0:
        return 0, None, None
    bounds = METRICS["prediction_probability"].buckets
    mean = row[-1] / count
    lower = (0.0, *bounds[:-1])
    midpoints = [(low + high) / 2 for low, high in zip(lower, bounds, strict=True)] + [bounds[-1]]
    variance = sum(n * (m - mean) ** 2 for n, m in zip(counts, midpoints, strict=True)) / count
    return count, mean, math.sqrt(variance)


def _verdict_counts(totals: Delta) -> tuple[dict[str, float], float]:
    """Successful answers per verdict, and how many of them had low confidence."""
    verdicts: dict[str, float] = {}
    low = 0.0
    for (name, labels), value in totals.items():
        if name != "aidetect_predictions_total" or labels[0] != "success":
            continue
        _, prediction, confidence = labels
        verdicts[prediction] = verdicts.get(prediction, 0.0) + value
        low += value if confidence == "low" else 0.0
    return verdicts, low
