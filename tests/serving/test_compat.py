"""The original service's clients, replayed against this one, unchanged: what they send and what they read.

The original (github.com/nolancacheux/AI-Product-Photo-Detector) has a Streamlit page, a Locust and a k6 load test,
Kubernetes-style probes and a CD smoke test; each test here sends exactly their requests - their paths, fields,
headers and labels - and checks exactly what they read, at the root and under /v1. The service follows a registered
champion whose training run logged test metrics, so /health must show those, and it starts before any model exists,
so the probes are seen both ways.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers import ServeApp, jpeg, make_checkpoint, metric_value, undeploy, wait_until, with_serve

pytestmark = pytest.mark.slow

APP = "compat"
KEY = "test-key"  # what the original's Locust and k6 tests send
PREFIXES = ["", "/v1"]
PROBES = ("/healthz", "/readyz", "/startup")
RUN_METRICS = {"test_auroc": 0.912, "test_accuracy": 0.874, "test_ece": 0.031}
VERSION_TAGS = {"val_auroc": 0.934, "test_auroc": 0.912}
DRIFT_KEYS = {
    "timestamp",
    "window_size",
    "mean_probability",
    "std_probability",
    "low_confidence_ratio",
    "prediction_ratio",
    "drift_detected",
    "drift_score",
    "alerts",
}


@dataclass
class Compat:
    app: ServeApp
    version: str
    before: dict[str, httpx.Response]  # the probes' answers while no model existed yet


def publish(settings, root: Path) -> str:
    """A registered version whose training run logged test metrics, made champion: what `aipd train` leaves."""
    import mlflow

    from app.registry import log_detector, set_alias, setup_mlflow

    experiment = setup_mlflow(settings)
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_metrics({**RUN_METRICS, "train_loss": 0.21})
    checkpoint = make_checkpoint(root / "tiny-ckpt", seed=6)
    version = log_detector(settings, checkpoint, run_id=run.info.run_id, tags={**VERSION_TAGS, "seed": 6}).version
    set_alias(settings, version)
    return version


@pytest.fixture(scope="module")
def service(deploy, tmp_path_factory: pytest.TempPathFactory) -> Compat:
    from app.config import Settings
    from serving.config import AppArgs

    root = tmp_path_factory.mktemp("compat")
    settings = Settings(
        work_dir=root / "work",
        api_keys=[KEY],
        serve={
            "max_batch_files": 10,
            "ingress_min_replicas": 1,
            "ingress_max_replicas": 1,
            "detector_min_replicas": 1,
            "detector_max_replicas": 1,
        },
    )
    app = deploy(APP, with_serve(settings, champion_poll_s=0.5), AppArgs(autoscaling={}))
    before = {prefix + path: app.http.get(prefix + path) for prefix in PREFIXES for path in PROBES}
    version = publish(settings, root)
    wait_until(lambda: app.http.get("/health").status_code == 200, 60, what="the champion to load")
    yield Compat(app, version, before)
    undeploy(APP)


def blue_jpeg() -> bytes:
    """The Locust user's image: a 224x224 solid blue JPEG made with PIL."""
    buffer = io.BytesIO()
    Image.new("RGB", (224, 224), (0, 0, 255)).save(buffer, "JPEG")
    return buffer.getvalue()


def encoded(fmt: str, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("prefix", PREFIXES)
def test_kubernetes_probes_before_and_after_a_model_loads(service: Compat, prefix: str) -> None:
    alive = service.before[prefix + "/healthz"]
    assert alive.status_code == 200 and alive.json()["alive"] is True
    for probe in ("/readyz", "/startup"):
        waiting = service.before[prefix + probe]
        assert waiting.status_code == 503 and int(waiting.headers["Retry-After"]) > 0, waiting.text
    assert service.before[prefix + "/readyz"].json()["status"] == "unhealthy"
    assert service.before[prefix + "/startup"].json()["error"] == "not_ready"

    http = service.app.http
    assert http.get(prefix + "/healthz").json()["alive"] is True
    ready = http.get(prefix + "/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "healthy" and ready.json()["model_loaded"] is True
    started = http.get(prefix + "/startup")
    assert started.status_code == 200 and started.json()["alive"] is True


@pytest.mark.parametrize("prefix", PREFIXES)
def test_locust_user_tasks_never_fail(service: Compat, prefix: str) -> None:
    """locustfile.py: weights 1 health, 5 predict (X-API-Key), 1 metrics; Locust fails any status from 400 on."""
    image = blue_jpeg()
    http = service.app.http
    for _ in range(2):
        assert http.get(prefix + "/health").status_code < 400
        for _ in range(5):
            answer = http.post(
                prefix + "/predict", headers={"X-API-Key": KEY}, files={"file": ("test.jpg", image, "image/jpeg")}
            )
            assert answer.status_code < 400, answer.text
        assert http.get(prefix + "/metrics").status_code < 400


@pytest.mark.parametrize("prefix", PREFIXES)
def test_k6_checks_pass(service: Compat, prefix: str) -> None:
    http = service.app.http
    health = http.get(prefix + "/health")
    assert health.status_code == 200 and health.json()["status"] is not None
    answer = http.post(
        prefix + "/predict", headers={"X-API-Key": KEY}, files={"file": ("test.jpg", jpeg(seed=8), "image/jpeg")}
    )
    assert answer.status_code == 200 and answer.json()["prediction"] is not None
    metrics = http.get(prefix + "/metrics")
    assert metrics.status_code == 200 and "aidetect_" in metrics.text
    # the names the original's dashboards query
    assert metric_value(metrics.text, "aidetect_model_loaded") == 1
    assert metric_value(metrics.text, "aidetect_predictions_total", status="success") >= 1
    assert metric_value(metrics.text, "aidetect_prediction_latency_seconds_count") >= 1
    assert metric_value(metrics.text, "aidetect_prediction_probability_count") >= 1


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_streamlit_page_works_unchanged(service: Compat, prefix: str) -> None:
    """src/ui/app.py: health first, then uploads always labelled image/jpeg, whatever the format."""
    http = service.app.http
    health = http.get(prefix + "/health", timeout=5)
    assert health.status_code == 200 and health.json()["status"] == "healthy"
    assert health.json()["model_version"] == service.version

    headers = {"X-API-Key": KEY}
    for name, data in (("shelf.png", encoded("PNG", 1)), ("mug.webp", encoded("WEBP", 2))):
        result = http.post(prefix + "/predict", headers=headers, files={"file": (name, data, "image/jpeg")}, timeout=30)
        assert result.status_code == 200, result.text
        body = result.json()
        assert body["prediction"] in ("ai_generated", "real") and 0.0 <= body["probability"] <= 1.0
        assert f"{body['inference_time_ms']:.0f}".isdigit()

        explained = http.post(prefix + "/predict/explain", headers=headers, files={"file": (name, data, "image/jpeg")})
        assert explained.status_code == 200, explained.text
        heatmap = explained.json()["heatmap_base64"]
        assert not heatmap.startswith("data:")
        Image.open(io.BytesIO(base64.b64decode(heatmap, validate=True))).verify()  # what st.image(bytes) shows

    refused = http.post(prefix + "/predict", headers=headers, files={"file": ("notes.jpg", b"hello", "image/jpeg")})
    assert refused.status_code == 400
    shown = refused.json().get("detail", refused.text)
    assert isinstance(shown, str) and "not an image" in shown


@pytest.mark.parametrize("prefix", PREFIXES)
def test_the_original_routes_and_fields_are_there(service: Compat, prefix: str) -> None:
    http = service.app.http
    info = http.get(prefix + "/").json()
    assert info["name"] == "AI Product Photo Detector" and info["version"] == "1.0.0"
    assert {"docs", "health", "healthz", "metrics", "drift", "privacy"} <= set(info)
    privacy = http.get(prefix + "/privacy").json()
    assert privacy["data_retention"] == "none"
    assert {"image_storage", "logging", "metrics", "tracking", "gdpr", "details"} <= set(privacy)
    assert all(isinstance(value, str) and value for value in privacy.values())

    files = [
        ("files", ("a.jpg", jpeg(seed=1), "image/jpeg")),
        ("files", ("b.txt", b"not a photo", "text/plain")),
        ("files", ("c.png", encoded("PNG", 3), "image/png")),
    ]
    batch = http.post(prefix + "/predict/batch", headers={"X-API-Key": KEY}, files=files)
    assert batch.status_code == 200, batch.text
    body = batch.json()
    assert (body["total"], body["successful"], body["succeeded"], body["failed"]) == (3, 2, 2, 1)
    assert body["total_inference_time_ms"] >= 0 and body["model_version"] == service.version
    for item in body["results"]:
        assert {"filename", "prediction", "probability", "confidence", "error"} <= set(item)
    bad = body["results"][1]
    assert bad["filename"] == "b.txt" and bad["error"] and bad["prediction"] is bad["probability"] is None

    health = http.get(prefix + "/health").json()
    assert health["uptime_seconds"] >= 0 and health["active_requests"] >= 1 and health["pid"] > 0
    assert health["predictions_total"] >= 2 and health["memory_usage_mb"] > 0 and health["drift_detected"] is False
    assert set(health["drift_status"]) >= {"window_size", "mean_probability", "drift_detected", "has_baseline"}

    drift = http.get(prefix + "/drift").json()
    assert set(drift) >= DRIFT_KEYS
    assert drift["window_size"] >= 2 and 0.0 <= drift["mean_probability"] <= 1.0
    assert sum(drift["prediction_ratio"].values()) == pytest.approx(1.0)
    assert drift["has_baseline"] is True and drift["drift_detected"] is False and drift["alerts"] == []


def test_health_and_the_ui_panel_show_the_registry_metrics(service: Compat) -> None:
    from app.client import ApiClient

    expected = {**RUN_METRICS, **VERSION_TAGS}
    assert service.app.http.get("/health").json()["metrics"] == pytest.approx(expected)
    assert ApiClient(service.app.url).health().metrics == pytest.approx(expected)


def test_the_cd_smoke_test_passes(service: Compat) -> None:
    http = service.app.http
    assert http.get("/health").status_code == 200
    assert http.get("/docs").status_code == 200
    assert http.post("/predict").status_code < 500
    redirect = http.get("/v1", follow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["location"].endswith("/v1/")


# ----------------------------------------------------------------------------------------------------- drift
def _answers(*groups: tuple[float, int]) -> dict:
    """Application totals after these answers (probability, how many), recorded the way the ingress records them."""
    from app.contract import confidence_of, verdict_of
    from serving.metrics import add_counter, add_observation

    totals: dict = {}
    for probability, n in groups:
        labels = {
            "status": "success",
            "prediction": verdict_of(probability, 0.5),
            "confidence": confidence_of(probability, 0.5),
        }
        for _ in range(n):
            add_observation(totals, "prediction_probability", probability)
            add_counter(totals, "aidetect_predictions_total", 1.0, labels)
    return totals


def test_drift_without_a_baseline_is_not_judged(tmp_path: Path) -> None:
    from app.drift import read_baseline
    from serving.metrics import drift_report

    baseline, about = read_baseline(tmp_path / "absent.rules.yml")
    report = drift_report(_answers((0.9, 300)), baseline, about)
    assert baseline is None and report.has_baseline is False and report.baseline is None
    assert report.drift_detected is False and report.drift_score is None and report.alerts == []
    assert "no drift baseline is configured" in report.detail and "cluster.monitoring.baseline" in report.detail
    assert report.window_size == 300 and report.mean_probability == pytest.approx(0.9)


def test_drift_against_the_alerts_baseline(tmp_path: Path) -> None:
    from app.drift import read_baseline
    from cluster.monitoring.baseline import Baseline, rules_text
    from serving.metrics import drift_report

    rules = tmp_path / "aipd-baseline.rules.yml"
    rules.write_text(rules_text(Baseline(0.5, 0.5, 0.02, 400, 0.5, "evaluation.json")))
    baseline, about = read_baseline(rules)
    assert baseline is not None and (baseline.probability_mean, baseline.ai_generated_ratio) == (0.5, 0.5)

    shifted = drift_report(_answers((0.9, 300)), baseline, about)
    assert shifted.drift_detected and shifted.drift_score == pytest.approx(0.5)
    assert shifted.alerts == ["Probability drift: 0.400", "Prediction ratio drift: AI 100.0%"]
    assert shifted.prediction_ratio == {"real": 0.0, "ai_generated": 1.0} and shifted.low_confidence_ratio == 0.0

    early = drift_report(_answers((0.9, 50)), baseline, about)
    assert not early.drift_detected and early.drift_score == pytest.approx(0.5) and "from 200" in early.detail

    calm = drift_report(_answers((0.1, 150), (0.55, 50), (0.9, 150)), baseline, about)
    assert not calm.drift_detected and calm.alerts == [] and calm.drift_score < 0.15
    assert calm.low_confidence_ratio == pytest.approx(50 / 350)
    assert calm.std_probability == pytest.approx(0.3707, abs=0.005), "bucket midpoints estimate the spread closely"


def test_a_checkpoint_directory_reports_the_numbers_in_its_config() -> None:
    from app.model_ref import parse_model_ref
    from serving.runtime import evaluation_metrics

    recorded = {"val_auroc": 0.91, "val_loss": 0.3, "epoch": 4, "note": "best", "diverged": float("nan")}
    metrics = evaluation_metrics(parse_model_ref("/models/ckpt"), "local:ckpt", recorded)
    assert metrics == {"val_auroc": 0.91, "val_loss": 0.3, "epoch": 4.0}
