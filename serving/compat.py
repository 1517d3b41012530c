"""What the FastAPI service this one replaces answered, so that its clients (its Streamlit page, Locust and k6 tests,
probes) work unchanged: its privacy statement, its count of requests in flight, its resident memory and its
`aidetect_*` counters. The routes themselves, and their `/v1` twins, are the ingress's (serving/ingress.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from app.contract import PrivacyResponse

PRIVACY = PrivacyResponse(
    data_retention="none",
    image_storage=(
        "Uploads are decoded and scored in memory and never written to disk; only the center crop the model sees "
        "goes on to the detector (through Ray's object store when it runs in another process) and is dropped once "
        "answered."
    ),
    logging=(
        "Ray Serve's request log has the method, route, status and latency of each request; server-side failures "
        "log their error code. No image, file name or API key is logged."
    ),
    metrics=(
        "Prometheus counters and histograms over all requests (verdicts, probabilities, latencies, error codes): "
        "no per-request record, no client identity."
    ),
    tracking="none: no cookies, no analytics, no calls to third parties",
    gdpr=(
        "No upload or personal data is kept after its answer, so there is nothing to access or erase. The rate "
        "limiter counts requests per API key (or client address when keys are off) in each ingress replica's "
        "memory only."
    ),
    details="Each answer is computed from the upload and returned; /docs describes what every route takes.",
)


class ActiveRequests:
    """Pure ASGI middleware counting the HTTP requests this replica is answering (the original's active_requests)."""

    count = 0

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ActiveRequests.count += 1
        try:
            await self.app(scope, receive, send)
        finally:
            ActiveRequests.count -= 1


def active_requests() -> int:
    return ActiveRequests.count


def resident_memory_mb() -> float | None:
    """This process's resident memory (VmRSS), as the original's health reported it; None where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 2)
    except (OSError, ValueError, IndexError):
        return None
    return None


def count_answer(metrics: Any, prediction: str, confidence: str) -> None:
    """One answered photo under the original's counter and labels."""
    metrics.inc("aidetect_predictions_total", {"status": "success", "prediction": prediction, "confidence": confidence})


def count_refusal(metrics: Any) -> None:
    metrics.inc("aidetect_predictions_total", {"status": "error", "prediction": "none", "confidence": "none"})
