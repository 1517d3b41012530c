"""A tiny real HTTP server that answers the detector's contract, for the UI's fast tests (no Ray, no model).

Its answers are made by the service's own pieces: the bodies by `app.contract` (`prediction_of`, `batch_of`, the
response models), the refusals by the ingress's key check (`serving.guards`) and image checks (`app.images` through
`serving.image_checks`), so a change of the contract or of a refusal's words breaks these tests too. Only the "model"
is its own, a rule a test can predict: the brighter the image, the more AI-generated. Every request's path is logged
in `state.paths`.
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import uvicorn
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.responses import JSONResponse
from PIL import Image

from app.contract import (
    API_KEY_HEADER,
    ApiError,
    BatchItem,
    ErrorResponse,
    ExplainResponse,
    HealthResponse,
    batch_of,
    prediction_of,
)
from app.images import ImageError, decode_image
from serving.guards import check_api_key
from serving.image_checks import image_error
from tests.helpers import free_port

MODEL_VERSION = "7"
THRESHOLD = 0.5
CROP = 64
METRICS = {"roc_auc": 0.973, "accuracy": 0.912, "tpr_at_1pct_fpr": 0.81}
LOADED_AT = "2026-05-04T09:08:07+00:00"  # when the contract's model started answering, as /health says it
REGISTRY_DOWN = "model registry unreachable (cannot reach the MLflow server); serving version 7 until it is back"


@dataclass
class ContractState:
    api_key: str | None = None
    ready: bool = True
    rate_limited: bool = False
    registry_down: bool = False
    metrics: dict[str, float] = field(default_factory=lambda: dict(METRICS))
    paths: list[str] = field(default_factory=list)
    predictions: int = 0


def refusal(err: ApiError) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=err.error, detail=err.detail).model_dump(), err.status, headers=err.headers)


def _probability(data: bytes) -> tuple[float, np.ndarray]:
    try:
        image = decode_image(data)
    except ImageError as err:
        raise image_error(err, data) from err
    crop = np.asarray(image.resize((CROP, CROP)))
    return float(crop.mean() / 255.0), crop


def _heatmap(crop: np.ndarray) -> str:
    red = np.zeros_like(crop)
    red[..., 0] = 255
    buffer = io.BytesIO()
    Image.fromarray((0.5 * crop + 0.5 * red).astype(np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _prediction(probability: float, started: float) -> dict:
    elapsed_ms = (time.perf_counter() - started) * 1000.0
    return prediction_of(probability, THRESHOLD, MODEL_VERSION, elapsed_ms).model_dump()


def build_contract_api(state: ContractState) -> FastAPI:
    api = FastAPI()
    started = time.monotonic()

    @api.middleware("http")
    async def _log_and_guard(request: Request, call_next):
        state.paths.append(request.url.path)
        try:
            if request.url.path.startswith("/predict"):
                check_api_key([state.api_key] if state.api_key else [], request.headers.get(API_KEY_HEADER))
                if state.rate_limited:
                    raise ApiError(429, "rate_limited", "more than 600 requests a minute", {"Retry-After": "7"})
                if not state.ready:
                    raise ApiError(
                        503, "not_ready", "the model is loading; retry in a few seconds", {"Retry-After": "5"}
                    )
        except ApiError as err:
            return refusal(err)
        return await call_next(request)

    @api.get("/health")
    async def health() -> JSONResponse:
        vitals = {
            "uptime_seconds": round(time.monotonic() - started, 2),
            "active_requests": 1,
            "predictions_total": state.predictions,
            "drift_detected": False,
            "drift_status": None,
            "memory_usage_mb": None,
            "pid": os.getpid(),
        }
        if not state.ready:
            body = HealthResponse(
                status="unhealthy", state="loading", model_loaded=False, detail="the model is loading", **vitals
            )
            return JSONResponse(body.model_dump(), 503)
        body = HealthResponse(
            status="healthy",
            state="ok",
            model_loaded=True,
            model_version=MODEL_VERSION,
            model_uri="models:/aipd-detector@champion",
            threshold=THRESHOLD,
            crop_size=CROP,
            device="cpu",
            metrics=state.metrics,
            model_loaded_at=LOADED_AT,
            registry="unreachable" if state.registry_down else "reachable",
            detail=REGISTRY_DOWN if state.registry_down else None,
            **vitals,
        )
        return JSONResponse(body.model_dump())

    @api.post("/predict/explain")
    async def explain(file: UploadFile = File(...)) -> JSONResponse:
        started = time.perf_counter()
        try:
            probability, crop = _probability(await file.read())
        except ApiError as err:
            return refusal(err)
        body = ExplainResponse(**_prediction(probability, started), heatmap_base64=_heatmap(crop), crop_size=CROP)
        state.predictions += 1
        return JSONResponse(body.model_dump())

    @api.post("/predict/batch")
    async def batch(files: list[UploadFile] = File(...)) -> JSONResponse:
        started = time.perf_counter()
        items = []
        for upload in files:
            try:
                probability, _ = _probability(await upload.read())
                items.append(BatchItem(filename=upload.filename, **_prediction(probability, started)))
            except ApiError as err:
                items.append(BatchItem(filename=upload.filename, error=err.error, detail=err.detail))
        body = batch_of(items, (time.perf_counter() - started) * 1000.0)
        state.predictions += body.succeeded
        return JSONResponse(body.model_dump())

    return api


class ContractServer:
    """uvicorn in a daemon thread on a free port; `state` can be changed by a test while it runs."""

    def __init__(self, state: ContractState | None = None) -> None:
        self.state = state or ContractState()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(build_contract_api(self.state), host="127.0.0.1", port=self.port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="contract-api", daemon=True)

    def start(self) -> "ContractServer":
        self._thread.start()
        deadline = time.monotonic() + 15
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the contract server did not start")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
