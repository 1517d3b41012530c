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

from pydantic import BaseModel, ConfigDict, Field

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


C2paState = Literal["absent", "valid", "invalid", "unreadable", "remote", "too_large", "timeout", "unavailable"]


class C2paEvidence(BaseModel):
    """What the C2PA manifest says and whether it still holds for these bytes.

    `valid` is the manifest's integrity (its claim signature verifies and its hashes match the file), not whether the
    signer is known: c2pa reports an unknown signing certificate as `signingCredential.untrusted` (kept in `errors`)
    yet still calls the manifest valid, and a service without a curated trust list would otherwise call every
    honest manifest invalid. Whether the signer chains to a trust anchor is `trusted`, kept apart on purpose.
    """

    model_config = ConfigDict(frozen=True)

    present: bool = Field(False, description="A manifest store is in the file (or referenced by it, state 'remote').")
    state: C2paState = "absent"
    valid: bool | None = Field(None, description="Signature and hash binding verify; None when not checked.")
    trusted: bool | None = Field(None, description="The signer chains to a configured trust anchor; None when unknown.")
    claim_generator: str | None = None
    actions: list[str] = Field(default_factory=list, description="The active manifest's actions, e.g. c2pa.created.")
    digital_source_type: str | None = Field(
        None, description="IPTC term of the creating action, e.g. trainedAlgorithmicMedia."
    )
    signer: str | None = Field(None, description="The signing certificate's organization (or common name).")
    errors: list[str] = Field(
        default_factory=list, description="c2pa's failure codes, e.g. assertion.dataHash.mismatch."
    )
    error: str | None = Field(None, description="Why the manifest could not be read, when it could not.")


class UnsignedMetadata(BaseModel):
    """What the file's unsigned metadata claims. Anyone can write it, so it is reported, never trusted alone."""

    model_config = ConfigDict(frozen=True)

    signed: Literal[False] = False
    digital_source_type: str | None = Field(None, description="XMP Iptc4xmpExt:DigitalSourceType, last path segment.")
    make: str | None = None
    model: str | None = None
    software: str | None = Field(None, description="EXIF Software, else XMP CreatorTool.")


class Provenance(BaseModel):
    """Provenance evidence for one photo, ready to be put into an HTTP JSON answer as it is."""

    model_config = ConfigDict(frozen=True)

    media_type: str | None = Field(None, description="image/jpeg, image/png or image/webp by magic bytes; else None.")
    c2pa: C2paEvidence = Field(default_factory=C2paEvidence)
    metadata: UnsignedMetadata = Field(default_factory=UnsignedMetadata)
    ai_declared: bool = Field(
        False,
        description="A manifest whose integrity verifies declares generative media. Trust in the signer is not "
        "required: nobody forges a signed confession that their own photo is synthetic.",
    )
    ai_hinted_unsigned: bool = Field(
        False,
        description="Only unverified evidence (unsigned metadata, or a manifest that fails or was not verified) "
        "says generative media; a hint for a human, never a verdict.",
    )


class Prediction(BaseModel):
    prediction: Verdict
    probability: float = Field(ge=0.0, le=1.0, description="probability that the photo is AI-generated")
    confidence: Confidence
    inference_time_ms: float = Field(description="server-side time for this image: decode, queueing, batched forward")
    model_version: str = Field(description="model registry version (or local:<dir> for a checkpoint path)")
    threshold: float = Field(description="the model's decision threshold on probability")
    cached: bool = Field(False, description="answered from the cache of this exact file and model version")
    source_scores: dict[str, float] | None = Field(
        None,
        description="probability of each generator family the model knows, and of none (a camera); null for a model "
        "trained without generator labels",
    )
    provenance: Provenance | None = Field(
        None, description="what the file's C2PA manifest and unsigned metadata say, beside the pixels' verdict"
    )


class BatchItem(BaseModel):
    """One file of a batch: either the prediction fields or `error` + `detail`, never both."""

    filename: str | None = None
    prediction: Verdict | None = None
    probability: float | None = None
    confidence: Confidence | None = None
    inference_time_ms: float | None = None
    model_version: str | None = None
    threshold: float | None = None
    cached: bool | None = None
    source_scores: dict[str, float] | None = None
    provenance: Provenance | None = None
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
    state: Literal["ok", "loading", "unavailable", "draining"] = Field(
        description="why unhealthy: loading, no detector, or the service is stopping"
    )
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


class VersionFigures(BaseModel):
    """One model version's photos since the application started (all replicas)."""

    requests: int
    errors: int
    error_rate: float
    ai_share: float | None
    p50_ms: float | None = Field(description="upper bound of the forward-time bucket that holds the median")
    p99_ms: float | None
    compared: int = Field(0, description="photos it scored as a shadow beside the champion")
    agreement: float | None = Field(None, description="share of those whose verdict matched the champion's")


class RolloutState(BaseModel):
    version: str
    mode: Literal["canary", "shadow"]
    percent: float
    started_at: float = Field(description="Unix time")
    started_by: str


class RolloutEnded(BaseModel):
    version: str
    outcome: Literal["promoted", "aborted", "rolled_back"]
    reason: str
    at: float = Field(description="Unix time")


class Retraining(BaseModel):
    job: str = Field(description="the Ray job's submission id (Ray dashboard, Jobs)")
    state: str = Field(description="PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED, or unknown")
    reason: str
    submitted_at: float = Field(description="Unix time")


class RolloutResponse(BaseModel):
    """A challenger beside the champion: what is on trial, how each version does, how the last trial ended, and the
    last retraining a drift alert started."""

    champion: str | None
    rollout: RolloutState | None
    last_ended: RolloutEnded | None
    versions: dict[str, VersionFigures]
    retraining: Retraining | None = None


class WebhookAlert(BaseModel):
    """One alert of an Alertmanager notification; fields this service does not read are kept, not refused."""

    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"] = "firing"
    labels: dict[str, str] = Field(default_factory=dict, description="alertname names the alert")


class AlertmanagerWebhook(BaseModel):
    """The body Alertmanager's webhook receiver posts (its version 4 payload)."""

    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"] = "firing"
    alerts: list[WebhookAlert] = Field(default_factory=list)


class AlertsResponse(BaseModel):
    """What the service did with an Alertmanager notification."""

    accepted: bool = Field(description="a retraining job was submitted")
    job: str | None = None
    detail: str


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
    rollout: str = "/rollout"
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
