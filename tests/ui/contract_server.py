"""A tiny real HTTP server that answers the detector's contract, for the UI's fast tests (no Ray, no model).

Shapes come from `serving.schemas`, so a change of the contract breaks these tests too. The "model" is a rule a
test can predict: the brighter the image, the more AI-generated. Every request's path is logged in `state.paths`.
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

from serving.schemas import (
    BatchItem,
    BatchResponse,
    ErrorResponse,
    ExplainResponse,
    HealthResponse,
    Prediction,
    confidence_of,
    verdict_of,
)
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


class Refusal(Exception):
    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        self.body = ErrorResponse(error=error, detail=detail).model_dump()
        self.response = JSONResponse(self.body, status, headers=headers)


def _probability(data: bytes) -> tuple[float, np.ndarray]:
    if data[:6] in (b"GIF87a", b"GIF89a"):
        raise Refusal(415, "unsupported_type", "GIF images are not supported; send a JPEG, PNG or WebP")
    if not (data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n" or data[8:12] == b"WEBP"):
        raise Refusal(400, "not_an_image", "the file is not an image (checked by its content, not its name)")
    image = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((CROP, CROP)))
    return float(image.mean() / 255.0), image


def _heatmap(crop: np.ndarray) -> str:
    red = np.zeros_like(crop)
    red[..., 0] = 255
    buffer = io.BytesIO()
    Image.fromarray((0.5 * crop + 0.5 * red).astype(np.uint8)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _prediction(probability: float, started: float) -> dict:
    return Prediction(
        prediction=verdict_of(probability, THRESHOLD),
        probability=round(probability, 6),
        confidence=confidence_of(probability, THRESHOLD),
        inference_time_ms=round((time.perf_counter() - started) * 1000.0, 3),
        model_version=MODEL_VERSION,
        threshold=THRESHOLD,
    ).model_dump()


def build_contract_api(state: ContractState) -> FastAPI:
    api = FastAPI()
    started = time.monotonic()

    @api.middleware("http")
    async def _log_and_guard(request: Request, call_next):
        state.paths.append(request.url.path)
        try:
            if request.url.path.startswith("/predict"):
                if state.api_key and request.headers.get("x-api-key") != state.api_key:
                    missing = not request.headers.get("x-api-key")
                    raise Refusal(
                        401,
                        "unauthorized",
                        "missing X-API-Key header; this service requires an API key"
                        if missing
                        else "invalid API key in X-API-Key",
                    )
                if state.rate_limited:
                    raise Refusal(429, "rate_limited", "more than 600 requests a minute", {"Retry-After": "7"})
                if not state.ready:
                    raise Refusal(
                        503, "not_ready", "the model is loading; retry in a few seconds", {"Retry-After": "5"}
                    )
        except Refusal as refusal:
            return refusal.response
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
        except Refusal as refusal:
            return refusal.response
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
            except Refusal as refusal:
                items.append(BatchItem(filename=upload.filename, **refusal.body))
        ok = sum(item.error is None for item in items)
        state.predictions += ok
        elapsed_ms = round((time.perf_counter() - started) * 1000.0, 3)
        body = BatchResponse(
            results=items,
            total=len(items),
            succeeded=ok,
            successful=ok,
            failed=len(items) - ok,
            inference_time_ms=elapsed_ms,
            total_inference_time_ms=elapsed_ms,
            model_version=MODEL_VERSION if ok else None,
        )
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
