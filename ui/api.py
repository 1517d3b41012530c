"""The UI's only door to the detector: the public HTTP API, with failures turned into messages a person can act on.

Two kinds of failure are kept apart. A refusal that concerns one file (not an image, too large, unsupported type)
becomes a `FileResult` carrying the API's own `error` and `detail`, so one bad photo never hides the verdicts of the
others. A failure of the whole request (the service is down, the key is wrong, rate limited, model not ready) raises
`ServiceError`, since every other file would fail the same way.
"""

from __future__ import annotations

import base64
import mimetypes
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import httpx

from app.config import Settings
from app.errors import UserError

API_KEY_HEADER = "X-API-Key"
HEALTH_TIMEOUT_S = 3.0

FailureKind = Literal["down", "unauthorized", "rate_limited", "not_ready", "unexpected"]


class ServiceError(UserError, RuntimeError):
    """The service cannot answer any file right now; `kind` lets the page pick how to show it."""

    def __init__(self, kind: FailureKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class Health:
    """What `GET /health` says: ready or not, why not, and about which model.

    `status` is the original service's `healthy`/`unhealthy`; `state` is this service's finer `ok`/`loading`/
    `unavailable` (an API without it gets its `status` there too).
    """

    status: str
    state: str
    ready: bool
    model_version: str | None = None
    model_uri: str | None = None
    threshold: float | None = None
    crop_size: int | None = None
    device: str | None = None
    detail: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    model_loaded_at: datetime | None = None  # when the model started answering, UTC; None from an API without it
    registry: str | None = None  # "reachable" / "unreachable": the model registry the service follows, if any


@dataclass
class FileResult:
    """One uploaded file's answer: the prediction fields, or the API's `error` and `detail`."""

    filename: str
    prediction: str | None = None
    probability: float | None = None
    confidence: str | None = None
    inference_time_ms: float | None = None
    model_version: str | None = None
    threshold: float | None = None
    heatmap_png: bytes | None = None
    crop_size: int | None = None
    round_trip_ms: float | None = None
    error: str | None = None
    detail: str | None = None
    status: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def api_url_of(settings: Settings) -> str:
    """`ui.api_url`, else the address `aipd serve` listens on (a wildcard host is reached through loopback)."""
    if settings.ui.api_url:
        return settings.ui.api_url.rstrip("/")
    return settings.service_url


def api_key_of(settings: Settings) -> str | None:
    """`ui.api_key`, else the first key the service itself is configured with (same settings on one machine)."""
    return settings.ui.api_key or (settings.api_keys[0] if settings.api_keys else None)


def _refusal(response: httpx.Response) -> tuple[str, str]:
    """The API's own `error` and `detail`; anything else (a proxy's HTML page) is summarised, not dumped."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "error" in body:
        return str(body["error"]), str(body.get("detail") or "")
    text = " ".join(response.text.split())[:200]
    return f"http_{response.status_code}", text or response.reason_phrase


class ApiClient:
    """Calls one deployment of the detector API; a fresh HTTP connection pool per call keeps it rerun-safe."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self.timeout_s = timeout_s

    def _client(self, timeout_s: float | None = None) -> httpx.Client:
        headers = {API_KEY_HEADER: self.api_key} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s or self.timeout_s)

    def _down(self, err: httpx.TransportError) -> ServiceError:
        reason = str(err) or type(err).__name__
        return ServiceError(
            "down",
            f"Cannot reach the detector API at {self.base_url} ({reason}). Start it with `aipd serve` "
            "(or `aipd demo`), or point the UI at it with AIPD_UI__API_URL / `aipd ui --api-url`.",
        )

    def _whole_request_failure(self, response: httpx.Response) -> ServiceError | None:
        error, detail = _refusal(response)
        status = response.status_code
        if status == 401:
            hint = "enter the right key in the sidebar, or set AIPD_UI__API_KEY / `aipd ui --api-key`"
            return ServiceError("unauthorized", f"The API refused the API key: {detail} ({hint}).")
        if status == 429:
            wait = response.headers.get("Retry-After")
            after = f"; retry in {wait} s" if wait else ""
            return ServiceError("rate_limited", f"The API is rate limiting this client: {detail}{after}.")
        if status == 503:
            return ServiceError("not_ready", f"The model is not ready: {detail}")
        if status == 404 and error in ("not_found", "http_404"):
            return ServiceError(
                "unexpected", f"{self.base_url} has no {response.request.url.path} route; is it the detector API?"
            )
        return None

    def health(self) -> Health:
        """Readiness and the loaded model; raises `ServiceError` only when nothing answering the contract is there."""
        try:
            with self._client(HEALTH_TIMEOUT_S) as client:
                response = client.get("/health")
        except httpx.TransportError as err:
            raise self._down(err) from err
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status_code not in (200, 503) or not isinstance(body, dict) or "status" not in body:
            raise ServiceError(
                "unexpected",
                f"{self.base_url}/health answered HTTP {response.status_code} without the detector's health JSON; "
                "is the API URL right?",
            )
        metrics = body.get("metrics") or body.get("model_metrics") or {}
        return Health(
            status=str(body["status"]),
            state=str(body.get("state") or body["status"]),
            ready=bool(body.get("model_loaded")) and response.status_code == 200,
            model_version=body.get("model_version"),
            model_uri=body.get("model_uri"),
            threshold=body.get("threshold"),
            crop_size=body.get("crop_size"),
            device=body.get("device"),
            detail=body.get("detail"),
            metrics={str(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
            model_loaded_at=_utc_time(body.get("model_loaded_at")),
            registry=body.get("registry"),
        )

    def explain(self, filename: str, data: bytes) -> FileResult:
        """The prediction plus its Grad-CAM heatmap for one file (`POST /predict/explain`)."""
        started = time.perf_counter()
        try:
            with self._client() as client:
                response = client.post("/predict/explain", files={"file": (filename, data, _mime(filename))})
        except httpx.TransportError as err:
            raise self._down(err) from err
        round_trip = (time.perf_counter() - started) * 1000.0
        failure = self._whole_request_failure(response)
        if failure is not None:
            raise failure
        if response.status_code != 200:
            error, detail = _refusal(response)
            return FileResult(
                filename, error=error, detail=detail, status=response.status_code, round_trip_ms=round_trip
            )
        body = response.json()
        result = _prediction(filename, body)
        result.heatmap_png = base64.b64decode(body["heatmap_base64"]) if body.get("heatmap_base64") else None
        result.crop_size = body.get("crop_size")
        result.round_trip_ms = round_trip
        return result

    def predict_batch(self, files: list[tuple[str, bytes]], chunk: int = 32) -> list[FileResult]:
        """Verdicts without heatmaps (`POST /predict/batch`), `chunk` files per request, in the order given."""
        results: list[FileResult] = []
        try:
            with self._client() as client:
                for start in range(0, len(files), chunk):
                    part = files[start : start + chunk]
                    started = time.perf_counter()
                    response = client.post(
                        "/predict/batch", files=[("files", (name, data, _mime(name))) for name, data in part]
                    )
                    round_trip = (time.perf_counter() - started) * 1000.0
                    failure = self._whole_request_failure(response)
                    if failure is not None:
                        raise failure
                    if response.status_code != 200:
                        error, detail = _refusal(response)
                        results += [
                            FileResult(name, error=error, detail=detail, status=response.status_code)
                            for name, _ in part
                        ]
                        continue
                    for (name, _), item in zip(part, response.json()["results"], strict=False):
                        if item.get("error"):
                            results.append(FileResult(name, error=item["error"], detail=item.get("detail") or ""))
                        else:
                            result = _prediction(name, item)
                            result.round_trip_ms = round_trip
                            results.append(result)
        except httpx.TransportError as err:
            raise self._down(err) from err
        return results


def _prediction(filename: str, body: dict[str, Any]) -> FileResult:
    return FileResult(
        filename=filename,
        prediction=body["prediction"],
        probability=float(body["probability"]),
        confidence=body.get("confidence"),
        inference_time_ms=body.get("inference_time_ms"),
        model_version=body.get("model_version"),
        threshold=body.get("threshold"),
        status=200,
    )


def _utc_time(value: Any) -> datetime | None:
    """An ISO-8601 time as UTC (a time without an offset is taken as UTC); None when absent or unreadable, since a
    missing timestamp must not hide the rest of the health."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def _mime(filename: str) -> str:
    """A content type from the name, for the multipart part only: the API decides by the bytes, not by this."""
    return mimetypes.guess_type(filename)[0] or "application/octet-stream"
