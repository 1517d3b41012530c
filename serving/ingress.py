"""The HTTP face of the service: a FastAPI app behind `@serve.ingress`, on CPU, in front of the batched detector.

The ingress does everything that can be refused cheaply before a GPU sees the request - API key, rate limit, the byte
limit while the upload streams in, type sniffing and the pixel limit (`app.images.decode_image`), the center crop
(`app.transforms.eval_preprocess`) - and hands the detector a small uint8 crop. Every refusal is the JSON shape
`{"error": ..., "detail": ...}` with its 4xx; decode and crop run in a worker thread so one large photo does not
stall the other requests of this replica.

It also speaks the contract of the FastAPI service it replaces, so that service's clients work unchanged: every route
at the root and under /v1 from the same handler, its probes (/healthz, /readyz, /startup), /drift, /privacy and /,
and its field names beside this service's own (serving/schemas.py). /openapi.json is made by each replica for its own
settings, so the upload limits and the API key it documents are the ones it enforces.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures that @serve.ingress rewrites, and
# string annotations there turn `request: Request` into a required query parameter.
import asyncio
import base64
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.config import Settings
from serving.guards import API_KEY_HEADER, RateLimiter, check_api_key, client_identity
from serving.image_checks import decode_and_crop
from serving.openapi import RETRY_AFTER_HEADER, ROUTE_PREFIXES, UPLOAD_ERRORS, errors, openapi_document
from serving.schemas import (
    API_VERSION,
    ApiError,
    BatchItem,
    BatchResponse,
    DriftResponse,
    DriftStatus,
    ErrorResponse,
    ExplainResponse,
    HealthResponse,
    LivenessResponse,
    Prediction,
    PrivacyResponse,
    ServiceInfo,
    confidence_of,
    verdict_of,
)
from serving.uploads import read_files

DETECTOR_TIMEOUT_S = 30.0  # a request waits this long for a detector replica (cold start, scale-up) before 503
STATUS_TIMEOUT_S = 2.0
RETRY_AFTER_S = "5"


def server_timing(started: float, read: float, decoded: float, called: float, result: dict[str, Any]) -> str:
    """The `Server-Timing` header (W3C): milliseconds per hop of one request inside the service."""
    queue, forward = float(result.get("queue_ms", 0.0)), float(result.get("forward_ms", 0.0))
    spans = {
        "read": read - started,
        "decode": decoded - read,
        "queue": queue / 1000.0,
        "forward": forward / 1000.0,
        "hop": max(0.0, called - decoded - (queue + forward) / 1000.0),
        "total": called - started,
    }
    return ", ".join(f"{name};dur={seconds * 1000.0:.2f}" for name, seconds in spans.items())


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=err.error, detail=err.detail).model_dump(), err.status, headers=err.headers)


def store_unavailable() -> ApiError:
    return ApiError(
        503, "metrics_unavailable", "the metrics store is restarting; retry", {"Retry-After": RETRY_AFTER_S}
    )


def resident_memory_mb() -> float | None:
    """This process's resident memory (VmRSS), as the original's health reported it; None where /proc has none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024.0, 2)
    except (OSError, ValueError, IndexError):
        return None
    return None


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


api = FastAPI(
    title="AI Product Photo Detector",
    version=API_VERSION,
    description="Detects AI-generated product photos. Upload JPEG, PNG or WebP as multipart/form-data. Every route "
    "is served at the root and under /v1.",
)
api.add_middleware(ActiveRequests)


def served_openapi() -> dict[str, Any]:
    """What /openapi.json answers: the document the answering replica made for its own settings.

    Serve runs a pickled copy of `api`, made when the class was decorated, so a replica cannot reach the app it
    serves from its constructor; this function, set on the app before the copy, asks the replica instead.
    """
    return serve.get_replica_context().servable_object.openapi_schema


api.openapi = served_openapi  # type: ignore[method-assign]


def route(method: str, path: str, **options: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register one handler at `path` and at its /v1 twin.

    Not an APIRouter included twice: Serve's class-based view (`@serve.ingress`) rebinds each route of the app once,
    and two inclusions of one router would hand it the same route objects twice.
    """

    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        for prefix in ROUTE_PREFIXES:
            api.add_api_route(prefix + path, endpoint, methods=[method], **options)
        return endpoint

    return register


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 and 405 from routing; a 405 keeps Starlette's `Allow` header (RFC 9110 requires it)."""
    names = {404: "not_found", 405: "method_not_allowed"}
    err = ApiError(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail), dict(exc.headers or {}))
    return error_response(err)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(ApiError(400, "bad_request", str(exc.errors())[:500]))


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    return error_response(ApiError(500, "internal_error", "unexpected server error; the service log has the trace"))


@serve.deployment(name="IngressDeployment")
@serve.ingress(api)
class IngressDeployment:
    """Routes of the contract; the guards run in the order: key (401), rate (429), ready (503), bytes (413/415)."""

    def __init__(self, detector: DeploymentHandle | None, settings: dict[str, Any]) -> None:
        """With a detector handle: the split layout. Without: the colocated one, the model in this replica."""
        from app.logging import configure_logging, get_logger
        from serving.detector import DetectorCore, LocalDetector, RemoteDetector
        from serving.metrics import MetricsRecorder

        self._started = time.monotonic()
        self._settings = Settings(**settings)
        configure_logging(self._settings.log_format, self._settings.log_level)
        self._log = get_logger("serving.ingress")
        self._metrics = MetricsRecorder(serve.get_replica_context().app_name)
        self._core = None if detector is not None else DetectorCore(self._settings, self._metrics)
        self._detector = RemoteDetector(detector) if self._core is None else LocalDetector(self._core)
        self._limiter = RateLimiter(self._settings.serve.rate_limit_per_minute)
        self._keys = list(self._settings.api_keys)
        self._ready = False
        self._crop_size: int | None = None
        self.openapi_schema = openapi_document(api, self._settings)
        if not self._keys:
            self._log.warning(
                "API keys are off: anyone who reaches this port may call the prediction routes; "
                "set AIPD_API_KEYS=key1,key2 to require the X-API-Key header"
            )

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Colocated layout only: the detector's live settings (Serve sends a user_config to this deployment then)."""
        if self._core is not None:
            deployment_config = getattr(serve.get_replica_context(), "_deployment_config", None)
            self._core.configure(user_config, getattr(deployment_config, "max_ongoing_requests", None))

    def check_health(self) -> None:
        if self._core is not None:
            self._core.check_health()

    # ------------------------------------------------------------------------------------------------ plain routes
    @route("GET", "/", response_model=ServiceInfo, summary="What this service is, and where its routes are")
    async def root(self) -> dict[str, Any]:
        return ServiceInfo().model_dump()

    @route("GET", "/privacy", response_model=PrivacyResponse, summary="What happens to an upload, and what is kept")
    async def privacy(self) -> dict[str, Any]:
        return PRIVACY.model_dump()

    @route("GET", "/healthz", response_model=LivenessResponse, summary="Liveness: the ingress answers")
    async def healthz(self) -> dict[str, Any]:
        return LivenessResponse().model_dump()

    @route(
        "GET",
        "/startup",
        response_model=LivenessResponse,
        responses=errors(503),
        summary="Startup probe: 200 once a model is loaded, else 503",
    )
    async def startup(self) -> JSONResponse:
        refusal = self._not_ready(await self._detector_status())
        if refusal is not None:
            return error_response(refusal)
        return JSONResponse(LivenessResponse().model_dump())

    @route(
        "GET",
        "/readyz",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "not ready", "headers": RETRY_AFTER_HEADER}},
        summary="Readiness probe: the health body, 200 once a model is loaded, else 503",
    )
    @route(
        "GET",
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse, "description": "not ready", "headers": RETRY_AFTER_HEADER}},
        summary="Readiness: a model is loaded, which one and how it scored, and this replica's vitals",
    )
    async def health(self) -> JSONResponse:
        body = await self._health()
        if body.model_loaded:
            return JSONResponse(body.model_dump())
        return JSONResponse(body.model_dump(), 503, headers={"Retry-After": RETRY_AFTER_S})

    @route(
        "GET",
        "/metrics",
        response_class=PlainTextResponse,
        responses=errors(503),
        summary="Prometheus metrics of the whole application (and the original service's aidetect_* names)",
    )
    async def metrics(self) -> Response:
        from serving.metrics import CONTENT_TYPE

        status = await self._detector_status()
        gauges = {"aidetect_model_loaded": 1.0 if status is not None and status.get("ready") else 0.0}
        try:
            text = await asyncio.to_thread(self._metrics.render, gauges)
        except Exception as err:  # noqa: BLE001 - the store actor restarting is a 503, not a 500
            self._log.warning("metrics store unavailable", error=str(err))
            return error_response(store_unavailable())
        return Response(text, media_type=CONTENT_TYPE)

    @route(
        "GET",
        "/drift",
        response_model=DriftResponse,
        responses=errors(503),
        summary="The predicted-probability distribution so far against the training baseline",
    )
    async def drift(self) -> JSONResponse:
        report = await self._drift()
        if report is None:
            return error_response(store_unavailable())
        return JSONResponse(report.model_dump())

    # ------------------------------------------------------------------------------------------ prediction routes
    @route(
        "POST",
        "/predict",
        response_model=Prediction,
        responses=UPLOAD_ERRORS,
        summary="Is this product photo AI-generated? (multipart field `file`)",
    )
    async def predict(self, request: Request) -> JSONResponse:
        return await self._answer_one(request, "predict", self._detector.predict, lambda result, body: body)

    @route(
        "POST",
        "/predict/explain",
        response_model=ExplainResponse,
        responses={**UPLOAD_ERRORS, **errors(422)},
        summary="The prediction plus a Grad-CAM heatmap (base64 PNG) of where the evidence lies",
    )
    async def explain(self, request: Request) -> JSONResponse:
        def answer(result: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
            body.update(
                heatmap_base64=base64.b64encode(result["heatmap_png"]).decode("ascii"),
                heatmap_format="png",
                crop_size=result["crop_size"],
            )
            return ExplainResponse(**body).model_dump()

        return await self._answer_one(request, "explain", self._detector.explain, answer)

    @route(
        "POST",
        "/predict/batch",
        response_model=BatchResponse,
        responses=UPLOAD_ERRORS,
        summary="Several photos at once (multipart field `files`); one bad file fails alone",
    )
    async def predict_batch(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            await self._guard(request)
            limits = self._settings.images
            try:
                uploads = await read_files(
                    dict(request.headers),
                    request.stream(),
                    field_name="files",
                    max_files=self._settings.serve.max_batch_files,
                    max_file_bytes=limits.max_bytes,
                    fail_fast=False,
                )
            except ClientDisconnect as err:
                raise ApiError(400, "client_disconnected", "the client closed the connection mid-upload") from err
            items = await asyncio.gather(*(self._batch_item(upload, started) for upload in uploads))
            succeeded = sum(1 for item in items if item.error is None)
            versions = [item.model_version for item in items if item.model_version is not None]
            elapsed_ms = round((time.perf_counter() - started) * 1000.0, 3)
            body = BatchResponse(
                results=items,
                total=len(items),
                succeeded=succeeded,
                successful=succeeded,
                failed=len(items) - succeeded,
                inference_time_ms=elapsed_ms,
                total_inference_time_ms=elapsed_ms,
                model_version=versions[-1] if versions else None,
            )
            return JSONResponse(body.model_dump())
        except ApiError as err:
            return self._refuse(err)
        finally:
            self._metrics.observe("prediction_latency_seconds", time.perf_counter() - started, {"route": "batch"})

    # -------------------------------------------------------------------------------------------------- helpers
    async def _health(self) -> HealthResponse:
        """The one health body, of /health and /readyz: the detector's status, the application's totals, this
        replica's vitals."""
        status, drift = await asyncio.gather(self._detector_status(), self._drift())
        ready = status is not None and bool(status.get("ready"))
        if status is None:
            state, detail = "unavailable", "no detector replica answered"
        elif not ready:
            state, detail = "loading", status.get("detail")
        else:
            state, detail = "ok", status.get("detail")  # a loaded model serves even with the registry gone
            self._learn(status)
        model = status if ready else {}
        summary = None if drift is None else DriftStatus(**drift.model_dump(include=set(DriftStatus.model_fields)))
        return HealthResponse(
            status="healthy" if ready else "unhealthy",
            state=state,
            model_loaded=ready,
            model_version=model.get("model_version"),
            model_uri=(status or {}).get("model_uri"),
            threshold=model.get("threshold"),
            crop_size=model.get("crop_size"),
            device=model.get("device"),
            detail=detail,
            metrics=model.get("metrics") or {},
            model_loaded_at=model.get("model_loaded_at"),
            registry=(status or {}).get("registry"),
            uptime_seconds=round(time.monotonic() - self._started, 2),
            active_requests=ActiveRequests.count,
            predictions_total=None if drift is None else drift.window_size,  # every answer observes its probability
            drift_detected=drift is not None and drift.drift_detected,
            drift_status=summary,
            memory_usage_mb=resident_memory_mb(),
            pid=os.getpid(),
        )

    async def _drift(self) -> DriftResponse | None:
        """The drift report from the application-wide totals; None while the metrics store cannot be read."""
        from serving.metrics import DRIFT_METRICS, drift_report, read_baseline

        def report() -> DriftResponse:
            totals = self._metrics.read(DRIFT_METRICS, timeout_s=STATUS_TIMEOUT_S)
            return drift_report(totals, *read_baseline())

        try:
            return await asyncio.to_thread(report)
        except Exception as err:  # noqa: BLE001 - the store actor restarting
            self._log.warning("metrics store unavailable", error=str(err))
            return None

    async def _guard(self, request: Request) -> None:
        key = check_api_key(self._keys, request.headers.get(API_KEY_HEADER))
        self._limiter.acquire(client_identity(key, request.client.host if request.client else None))
        if not self._ready:
            status = await self._detector_status()
            refusal = self._not_ready(status)
            if refusal is not None:
                raise refusal
            self._learn(status)

    @staticmethod
    def _not_ready(status: dict[str, Any] | None) -> ApiError | None:
        if status is not None and status.get("ready"):
            return None
        detail = (status or {}).get("detail") or "no detector replica answered"
        return ApiError(503, "not_ready", f"{detail}; retry in a few seconds", {"Retry-After": RETRY_AFTER_S})

    async def _answer_one(
        self,
        request: Request,
        label: str,
        method: Any,
        answer: Callable[[dict[str, Any], dict[str, Any]], dict[str, Any]],
    ) -> JSONResponse:
        """The frame of the one-photo routes: read and guard the upload, ask the detector, count, refuse, time.

        The answer's `Server-Timing` header says where the time went: reading the upload, decoding, and the detector
        call split into its queue, its forward pass and the hop between the two deployments.
        """
        started = time.perf_counter()
        try:
            data = await self._read_one(request)
            read = time.perf_counter()
            crop = await self._decode(data)
            decoded = time.perf_counter()
            result = await self._call(method, crop)
            called = time.perf_counter()
            body = answer(result, self._prediction(result, started))
            self._answered(body)
            return JSONResponse(body, headers={"Server-Timing": server_timing(started, read, decoded, called, result)})
        except ApiError as err:
            return self._refuse(err)
        finally:
            self._metrics.observe("prediction_latency_seconds", time.perf_counter() - started, {"route": label})

    async def _read_one(self, request: Request) -> bytes:
        await self._guard(request)
        limits = self._settings.images
        try:
            uploads = await read_files(
                dict(request.headers),
                request.stream(),
                field_name="file",
                max_files=1,
                max_file_bytes=limits.max_bytes,
                fail_fast=True,
            )
        except ClientDisconnect as err:
            raise ApiError(400, "client_disconnected", "the client closed the connection mid-upload") from err
        return uploads[0].data

    async def _decode(self, data: bytes) -> np.ndarray:
        return await asyncio.to_thread(decode_and_crop, data, self._crop_size or 224, self._settings.images)

    async def _batch_item(self, upload: Any, started: float) -> BatchItem:
        try:
            if upload.too_large:
                raise ApiError(413, "too_large", f"the file has more than {self._settings.images.max_bytes:,} bytes")
            crop = await self._decode(upload.data)
            result = await self._call(self._detector.predict, crop)
            body = self._prediction(result, started)
            self._answered(body)
            return BatchItem(filename=upload.filename, **body)
        except ApiError as err:
            self._refused(err)
            return BatchItem(filename=upload.filename, error=err.error, detail=err.detail)

    async def _call(self, method: Any, crop: np.ndarray) -> dict[str, Any]:
        try:
            result = await asyncio.wait_for(method(crop), timeout=DETECTOR_TIMEOUT_S)
        except asyncio.TimeoutError as err:
            raise ApiError(
                503,
                "model_unavailable",
                f"no detector answered within {DETECTOR_TIMEOUT_S:.0f} s",
                {"Retry-After": RETRY_AFTER_S},
            ) from err
        except Exception as err:  # noqa: BLE001 - a replica dying mid-request is the service's fault, told as 503
            self._log.error("detector call failed", error=f"{type(err).__name__}: {err}")
            raise ApiError(
                503, "model_unavailable", "the detector failed to answer; retry", {"Retry-After": RETRY_AFTER_S}
            ) from err
        error = result.get("error")
        if error == "not_ready":
            raise ApiError(
                503, "not_ready", f"{result['detail']}; retry in a few seconds", {"Retry-After": RETRY_AFTER_S}
            )
        if error == "explain_unsupported":
            raise ApiError(422, error, result["detail"])
        if error is not None:
            raise ApiError(500, error, result["detail"])
        self._learn(result)
        return result

    async def _detector_status(self) -> dict[str, Any] | None:
        try:
            return await asyncio.wait_for(self._detector.status(), timeout=STATUS_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - timeout (no replica yet) or a replica restarting
            return None

    def _learn(self, status: dict[str, Any]) -> None:
        """Crop size follows the model that answered last, so a champion with another crop size is picked up."""
        self._ready = True
        self._crop_size = int(status["crop_size"])

    @staticmethod
    def _prediction(result: dict[str, Any], started: float) -> dict[str, Any]:
        probability, threshold = float(result["probability"]), float(result["threshold"])
        return Prediction(
            prediction=verdict_of(probability, threshold),
            probability=round(probability, 6),
            confidence=confidence_of(probability, threshold),
            inference_time_ms=round((time.perf_counter() - started) * 1000.0, 3),
            model_version=str(result["model_version"]),
            threshold=threshold,
        ).model_dump()

    def _answered(self, body: dict[str, Any]) -> None:
        """Count one answered photo, under this service's names and the original's, and record its probability."""
        self._metrics.inc("predictions_total", {"status": "200", "result": body["prediction"]})
        self._metrics.inc(
            "aidetect_predictions_total",
            {"status": "success", "prediction": body["prediction"], "confidence": body["confidence"]},
        )
        self._metrics.observe("prediction_probability", body["probability"])

    def _refused(self, err: ApiError) -> None:
        self._metrics.inc("predictions_total", {"status": str(err.status), "result": "error"})
        self._metrics.inc("aidetect_predictions_total", {"status": "error", "prediction": "none", "confidence": "none"})
        self._metrics.inc("prediction_errors_total", {"type": err.error})

    def _refuse(self, err: ApiError) -> JSONResponse:
        self._refused(err)
        if err.status >= 500:
            self._log.warning("request failed", status=err.status, error=err.error, detail=err.detail)
        return error_response(err)

    def __del__(self) -> None:
        core = getattr(self, "_core", None)
        if core is not None:
            core.close()
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            metrics.close()
