"""What the detector answers the ingress: typed results instead of dicts with string error codes.

They cross the call between deployments (pickled over gRPC) in the split layout and stay in the process in the
colocated one. A `Refused` is not an exception on purpose: the batch that produced it answered the other crops, and
the ingress turns each refusal into its HTTP status in one place (`serving/ingress.py::refusal_error`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from app.rollout import Ended, Rollout

RefusalKind = Literal["not_ready", "explain_unsupported", "inference_failed", "bad_image"]


@dataclass(frozen=True)
class ModelFacts:
    """Which model answered, and how it decides: in every answer, so a switch of champion shows per request."""

    model_version: str
    threshold: float
    crop_size: int


@dataclass(frozen=True)
class Scored:
    """One crop's probability of ai_generated, with where the time went (for `Server-Timing`)."""

    probability: float
    model: ModelFacts
    batch_size: int = 1
    forward_ms: float = 0.0
    queue_ms: float = 0.0
    decode_ms: float = 0.0  # decoding and cropping in the detector's batch (photos sent as bytes), else 0
    source_scores: dict[str, float] | None = None  # per generator family (and "none"), when the model has the head


@dataclass(frozen=True)
class Explained:
    """One crop's probability and its Grad-CAM heatmap (PNG bytes)."""

    probability: float
    heatmap_png: bytes
    model: ModelFacts
    source_scores: dict[str, float] | None = None


@dataclass(frozen=True)
class Refused:
    """The detector could not answer this photo: it has no model yet, Grad-CAM does not fit the model, the forward
    pass failed, or a photo sent as bytes did not decode (`reason`: `app.images.REASONS`)."""

    kind: RefusalKind
    detail: str
    reason: str | None = None


@dataclass(frozen=True)
class DetectorStatus:
    """Readiness and the loaded model, with its evaluation metrics (read when it was loaded) for `/health`."""

    ready: bool
    detail: str | None = None
    model_uri: str | None = None
    registry: Literal["reachable", "unreachable"] | None = None
    model: ModelFacts | None = None
    device: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    model_loaded_at: str | None = None  # ISO-8601 UTC
    rollout: Rollout | None = None  # the trial this replica runs, if any
    challenger: ModelFacts | None = None
    rollout_ended: Ended | None = None  # how the last trial ended
