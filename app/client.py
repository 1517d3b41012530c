"""The one HTTP client of the detector API: the UI, `aipd predict` and the demo speak to the service through it.

It speaks only the public contract (`app.contract`), like any other client. Two kinds of failure are kept apart. A
refusal that concerns one file (not an image, too large, unsupported type) becomes a `FileResult` carrying the API's
own `error` and `detail`, so one bad photo never hides the verdicts of the others. A failure of the whole request
(the service is down, the key is wrong, rate limited, model not ready) raises `ServiceError` with a `kind`, since
every other file would fail the same way; each caller words it for its own reader (the page, the terminal).
"""

from __future__ import annotations

import base64
import contextlib
import mimetypes
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import httpx

from app.config import Settings
from app.contract import API_KEY_HEADER, RETRY_AFTER_HEADER
from app.errors import UserError

HEALTH_TIMEOUT_S = 3.0

FailureKind = Literal["down", "unauthorized", "rate_limited", "not_ready", "unexpected"]


class ServiceError(UserError, RuntimeError):
    """The service cannot answer any file right now; `kind` says why, `detail` is the API's (or the transport's)
    own words and `url` the service asked."""

    def __init__(
        self,
        kind: FailureKind,
        message: str,
        *,
        url: str = "",
        detail: str = "",
        status: int | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.url = url
        self.detail = detail
        self.status = status  # the HTTP status of the refusal; None when nothing answered
        self.retry_after = retry_after  # the refusal's Retry-After, in seconds


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
    """One uploaded file's answer: the prediction fields, or the API's `error` and `detail`. `body` is the answer
    as sent, so fields this client does not know yet still reach a caller that prints them all."""

    filename: str
    prediction: str | None = None
    probability: float | None = None
    confidence: str | None = None
    inference_time_ms: float | None = None
    model_version: str | None = None
    threshold: float | None = None
    heatmap_png: bytes | None = None
    crop_size: int | None = None
    source_scores: dict[str, float] | None = None  # the likely generator family (app.contract.Prediction)
    provenance: dict[str, Any] | None = None  # the file's C2PA manifest and unsigned metadata (app.contract.Provenance)
    round_trip_ms: float | None = None
    error: str | None = None
    detail: str | None = None
    status: int | None = None
    body: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_row(self, name: str | None = None) -> dict[str, Any]:
        """The answer as `aipd predict --json` prints it: `file` first, then every field the API sent (or the
        error and its detail)."""
        if not self.ok:
            return {"file": name or self.filename, "error": self.error, "detail": self.detail}
        fields = {k: v for k, v in self.body.items() if v is not None and k not in ("filename", "heatmap_base64")}
        return {"file": name or self.filename, **fields}


def api_url_of(settings: Settings) -> str:
    """`ui.api_url`, else the address `aipd serve` listens on (a wildcard host is reached through loopback)."""
    if settings.ui.api_url:
        return settings.ui.api_url.rstrip("/")
    return settings.service_url


def api_key_of(settings: Settings) -> str | None:
    """`ui.api_key`, else the first key the service itself is configured with (same settings on one machine)."""
    return settings.ui.api_key or (settings.api_keys[0] if settings.api_keys else None)


def refusal_of(response: httpx.Response) -> tuple[str, str]:
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
    """Calls one deployment of the detector API.

    Each call opens its own connection pool (a Streamlit rerun, a CLI command), unless it runs inside `session()`,
    which keeps one connection for every call made in it (the demo's trickle of requests).
    """

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key or None
        self.timeout_s = timeout_s
        self._session: httpx.Client | None = None

    @contextlib.contextmanager
    def session(self) -> Iterator[ApiClient]:
        with self._client() as client:
            self._session = client
            try:
                yield self
            finally:
                self._session = None

    @contextlib.contextmanager
    def _connection(self, timeout_s: float | None = None) -> Iterator[httpx.Client]:
        if self._session is not None:
            yield self._session
            return
        try:
            with self._client(timeout_s) as client:
                yield client
        except httpx.TransportError as err:
            raise self._down(err) from err

    def _client(self, timeout_s: float | None = None) -> httpx.Client:
        headers = {API_KEY_HEADER: self.api_key} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s or self.timeout_s)

    def _down(self, err: httpx.TransportError) -> ServiceError:
        reason = str(err) or type(err).__name__
        return ServiceError(
            "down",
            f"cannot reach the service at {self.base_url} ({reason}); start it with `aipd serve` (or `aipd demo`)",
            url=self.base_url,
            detail=reason,
        )

    def _post(self, client: httpx.Client, path: str, files: Any) -> httpx.Response:
        try:
            return client.post(path, files=files)
        except httpx.TransportError as err:
            raise self._down(err) from err

    def _whole_request_failure(self, response: httpx.Response) -> ServiceError | None:
        error, detail = refusal_of(response)
        status = response.status_code
        words = f"{error}: {detail}"
        facts = {"url": self.base_url, "detail": detail, "status": status}
        if status == 401:
            return ServiceError("unauthorized", f"the API refused the API key ({words})", **facts)
        if status == 429:
            wait = response.headers.get(RETRY_AFTER_HEADER)
            after = f"; retry in {wait} s" if wait else ""
            return ServiceError(
                "rate_limited", f"the API is rate limiting this client ({words}){after}", retry_after=wait, **facts
            )
        if status == 503:
            return ServiceError("not_ready", f"the model is not ready ({words})", **facts)
        if status == 404 and error in ("not_found", "http_404"):
            path = response.request.url.path
            return ServiceError("unexpected", f"{self.base_url} has no {path} route; is it the detector API?", **facts)
        return None

    def health(self) -> Health:
        """Readiness and the loaded model; raises `ServiceError` only when nothing answering the contract is there."""
        with self._connection(HEALTH_TIMEOUT_S) as client:
            try:
                response = client.get("/health", timeout=HEALTH_TIMEOUT_S)
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
                url=self.base_url,
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

    def rollout(self) -> dict[str, Any]:
        """`GET /rollout`: the challenger on trial and each version's figures, as the service reports them."""
        with self._connection(HEALTH_TIMEOUT_S) as client:
            try:
                response = client.get("/rollout", timeout=HEALTH_TIMEOUT_S)
            except httpx.TransportError as err:
                raise self._down(err) from err
        failure = self._whole_request_failure(response)
        if failure is not None:
            raise failure
        if response.status_code != 200:
            raise ServiceError(
                "unexpected", f"{self.base_url}/rollout answered HTTP {response.status_code}", url=self.base_url
            )
        return response.json()

    def predict(self, filename: str, data: bytes) -> FileResult:
        """One file's verdict (`POST /predict`)."""
        return self._one("/predict", filename, data)

    def explain(self, filename: str, data: bytes) -> FileResult:
        """The prediction plus its Grad-CAM heatmap for one file (`POST /predict/explain`)."""
        result = self._one("/predict/explain", filename, data)
        heatmap = result.body.get("heatmap_base64")
        result.heatmap_png = base64.b64decode(heatmap) if heatmap else None
        result.crop_size = result.body.get("crop_size")
        return result

    def _one(self, path: str, filename: str, data: bytes) -> FileResult:
        started = time.perf_counter()
        with self._connection() as client:
            response = self._post(client, path, {"file": (filename, data, _mime(filename))})
        round_trip = (time.perf_counter() - started) * 1000.0
        failure = self._whole_request_failure(response)
        if failure is not None:
            raise failure
        if response.status_code != 200:
            error, detail = refusal_of(response)
            return FileResult(
                filename, error=error, detail=detail, status=response.status_code, round_trip_ms=round_trip
            )
        result = _prediction(filename, response.json())
        result.round_trip_ms = round_trip
        return result

    def predict_batch(self, files: list[tuple[str, bytes]], chunk: int = 32) -> list[FileResult]:
        """Verdicts without heatmaps (`POST /predict/batch`), `chunk` files per request, in the order given."""
        results: list[FileResult] = []
        with self._connection() as client:
            for start in range(0, len(files), chunk):
                part = files[start : start + chunk]
                started = time.perf_counter()
                response = self._post(
                    client, "/predict/batch", [("files", (name, data, _mime(name))) for name, data in part]
                )
                round_trip = (time.perf_counter() - started) * 1000.0
                failure = self._whole_request_failure(response)
                if failure is not None:
                    raise failure
                if response.status_code != 200:
                    error, detail = refusal_of(response)
                    results += [
                        FileResult(name, error=error, detail=detail, status=response.status_code) for name, _ in part
                    ]
                    continue
                for (name, _), item in zip(part, response.json()["results"], strict=False):
                    if item.get("error"):
                        results.append(FileResult(name, error=item["error"], detail=item.get("detail") or ""))
                    else:
                        result = _prediction(name, item)
                        result.round_trip_ms = round_trip
                        results.append(result)
        return results


def predict_files(
    url: str, paths: list[Path], *, api_key: str | None = None, timeout_s: float = 60.0, chunk: int = 32
) -> list[dict[str, Any]]:
    """`aipd predict` and the demo's samples: one row per path, in order (`FileResult.as_row`); a file that cannot be
    read is a row with the error `unreadable`. One file goes to `/predict`, several to `/predict/batch`."""
    readable: list[tuple[Path, bytes]] = []
    rows: dict[Path, dict[str, Any]] = {}
    for path in paths:
        try:
            readable.append((path, path.read_bytes()))
        except OSError as err:
            rows[path] = {"file": str(path), "error": "unreadable", "detail": str(err)}
    client = ApiClient(url, api_key, timeout_s)
    if len(paths) == 1 and readable:
        path, data = readable[0]
        rows[path] = client.predict(path.name, data).as_row(str(path))
    elif readable:
        answers = client.predict_batch([(path.name, data) for path, data in readable], chunk=chunk)
        for (path, _), answer in zip(readable, answers, strict=True):
            rows[path] = answer.as_row(str(path))
    return [rows[path] for path in paths]


def _prediction(filename: str, body: dict[str, Any]) -> FileResult:
    return FileResult(
        filename=filename,
        prediction=body["prediction"],
        probability=float(body["probability"]),
        confidence=body.get("confidence"),
        inference_time_ms=body.get("inference_time_ms"),
        model_version=body.get("model_version"),
        threshold=body.get("threshold"),
        source_scores=body.get("source_scores"),
        provenance=body.get("provenance"),
        status=200,
        body=body,
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
