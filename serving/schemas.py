"""The HTTP contract: response bodies, the one error shape, and how a probability becomes a verdict.

Field names follow the original FastAPI service (`prediction`, `probability`, `confidence`, `inference_time_ms`,
`model_version`) so its clients keep working; everything new is an added field, never a renamed one.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

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
    failed: int
    inference_time_ms: float = Field(description="server-side time for the whole request")


class ExplainResponse(Prediction):
    heatmap_base64: str = Field(description="Grad-CAM heatmap over the model's input crop, a base64 PNG")
    heatmap_format: Literal["png"] = "png"
    crop_size: int = Field(description="side of the center crop the model saw, in pixels")


class HealthResponse(BaseModel):
    status: Literal["ok", "loading", "unavailable"]
    model_loaded: bool
    model_version: str | None = None
    model_uri: str | None = None
    threshold: float | None = None
    crop_size: int | None = None
    device: str | None = None
    detail: str | None = None


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
