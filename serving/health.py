"""The one health body, of `/health` and `/readyz`: the detector's status, the application's totals, this
replica's vitals, under this service's field names and the original's."""

from __future__ import annotations

import os
import time

from app.contract import DriftResponse, DriftStatus, HealthResponse
from serving.compat import ActiveRequests, resident_memory_mb
from serving.results import DetectorStatus


def health_body(
    status: DetectorStatus | None, drift: DriftResponse | None, started: float, *, draining: bool = False
) -> HealthResponse:
    """``status`` None: no detector replica answered; ``drift`` None: the metrics store could not be read;
    ``started``: when this replica started (time.monotonic); ``draining``: the service is stopping (unhealthy
    whatever the model, so load balancers send no more requests while those in flight finish)."""
    loaded = status if status is not None and status.ready else None
    model = None if loaded is None else loaded.model
    if draining:
        state, detail = "draining", "the service is stopping; the requests it has are being answered"
    elif status is None:
        state, detail = "unavailable", "no detector replica answered"
    else:  # a loaded model serves with the registry gone: "ok", with the reason in the detail
        state, detail = ("ok" if loaded else "loading"), status.detail
    summary = None if drift is None else DriftStatus(**drift.model_dump(include=set(DriftStatus.model_fields)))
    return HealthResponse(
        status="healthy" if loaded and not draining else "unhealthy",
        state=state,
        model_loaded=loaded is not None,
        model_version=None if model is None else model.model_version,
        model_uri=None if status is None else status.model_uri,
        threshold=None if model is None else model.threshold,
        crop_size=None if model is None else model.crop_size,
        device=None if loaded is None else loaded.device,
        detail=detail,
        metrics={} if loaded is None else dict(loaded.metrics),
        model_loaded_at=None if loaded is None else loaded.model_loaded_at,
        registry=None if status is None else status.registry,
        uptime_seconds=round(time.monotonic() - started, 2),
        active_requests=ActiveRequests.count,
        predictions_total=None if drift is None else drift.window_size,  # every answer observes its probability
        drift_detected=drift is not None and drift.drift_detected,
        drift_status=summary,
        memory_usage_mb=resident_memory_mb(),
        pid=os.getpid(),
    )
