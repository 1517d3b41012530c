"""The HTTP face of the service: a FastAPI app behind `@serve.ingress`, on CPU, in front of the batched detector.

The ingress does everything that can be refused cheaply before a GPU sees the request - API key, rate limit, the byte
limit while the upload streams in, type sniffing and the pixel limit (`app.images.decode_image`), the center crop
(`app.transforms.eval_preprocess`) - and hands the detector a small uint8 crop. Every refusal is the JSON shape
`{"error": ..., "detail": ...}` with its 4xx; decode and crop run in a worker thread so one large photo does not
stall the other requests of this replica.
"""

# No `from __future__ import annotations` here: FastAPI reads the route signatures that @serve.ingress rewrites, and
# string annotations there turn `request: Request` into a required query parameter.
import asyncio
import base64
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from app.config import ImageLimits, Settings
from serving.guards import API_KEY_HEADER, RateLimiter, check_api_key, client_identity
from serving.schemas import (
    ApiError,
    BatchItem,
    BatchResponse,
    ErrorResponse,
    ExplainResponse,
    HealthResponse,
    Prediction,
    confidence_of,
    verdict_of,
)
from serving.uploads import read_files

DETECTOR_TIMEOUT_S = 30.0  # a request waits this long for a detector replica (cold start, scale-up) before 503
STATUS_TIMEOUT_S = 2.0
RETRY_AFTER_S = "5"

_ERROR_STATUS = {"empty": 400, "truncated": 400, "corrupt": 400, "too_large": 413, "too_many_pixels": 413}

# Magic bytes of images that are real images but not ones we accept: these get 415, anything else 400.
_OTHER_IMAGE_TYPES = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


def other_image_type(data: bytes) -> str | None:
    """The name of an image format we do not accept (GIF, SVG, HEIC, ...), or None when the bytes are no image."""
    for magic, name in _OTHER_IMAGE_TYPES:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"mif1", b"msf1", b"avif", b"hevc"):
        return "HEIF/AVIF"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in head):
        return "SVG"
    return None


def image_error(err: Exception, data: bytes) -> ApiError:
    """Map `app.images.ImageError` reasons to the contract: 400 not an image, 413 too large, 415 unsupported type."""
    reason = getattr(err, "reason", "corrupt")
    if reason == "unsupported_type":
        other = other_image_type(data)
        if other is not None:
            return ApiError(415, "unsupported_type", f"{other} images are not supported; send a JPEG, PNG or WebP")
        return ApiError(400, "not_an_image", "the file is not an image (checked by its content, not its name)")
    return ApiError(_ERROR_STATUS.get(reason, 400), reason, str(err))


def decode_and_crop(data: bytes, crop_size: int, limits: ImageLimits) -> np.ndarray:
    """Validate, decode and center-crop one upload; the only CPU-heavy step of the ingress (runs in a thread)."""
    from app.images import ImageError, decode_image
    from app.transforms import eval_preprocess

    try:
        image = decode_image(data, max_bytes=limits.max_bytes, max_pixels=limits.max_pixels)
        return eval_preprocess(image, crop_size)
    except ImageError as err:
        raise image_error(err, data) from err
    except MemoryError as err:
        raise ApiError(413, "too_many_pixels", "the image is too large to decode") from err
    except Exception as err:  # noqa: BLE001 - no decoder surprise may become a 500
        raise ApiError(400, "corrupt", f"the image cannot be decoded ({type(err).__name__}: {err})") from err


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


_UPLOAD_ONE = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary", "description": "JPEG, PNG or WebP"}},
                }
            }
        },
    }
}
_UPLOAD_MANY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            }
        },
    }
}
_ERRORS = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "not an image, truncated or corrupt, or a malformed upload",
        401: "missing or wrong X-API-Key (when keys are configured)",
        413: "file or request too large, or too many pixels",
        415: "an image type other than JPEG, PNG or WebP, or not a multipart upload",
        429: "rate limited; see Retry-After",
        503: "the model is loading or unavailable; see Retry-After",
    }.items()
}

api = FastAPI(
    title="AI Product Photo Detector",
    version="1.0",
    description="Detects AI-generated product photos. Upload JPEG, PNG or WebP as multipart/form-data.",
)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    names = {404: "not_found", 405: "method_not_allowed"}
    err = ApiError(exc.status_code, names.get(exc.status_code, "http_error"), str(exc.detail))
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
    @api.get("/healthz", summary="Liveness: the ingress answers")
    async def healthz(self) -> dict[str, str]:
        return {"status": "alive"}

    @api.get(
        "/health",
        response_model=HealthResponse,
        responses={503: {"model": HealthResponse}},
        summary="Readiness: a model is loaded, and which version",
    )
    async def health(self) -> JSONResponse:
        status = await self._detector_status()
        if status is None:
            body = HealthResponse(status="unavailable", model_loaded=False, detail="no detector replica answered")
            return JSONResponse(body.model_dump(), 503, headers={"Retry-After": RETRY_AFTER_S})
        if not status.get("ready"):
            body = HealthResponse(
                status="loading", model_loaded=False, model_uri=status.get("model_uri"), detail=status.get("detail")
            )
            return JSONResponse(body.model_dump(), 503, headers={"Retry-After": RETRY_AFTER_S})
        self._learn(status)
        body = HealthResponse(
            status="ok",
            model_loaded=True,
            model_version=status["model_version"],
            model_uri=status["model_uri"],
            threshold=status["threshold"],
            crop_size=status["crop_size"],
            device=status["device"],
        )
        return JSONResponse(body.model_dump())

    @api.get("/metrics", summary="Prometheus metrics of the whole application")
    async def metrics(self) -> Response:
        from serving.metrics import CONTENT_TYPE

        try:
            text = await asyncio.to_thread(self._metrics.render)
        except Exception as err:  # noqa: BLE001 - the store actor restarting is a 503, not a 500
            self._log.warning("metrics store unavailable", error=str(err))
            return error_response(
                ApiError(
                    503, "metrics_unavailable", "the metrics store is restarting; retry", {"Retry-After": RETRY_AFTER_S}
                )
            )
        return Response(text, media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------------------------------ prediction routes
    @api.post(
        "/predict",
        response_model=Prediction,
        responses=_ERRORS,
        openapi_extra=_UPLOAD_ONE,
        summary="Is this product photo AI-generated? (multipart field `file`)",
    )
    async def predict(self, request: Request) -> JSONResponse:
        def answer(result: dict[str, Any], body: dict[str, Any]) -> dict[str, Any]:
            self._metrics.observe("prediction_probability", body["probability"])
            return body

        return await self._answer_one(request, "predict", self._detector.predict, answer)

    @api.post(
        "/predict/explain",
        response_model=ExplainResponse,
        responses=_ERRORS,
        openapi_extra=_UPLOAD_ONE,
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

    @api.post(
        "/predict/batch",
        response_model=BatchResponse,
        responses=_ERRORS,
        openapi_extra=_UPLOAD_MANY,
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
            body = BatchResponse(
                results=items,
                total=len(items),
                succeeded=succeeded,
                failed=len(items) - succeeded,
                inference_time_ms=round((time.perf_counter() - started) * 1000.0, 3),
            )
            return JSONResponse(body.model_dump())
        except ApiError as err:
            return self._refuse(err)
        finally:
            self._metrics.observe("prediction_latency_seconds", time.perf_counter() - started, {"route": "batch"})

    # -------------------------------------------------------------------------------------------------- helpers
    async def _guard(self, request: Request) -> None:
        key = check_api_key(self._keys, request.headers.get(API_KEY_HEADER))
        self._limiter.acquire(client_identity(key, request.client.host if request.client else None))
        if not self._ready:
            status = await self._detector_status()
            if status is None or not status.get("ready"):
                detail = (status or {}).get("detail") or "the model is loading"
                raise ApiError(503, "not_ready", f"{detail}; retry in a few seconds", {"Retry-After": RETRY_AFTER_S})
            self._learn(status)

    async def _answer_one(
        self,
        request: Request,
        route: str,
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
            self._count("200", body["prediction"])
            return JSONResponse(body, headers={"Server-Timing": server_timing(started, read, decoded, called, result)})
        except ApiError as err:
            return self._refuse(err)
        finally:
            self._metrics.observe("prediction_latency_seconds", time.perf_counter() - started, {"route": route})

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
            self._count("200", body["prediction"])
            self._metrics.observe("prediction_probability", body["probability"])
            return BatchItem(filename=upload.filename, **body)
        except ApiError as err:
            self._count(str(err.status), "error", err.error)
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

    def _count(self, status: str, result: str, error: str | None = None) -> None:
        self._metrics.inc("predictions_total", {"status": status, "result": result})
        if error is not None:
            self._metrics.inc("prediction_errors_total", {"type": error})

    def _refuse(self, err: ApiError) -> JSONResponse:
        self._count(str(err.status), "error", err.error)
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
