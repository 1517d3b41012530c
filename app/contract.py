"""The HTTP contract, one owner for every floor: response bodies, the one error shape, the header names, and how a
probability becomes a verdict.

Serving answers with these models, the one client (`app.client`) and the UI read them, and the tests' contract server
builds its answers from them. Field names follow the original FastAPI service (`prediction`, `probability`,
`confidence`, `inference_time_ms`, `model_version`) so its clients keep working; everything new is an added field,
never a renamed one. The one value that changed is `/health`'s `status`: the original's `healthy`/`unhealthy`, with
this service's finer `ok`/`loading`/`unavailable` kept in `state`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

API_VERSION = "1.0.0"
API_KEY_HEADER = "X-API-Key"  # HTTP header names compare case-insensitively
RETRY_AFTER_HEADER = "Retry-After"

Verdict = Literal["real", "ai_generated"]
Confidence = Literal["low", "medium", "high"]


class ApiError(Exception):
    """Any refusal the API answers with: a status, a stable machine-readable `error` and a human `detail`."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


class ErrorResponse(BaseModel):
    error: str = Field(description="stable machine-readable code, e.g. not_an_image, too_large, rate_limited")
    detail: str = Field(description="what went wrong and what to do about it")


class Prediction(BaseModel):
    prediction: Verdict
    probability: float = Field(ge=0.0, le=1.0, description="probability that the photo is AI-generated")
    confidence: Confidence
    inference_time_ms: float = Field(description="server-side time for this image: decode, queueing, batched forward")
    model_version: str = Field(description="model registry version (or local:<dir> for a checkpoint path)")
    threshold: float = Field(description="the model's decision threshold on probability")


class BatchItem(BaseModel):
    """One file of a batch: either the prediction fields or `error` + `detail`, never both."""

    filename: str | None = None
    prediction: Verdict | None = None
    probability: float | None = None
    confidence: Confidence | None = None
    inference_time_ms: float | None = None
    model_version: str | None = None
    threshold: float | None = None
    error: str | None = None
    detail: str | None = None


class BatchResponse(BaseModel):
    results: list[BatchItem]
    total: int
    succeeded: int
    successful: int = Field(description="the same number as `succeeded`, under the original service's name")
    failed: int
    inference_time_ms: float = Field(description="server-side time for the whole request")
    total_inference_time_ms: float = Field(description="the same number as `inference_time_ms` (original's name)")
    model_version: str | None = Field(description="version that answered the files; null when none was answered")


class ExplainResponse(Prediction):
    heatmap_base64: str = Field(description="Grad-CAM heatmap over the model's input crop, a base64 PNG")
    heatmap_format: Literal["png"] = "png"
    crop_size: int = Field(description="side of the center crop the model saw, in pixels")


class DriftStatus(BaseModel):
    """The drift summary that `/health` carries (the original's `drift_status`); `/drift` has the whole report."""

    window_size: int
    mean_probability: float | None
    low_confidence_ratio: float | None
    drift_detected: bool
    drift_score: float | None
    has_baseline: bool


class HealthResponse(BaseModel):
    """Readiness, for probes (the status code) and people (the fields); `/health` and `/readyz` answer it."""

    status: Literal["healthy", "unhealthy"] = Field(description="the original service's readiness values")
    state: Literal["ok", "loading", "unavailable"] = Field(description="why unhealthy: loading, or no detector")
    model_loaded: bool
    model_version: str | None = None
    model_uri: str | None = None
    threshold: float | None = None
    crop_size: int | None = None
    device: str | None = None
    detail: str | None = None
    metrics: dict[str, float] = Field(
        default_factory=dict, description="the model's evaluation metrics from the registry or its checkpoint"
    )
    model_loaded_at: str | None = Field(
        None,
        description="ISO-8601 UTC time at which the active model started answering; null before a model is loaded",
        json_schema_extra={"format": "date-time"},
    )
    registry: Literal["reachable", "unreachable"] | None = Field(
        None,
        description="whether the model registry the service follows (an alias model URI) answered at its last look; "
        "null when it follows none. Unreachable leaves a loaded model serving (200), with the reason in `detail`",
    )
    uptime_seconds: float = Field(ge=0, description="since this ingress replica started")
    active_requests: int = Field(ge=0, description="HTTP requests in flight in this ingress replica, this one too")
    predictions_total: int | None = Field(
        description="answered predictions of the whole application; null while the metrics store is unreachable"
    )
    drift_detected: bool
    drift_status: DriftStatus | None = Field(description="null while the metrics store is unreachable")
    memory_usage_mb: float | None = Field(description="resident memory of this ingress replica (Linux only)")
    pid: int = Field(description="process id of this ingress replica")


class LivenessResponse(BaseModel):
    status: Literal["alive"] = "alive"
    alive: bool = True


class DriftBaseline(BaseModel):
    probability_mean: float = Field(description="mean predicted probability on the champion's test split")
    ai_generated_ratio: float = Field(description="share flagged ai_generated on the champion's test split")
    source: str = Field(description="the Prometheus rules file the drift alerts read it from too")


class DriftResponse(BaseModel):
    """The original's DriftMetrics over every prediction since the application started, against the training
    baseline of the drift alerts; without a baseline, nothing is compared and `detail` says why."""

    timestamp: str
    window_size: int = Field(description="predictions scored since the application started, all replicas")
    mean_probability: float | None = Field(description="null before the first prediction")
    std_probability: float | None = Field(description="estimated from the probability histogram's 0.05 buckets")
    low_confidence_ratio: float | None = Field(description="share of answers with confidence `low`")
    prediction_ratio: dict[str, float] = Field(description="share of each verdict; empty before the first answer")
    drift_detected: bool
    drift_score: float | None = Field(description="largest shift from the baseline; null without a baseline")
    alerts: list[str]
    has_baseline: bool
    baseline: DriftBaseline | None
    detail: str = Field(description="what was compared with what, or why nothing was")


class ServiceInfo(BaseModel):
    name: str = "AI Product Photo Detector"
    version: str = API_VERSION
    docs: str = "/docs"
    openapi: str = "/openapi.json"
    health: str = "/health"
    healthz: str = "/healthz"
    readyz: str = "/readyz"
    startup: str = "/startup"
    metrics: str = "/metrics"
    drift: str = "/drift"
    privacy: str = "/privacy"


class PrivacyResponse(BaseModel):
    data_retention: str
    image_storage: str
    logging: str
    metrics: str
    tracking: str
    gdpr: str
    details: str


def confidence_of(probability: float, threshold: float) -> Confidence:
    """How far the probability sits from the threshold, as a share of the room on its side.

    With threshold t, p = 1.0 and p = 0.0 are both fully certain and p = t is a coin toss; scaling by the room on
    each side keeps that true for thresholds far from 0.5 (a low-FPR threshold is often 0.9 or more).
    """
    if probability >= threshold:
        room = 1.0 - threshold
        certainty = (probability - threshold) / room if room > 0 else 1.0
    else:
        certainty = (threshold - probability) / threshold if threshold > 0 else 1.0
    if certainty >= 0.6:
        return "high"
    if certainty >= 0.3:
        return "medium"
    return "low"


def verdict_of(probability: float, threshold: float) -> Verdict:
    return "ai_generated" if probability >= threshold else "real"


def prediction_of(probability: float, threshold: float, model_version: str, inference_time_ms: float) -> Prediction:
    """The answer for one photo, from the model's probability and its threshold."""
    return Prediction(
        prediction=verdict_of(probability, threshold),
        probability=round(probability, 6),
        confidence=confidence_of(probability, threshold),
        inference_time_ms=round(inference_time_ms, 3),
        model_version=str(model_version),
        threshold=threshold,
    )


def batch_of(items: list[BatchItem], elapsed_ms: float) -> BatchResponse:
    """The answer for a batch: its items in order, the counts under both names, the version that answered last."""
    succeeded = sum(1 for item in items if item.error is None)
    versions = [item.model_version for item in items if item.model_version is not None]
    elapsed_ms = round(elapsed_ms, 3)
    return BatchResponse(
        results=items,
        total=len(items),
        succeeded=succeeded,
        successful=succeeded,
        failed=len(items) - succeeded,
        inference_time_ms=elapsed_ms,
        total_inference_time_ms=elapsed_ms,
        model_version=versions[-1] if versions else None,
    )
