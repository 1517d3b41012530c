"""The HTTP face of the service: a FastAPI app behind `@serve.ingress`, on CPU, in front of the batched detector.

The ingress does everything that can be refused cheaply before a GPU sees the request - API key, rate limit, the byte
limit while the upload streams in, type sniffing and the pixel limit (`app.images.decode_image`), the center crop
(`app.transforms.eval_preprocess`) - and hands the detector a small uint8 crop. Every refusal is the JSON shape
`{"error": ..., "detail": ...}` with its 4xx; decode and crop run in a worker thread so one large photo does not
stall the other requests of this replica.

It also speaks the contract of the FastAPI service it replaces (serving/compat.py), so that service's clients work
unchanged: every route at the root and under /v1 from the same handler, its probes (/healthz, /readyz, /startup),
/drift, /privacy and /, and its field names beside this service's own (app/contract.py). /openapi.json is made by
each replica for its own settings, so the upload limits and the API key it documents are the ones it enforces.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures that @serve.ingress rewrites, and
# string annotations there turn `request: Request` into a required query parameter.
import asyncio
import base64
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
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
from app.contract import (
    API_KEY_HEADER,
    API_VERSION,
    RETRY_AFTER_HEADER,
    AlertmanagerWebhook,
    AlertsResponse,
    ApiError,
    BatchItem,
    BatchResponse,
    DriftResponse,
    ErrorResponse,
    ExplainResponse,
    HealthResponse,
    LivenessResponse,
    Prediction,
    PrivacyResponse,
    Retraining,
    RolloutEnded,
    RolloutResponse,
    RolloutState,
    ServiceInfo,
    VersionFigures,
    batch_of,
    prediction_of,
)
from app.rollout import Arm, Rollout, arm_of, content_digest
from serving import compat
from serving.cache import build_cache, content_key
from serving.detector import COALESCE_MAX_BYTES
from serving.guards import RateLimiter, addresses_trusted, check_api_key, client_identity
from serving.health import health_body
from serving.image_checks import check_with_evidence, decode_with_evidence, refused_image
from serving.openapi import HEALTH_NOT_READY, ROUTE_PREFIXES, UPLOAD_ERRORS, errors, openapi_document, served_openapi
from serving.results import DetectorStatus, Explained, ModelFacts, Refused, Scored
from serving.uploads import UploadedFile, read_files

DETECTOR_TIMEOUT_S = 30.0  # a request waits this long for a detector replica (cold start, scale-up) before 503
STATUS_TIMEOUT_S = 2.0
RETRY_AFTER_S = "5"
VERSION_REFRESH_S = 1.0
HASH_INLINE_BYTES = 512 * 1024  # larger uploads are hashed on a worker thread
LIMIT_NEEDS_KEYS = (
    "rate limits count per API key: without keys nobody is limited, since behind Serve's HAProxy ingress the service "
    "cannot tell one client from another (set AIPD_API_KEYS, or limit per address in a gateway in front)"
)


@dataclass(frozen=True)
class Routing:
    """Which version answers a photo of the champion's arm, and what is on trial beside it."""

    champion: str | None
    rollout: Rollout | None
    challenger: ModelFacts | None


@dataclass(frozen=True)
class Photo:
    """One upload's content hash, the arm it falls in, and its key in the answer cache (None: not cached)."""

    digest: str
    arm: Arm
    key: str | None


def unavailable(error: str, detail: str) -> ApiError:
    """The one 503: the service cannot answer now, and says when to try again."""
    return ApiError(503, error, detail, {RETRY_AFTER_HEADER: RETRY_AFTER_S})


def refusal_error(refused: Refused) -> ApiError:
    """A detector's refusal as the contract's answer."""
    if refused.kind == "not_ready":
        return unavailable("not_ready", f"{refused.detail}; retry in a few seconds")
    if refused.kind == "explain_unsupported":
        return ApiError(422, refused.kind, refused.detail)
    if refused.kind == "bad_image" and refused.reason is not None:
        return refused_image(refused.reason, refused.detail)
    return ApiError(500, refused.kind, refused.detail)


def server_timing(started: float, read: float, decoded: float, called: float, result: Scored | Explained) -> str:
    """The `Server-Timing` header (W3C): milliseconds per hop of one request inside the service."""
    queue, forward, device_decode = (
        (result.queue_ms, result.forward_ms, result.decode_ms) if isinstance(result, Scored) else (0.0, 0.0, 0.0)
    )
    spans = {
        "read": read - started,
        "decode": decoded - read,
        "queue": queue / 1000.0,
        "device_decode": device_decode / 1000.0,
        "forward": forward / 1000.0,
        "hop": max(0.0, called - decoded - (queue + device_decode + forward) / 1000.0),
        "total": called - started,
    }
    return ", ".join(f"{name};dur={seconds * 1000.0:.2f}" for name, seconds in spans.items())


def error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=err.error, detail=err.detail).model_dump(), err.status, headers=err.headers)


def store_unavailable() -> ApiError:
    return unavailable("metrics_unavailable", "the metrics store is restarting; retry")


api = FastAPI(
    title="AI Product Photo Detector",
    version=API_VERSION,
    description="Detects AI-generated product photos. Upload JPEG, PNG or WebP as multipart/form-data. Every route "
    "is served at the root and under /v1.",
)
api.add_middleware(compat.ActiveRequests)
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
        self._metrics = MetricsRecorder(serve.get_replica_context().app_name, in_flight=compat.active_requests)
        self._core = None if detector is not None else DetectorCore(self._settings, self._metrics)
        self._detector = RemoteDetector(detector) if self._core is None else LocalDetector(self._core)
        self._decode_at_detector = self._settings.serve.decode_on == "detector"
        serve_settings = self._settings.serve
        self._limiter = RateLimiter(serve_settings.rate_limit_per_minute)
        self._keys = list(self._settings.api_keys)
        self._addresses_trusted = addresses_trusted()
        self._cache = build_cache(
            serve_settings.cache_url,
            max_entries=serve_settings.cache_max_entries,
            max_bytes=serve_settings.cache_max_bytes,
            ttl_s=serve_settings.cache_ttl_s,
        )
        # What answers (the champion's version, a rollout and its challenger), for the arm and the cache key; in the
        # split layout as the detector last said (see _current_routing).
        self._routing = Routing(None, None, None)
        self._routing_checked = 0.0
        self._refresh: asyncio.Future | None = None
        # The crop size of the model that answered last, so a champion with another crop size is picked up; None
        # until a detector first said it is ready (the guard waits for that before any upload is decoded).
        self._crop_size: int | None = None
        self.openapi_schema = openapi_document(api, self._settings)
        if not self._keys:
            self._log.warning(
                "API keys are off: anyone who reaches this port may call the prediction routes; "
                f"set AIPD_API_KEYS=key1,key2 to require the {API_KEY_HEADER} header"
            )
            if not self._addresses_trusted and self._limiter.enabled:
                self._log.warning(LIMIT_NEEDS_KEYS)

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
        return compat.PRIVACY.model_dump()

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
        responses=HEALTH_NOT_READY,
        summary="Readiness probe: the health body, 200 once a model is loaded, else 503",
    )
    @route(
        "GET",
        "/health",
        response_model=HealthResponse,
        responses=HEALTH_NOT_READY,
        summary="Readiness: a model is loaded, which one and how it scored, and this replica's vitals",
    )
    async def health(self) -> JSONResponse:
        status, drift = await asyncio.gather(self._detector_status(), self._drift())
        if status is not None and status.ready:
            self._learn(status)
        body = health_body(status, drift, self._started, draining=self._metrics.draining)
        if body.model_loaded and not self._metrics.draining:
            return JSONResponse(body.model_dump())
        return JSONResponse(body.model_dump(), 503, headers={RETRY_AFTER_HEADER: RETRY_AFTER_S})

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
        gauges = {"aidetect_model_loaded": 1.0 if status is not None and status.ready else 0.0}
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

    @route(
        "GET",
        "/rollout",
        response_model=RolloutResponse,
        responses=errors(503),
        summary="The challenger on trial beside the champion, and how each model version is doing",
    )
    async def rollout(self) -> JSONResponse:
        from serving.rollout_stats import ROLLOUT_METRICS, version_figures

        status = await self._detector_status()
        try:
            totals = await asyncio.to_thread(self._metrics.read, ROLLOUT_METRICS, STATUS_TIMEOUT_S)
        except Exception as err:  # noqa: BLE001 - the store actor restarting
            self._log.warning("metrics store unavailable", error=str(err))
            return error_response(store_unavailable())
        trial, ended = (status.rollout, status.rollout_ended) if status is not None else (None, None)
        retraining = await asyncio.to_thread(self._retraining)
        body = RolloutResponse(
            champion=None if status is None or status.model is None else status.model.model_version,
            rollout=None if trial is None else RolloutState(**asdict(trial)),
            last_ended=None if ended is None else RolloutEnded(**asdict(ended)),
            versions={v: VersionFigures(**f.to_dict()) for v, f in version_figures(totals).items()},
            retraining=None if retraining is None else Retraining(**retraining),
        )
        return JSONResponse(body.model_dump())

    @route(
        "POST",
        "/alerts",
        response_model=AlertsResponse,
        responses={
            **errors(401, 503),
            400: {"model": ErrorResponse, "description": "not an Alertmanager webhook payload"},
        },
        summary="Alertmanager's webhook: a firing drift alert starts a retraining job (when serve.retrain_data is set)",
    )
    async def alerts(self, payload: AlertmanagerWebhook, request: Request) -> JSONResponse:
        from serving.retrain import firing_drift_alerts, start_retraining

        try:
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ").strip() or None
            check_api_key(self._keys, request.headers.get(API_KEY_HEADER) or bearer)
        except ApiError as err:
            return self._refuse(err)
        firing = firing_drift_alerts(payload.model_dump())
        if not firing:
            return JSONResponse(AlertsResponse(accepted=False, detail="no drift alert is firing").model_dump())
        try:
            job, detail = await asyncio.to_thread(start_retraining, self._settings, f"drift: {', '.join(firing)}")
        except Exception as err:  # noqa: BLE001 - Alertmanager retries a failed webhook; the reason goes to the log
            self._log.error("retraining not started", error=f"{type(err).__name__}: {err}")
            return error_response(unavailable("retraining_unavailable", f"the retraining job was not started: {err}"))
        self._log.warning("drift alert", alerts=firing, outcome=detail)
        return JSONResponse(AlertsResponse(accepted=job is not None, job=job, detail=detail).model_dump())

    # ------------------------------------------------------------------------------------------ prediction routes
    @route(
        "POST",
        "/predict",
        response_model=Prediction,
        responses=UPLOAD_ERRORS,
        summary="Is this product photo AI-generated? (multipart field `file`)",
    )
    async def predict(self, request: Request) -> JSONResponse:
        return await self._answer_one(
            request, "predict", self._detector.predict, lambda result, body: body, cacheable=True
        )

    async def _explain(self, crop: np.ndarray, arm: Arm) -> Explained | Refused:
        """Grad-CAM of the champion: an explanation is asked for by a person, about the verdict they were given."""
        return await self._detector.explain(crop)

    @route(
        "POST",
        "/predict/explain",
        response_model=ExplainResponse,
        responses={**UPLOAD_ERRORS, **errors(422)},
        summary="The prediction plus a Grad-CAM heatmap (base64 PNG) of where the evidence lies",
    )
    async def explain(self, request: Request) -> JSONResponse:
        def answer(result: Explained, body: dict[str, Any]) -> dict[str, Any]:
            body.update(
                heatmap_base64=base64.b64encode(result.heatmap_png).decode("ascii"),
                heatmap_format="png",
                crop_size=result.model.crop_size,
            )
            return ExplainResponse(**body).model_dump()

        return await self._answer_one(request, "explain", self._explain, answer)

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
            crop_size = await self._guard(request)
            uploads = await self._uploads(request, "files", self._settings.serve.max_batch_files, fail_fast=False)
            items = await asyncio.gather(*(self._batch_item(upload, crop_size, started) for upload in uploads))
            return JSONResponse(batch_of(list(items), (time.perf_counter() - started) * 1000.0).model_dump())
        except ApiError as err:
            return self._refuse(err)
        finally:
            self._metrics.observe(
                "prediction_latency_seconds", time.perf_counter() - started, {"route": "batch", "version": "none"}
            )

    # -------------------------------------------------------------------------------------------------- helpers
    async def _drift(self) -> DriftResponse | None:
        """The drift report from the application-wide totals; None while the metrics store cannot be read."""
        from app.drift import read_baseline
        from serving.metrics import DRIFT_METRICS, drift_report

        def report() -> DriftResponse:
            totals = self._metrics.read(DRIFT_METRICS, timeout_s=STATUS_TIMEOUT_S)
            return drift_report(totals, *read_baseline())

        try:
            return await asyncio.to_thread(report)
        except Exception as err:  # noqa: BLE001 - the store actor restarting
            self._log.warning("metrics store unavailable", error=str(err))
            return None

    async def _guard(self, request: Request) -> int:
        """Key, rate and readiness; the crop size uploads are cut to."""
        key = check_api_key(self._keys, request.headers.get(API_KEY_HEADER))
        host = request.client.host if request.client else None
        self._limiter.acquire(client_identity(key, host, addresses_trusted=self._addresses_trusted))
        if self._metrics.draining:
            raise unavailable("draining", "the service is stopping; retry in a few seconds")
        if self._crop_size is None:
            status = await self._detector_status()
            refusal = self._not_ready(status)
            if refusal is not None:
                raise refusal
            self._learn(status)
        return self._crop_size

    @staticmethod
    def _not_ready(status: DetectorStatus | None) -> ApiError | None:
        if status is not None and status.ready:
            return None
        detail = (status.detail if status is not None else None) or "no detector replica answered"
        return unavailable("not_ready", f"{detail}; retry in a few seconds")

    async def _uploads(self, request: Request, field: str, max_files: int, *, fail_fast: bool) -> list[UploadedFile]:
        """The request's files of one multipart field, the byte limit enforced while they stream in."""
        try:
            return await read_files(
                dict(request.headers),
                request.stream(),
                field_name=field,
                max_files=max_files,
                max_file_bytes=self._settings.images.max_bytes,
                fail_fast=fail_fast,
            )
        except ClientDisconnect as err:
            raise ApiError(400, "client_disconnected", "the client closed the connection mid-upload") from err

    async def _answer_one(
        self,
        request: Request,
        label: str,
        method: Callable[[np.ndarray, Arm], Awaitable[Scored | Explained | Refused]],
        answer: Callable[[Any, dict[str, Any]], dict[str, Any]],
        cacheable: bool = False,
    ) -> JSONResponse:
        """The frame of the one-photo routes: read and guard the upload, ask the cache or the detector, count,
        refuse, time.

        The answer's `Server-Timing` header says where the time went: reading the upload, decoding, and the detector
        call split into its queue, its forward pass and the hop between the two deployments (a cached answer: the
        read and the lookup).
        """
        started = time.perf_counter()
        version = "none"
        try:
            crop_size = await self._guard(request)
            data = (await self._uploads(request, "file", 1, fail_fast=True))[0].data
            read = time.perf_counter()
            photo = await self._plan(data, cacheable)
            hit = await self._cached(photo, started)
            if hit is not None:
                version = hit["model_version"]
                looked = time.perf_counter()
                timing = f"read;dur={(read - started) * 1000:.2f}, cache;dur={(looked - read) * 1000:.2f}"
                return JSONResponse(hit, headers={"Server-Timing": timing})
            pixels, provenance = await self._prepare(data, crop_size, bytes_ok=method == self._detector.predict)
            decoded = time.perf_counter()
            result = await self._call(method(pixels, photo.arm))
            called = time.perf_counter()
            body = answer(result, self._prediction(result, started, provenance))
            version = body["model_version"]
            self._answered(body)
            await self._remember(photo, body)
            return JSONResponse(body, headers={"Server-Timing": server_timing(started, read, decoded, called, result)})
        except ApiError as err:
            return self._refuse(err)
        finally:
            elapsed = time.perf_counter() - started
            self._metrics.observe("prediction_latency_seconds", elapsed, {"route": label, "version": version})

    async def _prepare(self, data: bytes, crop_size: int, bytes_ok: bool) -> tuple[np.ndarray | bytes, dict[str, Any]]:
        """What the detector gets, with the photo's provenance evidence: the checked bytes where the detector decodes
        (`serve.decode_on`) and the upload fits in one call, else the crop decoded here."""
        limits = self._settings.images
        if bytes_ok and self._decode_at_detector and len(data) <= COALESCE_MAX_BYTES:
            return await asyncio.to_thread(check_with_evidence, data, limits)
        return await asyncio.to_thread(decode_with_evidence, data, crop_size, limits)

    async def _batch_item(self, upload: UploadedFile, crop_size: int, started: float) -> BatchItem:
        try:
            if upload.too_large:
                raise ApiError(413, "too_large", f"the file has more than {self._settings.images.max_bytes:,} bytes")
            photo = await self._plan(upload.data, cacheable=True)
            hit = await self._cached(photo, started)
            if hit is not None:
                return BatchItem(filename=upload.filename, **hit)
            pixels, provenance = await self._prepare(upload.data, crop_size, bytes_ok=True)
            result = await self._call(self._detector.predict(pixels, photo.arm))
            body = self._prediction(result, started, provenance)
            self._answered(body)
            await self._remember(photo, body)
            return BatchItem(filename=upload.filename, **body)
        except ApiError as err:
            self._refused(err)
            return BatchItem(filename=upload.filename, error=err.error, detail=err.detail)

    async def _call(self, call: Awaitable[Scored | Explained | Refused]) -> Scored | Explained:
        try:
            result = await asyncio.wait_for(call, timeout=DETECTOR_TIMEOUT_S)
        except asyncio.TimeoutError as err:
            raise unavailable("model_unavailable", f"no detector answered within {DETECTOR_TIMEOUT_S:.0f} s") from err
        except Exception as err:  # noqa: BLE001 - a replica dying mid-request is the service's fault, told as 503
            self._log.error("detector call failed", error=f"{type(err).__name__}: {err}")
            raise unavailable("model_unavailable", "the detector failed to answer; retry") from err
        if isinstance(result, Refused):
            raise refusal_error(result)
        self._crop_size = result.model.crop_size
        return result

    async def _detector_status(self) -> DetectorStatus | None:
        try:
            return await asyncio.wait_for(self._detector.status(), timeout=STATUS_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - timeout (no replica yet) or a replica restarting
            return None

    def _learn(self, status: DetectorStatus) -> None:
        """A ready detector's status always names its model; it also says what is on trial beside it."""
        self._crop_size = status.model.crop_size
        self._routing = Routing(status.model.model_version, status.rollout, status.challenger)

    def _retraining(self) -> dict[str, Any] | None:
        if not self._settings.serve.retrain_data:
            return None
        from app.registry import setup_mlflow
        from serving.retrain import retraining

        try:
            setup_mlflow(self._settings)
            return retraining(self._settings, ask_cluster=True)
        except Exception as err:  # noqa: BLE001 - the registry not answering hides the record, nothing else
            self._log.warning("cannot read the retraining record", error=str(err))
            return None

    # --------------------------------------------------------------------------------- routing and answer cache
    async def _plan(self, data: bytes, cacheable: bool) -> Photo:
        """Which model this photo meets (its content hash picks the arm of a rollout) and its key in the cache."""
        if len(data) > HASH_INLINE_BYTES:  # hashing megabytes would stall every other request of this replica
            digest = await asyncio.to_thread(content_digest, data)
        else:
            digest = content_digest(data)
        routing = self._current_routing()
        arm = arm_of(digest, routing.rollout)
        version = routing.challenger.model_version if arm == "challenger" and routing.challenger else routing.champion
        key = content_key(digest, version) if cacheable and self._cache is not None and version else None
        return Photo(digest, arm, key)

    def _current_routing(self) -> Routing:
        """What answers now: exact in the colocated layout (the models are in this replica); in the split layout as
        the detector last said, asked again at most every second (a new model is seen within that second, or at
        its first answer)."""
        if self._core is not None:
            status = self._core.status()
            if status.model is not None:
                return Routing(status.model.model_version, status.rollout, status.challenger)
            return Routing(None, None, None)
        if time.monotonic() - self._routing_checked > VERSION_REFRESH_S:
            self._routing_checked = time.monotonic()
            self._refresh = asyncio.ensure_future(self._refresh_routing())  # kept: a task held by nobody dies
        return self._routing

    async def _refresh_routing(self) -> None:
        status = await self._detector_status()
        if status is not None and status.ready:
            self._learn(status)

    async def _cached(self, photo: Photo, started: float) -> dict[str, Any] | None:
        """The cached answer to these bytes by the version that answers them now, as this request's answer."""
        if photo.key is None or self._cache is None:
            return None
        hit = await self._cache.get(photo.key)
        self._metrics.inc("cache_lookups_total", {"result": "miss" if hit is None else "hit"})
        if hit is None:
            return None
        body = {**hit, "cached": True, "inference_time_ms": round((time.perf_counter() - started) * 1000.0, 3)}
        self._answered(body)
        return body

    async def _remember(self, photo: Photo, body: dict[str, Any]) -> None:
        """Keep an answer under the version that gave it (a switch in between keys it under the new one)."""
        if photo.key is None or self._cache is None:
            return
        key = content_key(photo.digest, body["model_version"])
        await self._cache.put(key, {k: v for k, v in body.items() if k not in ("inference_time_ms", "cached")})

    @staticmethod
    def _prediction(result: Scored | Explained, started: float, provenance: dict[str, Any]) -> dict[str, Any]:
        facts = result.model
        elapsed_ms = (time.perf_counter() - started) * 1000.0
        body = prediction_of(result.probability, facts.threshold, facts.model_version, elapsed_ms).model_dump()
        return {**body, "source_scores": result.source_scores, "provenance": provenance}

    def _answered(self, body: dict[str, Any]) -> None:
        """Count one answered photo, under this service's names and the original's, and record its probability."""
        self._metrics.inc(
            "predictions_total", {"status": "200", "result": body["prediction"], "version": body["model_version"]}
        )
        compat.count_answer(self._metrics, body["prediction"], body["confidence"])
        self._metrics.observe("prediction_probability", body["probability"])

    def _refused(self, err: ApiError) -> None:
        self._metrics.inc("predictions_total", {"status": str(err.status), "result": "error", "version": "none"})
        compat.count_refusal(self._metrics)
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
