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

Ray Serve's own metrics (`ray_serve_num_http_requests`, replica counts, queue lengths, per-deployment latencies) are
exported by Ray's metrics agent on every node, at the port `ray start --metrics-export-port=8080` (or
`aipd serve --ray-metrics-port 8080` for a local cluster) names: scrape that port on each node alongside `/metrics`.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

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
        "Prediction requests (one per file on /predict/batch), by HTTP status and verdict",
        ("status", "result"),
    ),
    "prediction_errors_total": MetricSpec("counter", "Refused or failed requests and files, by error code", ("type",)),
    "prediction_latency_seconds": MetricSpec(
        "histogram",
        "Server-side time of a prediction request, from the ingress receiving it to answering",
        ("route",),
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
    "model_loads_total": MetricSpec(
        "counter", "Model loads by the detector, by version and result", ("version", "result")
    ),
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
    """The application's totals; the body of the `MetricsStore` actor, usable without Ray."""

    def __init__(self) -> None:
        self.totals: Delta = {}

    def merge(self, delta: Delta) -> None:
        merge_into(self.totals, delta)

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
            if spec.kind == "counter":
                family = CounterMetricFamily(name.removesuffix("_total"), spec.help, labels=list(spec.labels))
                for labels, value in rows:
                    family.add_metric(list(labels), value)
            else:
                family = HistogramMetricFamily(name, spec.help, labels=list(spec.labels))
                for labels, row in rows:
                    cumulative, buckets = 0, []
                    for bound, count in zip(list(spec.buckets) + [float("inf")], row[:-1], strict=True):
                        cumulative += count
                        buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
                    family.add_metric(list(labels), buckets, sum_value=row[-1])
            yield family


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

    def __init__(self, app_name: str, flush_interval_s: float = FLUSH_INTERVAL_S) -> None:
        from app.logging import get_logger

        self._app_name = app_name
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
            if not delta:
                return
            try:
                ray.get(self.store().merge.remote(delta), timeout=timeout_s)
            except Exception as err:  # noqa: BLE001 - metrics must never take a replica down
                self._store = None
                with self._lock:
                    merge_into(delta, self._delta)
                    self._delta = delta
                self._log.warning("metrics flush failed; will retry", error=str(err))

    def render(self, timeout_s: float = 10.0) -> bytes:
        import ray

        self.flush(timeout_s)
        return ray.get(self.store().render.remote(), timeout=timeout_s)

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
