"""The detector deployment: one model per replica, fed in batches, swapped without downtime when `champion` moves.

Batching: `@serve.batch` collects the crops that arrive while the previous forward pass runs. The forward pass runs
on the replica's user event loop on purpose: while it runs, new requests wait at the replica's door, and the next
batch takes all of them at once (handing it to a thread would let Serve cut the next batch after only
`batch_wait_timeout_s`, so batches would stay small exactly when the load is high). `max_ongoing_requests` must be at
least `max_batch_size` or a batch can never fill; the app builder sets it far higher (serving.config).

Model updates: a keeper thread per replica reconciles the loaded model with the wanted one - the `model_uri` of the
`user_config` and, for an alias URI (`models:/NAME@ALIAS`), the version the alias points at now, polled every
`champion_poll_s`. A new version is loaded and warmed up beside the old one, then swapped in with one assignment;
batches in flight finish on the model they started with. No request fails and no replica restarts; each answer
names the version that made it.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from pydantic import BaseModel, Field
from ray import serve

from app.config import Settings
from app.model_ref import parse_model_ref
from serving.runtime import (
    ActiveModel,
    ModelNotFoundYet,
    Precision,
    alias_version,
    available_cores,
    describe,
    explain_crop,
    freeze_for_cpu,
    load_active,
    pick_device,
    run_batch,
    use_bf16,
    warm_once_on_this_thread,
    warmup_sizes,
)

# A lone request waits this long for company; above a second that is a misconfiguration, not a trade-off.
MAX_BATCH_WAIT_S = 1.0


class DetectorConfig(BaseModel):
    """The detector's `user_config`: all of it can change live (`serve deploy` with a new value, no restart)."""

    model_uri: str | None = Field(None, description="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint dir")
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=MAX_BATCH_WAIT_S)
    champion_poll_s: float = Field(10.0, ge=0, description="how often an alias URI is re-resolved; 0 turns it off")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for inference; None: the cores available")
    precision: Precision = Field("auto", description="auto: bf16 autocast on GPU, float32 on CPU")


@serve.deployment(name="DetectorDeployment")
class DetectorDeployment:
    """Batched inference on one model; see the module docstring for batching and model updates."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from app.logging import configure_logging, get_logger
        from serving.metrics import MetricsRecorder

        self._settings = Settings(**settings)
        configure_logging(self._settings.log_format, self._settings.log_level)
        self._log = get_logger("serving.detector")
        self._metrics = MetricsRecorder(serve.get_replica_context().app_name)
        self._device = pick_device(self._settings.serve.use_gpu)
        self._config = DetectorConfig(model_uri=self._settings.default_model_uri)
        self._active: ActiveModel | None = None
        self._problem = "the model is loading"
        self._load_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._keeper: threading.Thread | None = None
        self._mlflow_ready = False
        self._failed: tuple[str, str | None] | None = None

    # ---------------------------------------------------------------------------------------------- configuration
    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Batch size and wait apply to the next batch; a new model URI loads beside the current model.

        `async` so that Serve runs it on the event loop that runs the batches (a sync method would run in its thread
        pool): the first model's GPU warm-up then happens on the serving thread, before the replica takes traffic.
        """
        import torch

        config = DetectorConfig(**user_config)
        if config.model_uri is None:
            config.model_uri = self._settings.default_model_uri
        self._predict_batch.set_max_batch_size(config.max_batch_size)
        self._predict_batch.set_batch_wait_timeout_s(config.batch_wait_timeout_s)
        deployment_config = getattr(serve.get_replica_context(), "_deployment_config", None)
        max_ongoing = getattr(deployment_config, "max_ongoing_requests", None)
        if max_ongoing is not None and max_ongoing < config.max_batch_size:
            self._log.warning(
                "max_ongoing_requests is below max_batch_size: batches can never fill; raise it",
                max_ongoing_requests=max_ongoing,
                max_batch_size=config.max_batch_size,
            )
        if self._device.type == "cpu":
            torch.set_num_threads(config.torch_threads or available_cores())
        self._config = config
        if self._active is None and self._keeper is None:
            self._reconcile(first=True)  # during replica start: Serve routes no request here until this returns
            if self._active is not None:
                self._warm_on_this_thread(self._active)
        self._ensure_keeper()
        self._wake.set()

    def check_health(self) -> None:
        """Liveness only; a replica waiting for its first model is alive and answers 503 through the ingress."""
        if self._keeper is None:
            self._reconcile(first=True)
            self._ensure_keeper()

    def _ensure_keeper(self) -> None:
        if self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="aipd-model-keeper", daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        while not self._stop.is_set():
            poll = self._config.champion_poll_s
            timeout = poll if poll > 0 else None
            if self._active is None:  # waiting for a first model: keep looking even with polling off
                timeout = min(timeout or 5.0, 5.0)
            self._wake.wait(timeout=timeout)
            self._wake.clear()
            if self._stop.is_set():
                return
            self._reconcile()

    def _reconcile(self, first: bool = False) -> None:
        """Load the wanted model if it differs from the active one; errors leave the active model serving."""
        config = self._config
        uri = config.model_uri or self._settings.default_model_uri
        with self._load_lock:
            active = self._active
            target: str | None = None
            try:
                ref = parse_model_ref(uri)
                if ref.kind == "alias" and not self._mlflow_ready:
                    from app.registry import setup_mlflow

                    setup_mlflow(self._settings)  # the registry the alias lives in: this replica's settings
                    self._mlflow_ready = True
                following = ref.kind == "alias" and (active is None or config.champion_poll_s > 0)
                target = alias_version(ref) if following else None
                same_precision = active is not None and active.bf16 == use_bf16(self._device, config.precision)
                if active is not None and active.uri == uri and target in (None, active.version) and same_precision:
                    return
                if (uri, target) == self._failed:
                    return  # this exact model failed to load already; wait for the alias or the config to move
                started = time.perf_counter()
                sizes = warmup_sizes(config.max_batch_size)
                loaded = load_active(
                    self._settings,
                    uri,
                    self._device,
                    warmup_sizes=sizes,
                    precision=config.precision,
                    freeze=False,
                    warm=self._device.type != "cuda",  # on a GPU the serving thread warms it (see warm_up)
                )
            except ModelNotFoundYet as err:
                if active is None:
                    if self._problem != str(err):  # once, not at every poll
                        self._log.warning("waiting for a model", uri=uri, detail=str(err))
                    self._problem = str(err)
                return
            except Exception as err:
                self._metrics.inc("model_loads_total", {"version": target or "unknown", "result": "error"})
                if first and parse_model_ref(uri).kind != "alias":
                    raise  # a wrong path or a corrupt checkpoint fails the deploy with its message
                self._failed = (uri, target)
                if active is None:
                    self._problem = f"cannot load {uri}: {err}"
                self._log.error("model load failed; keeping the current model", uri=uri, error=str(err))
                return
            self._active = loaded
            self._problem = ""
            # The eager model serves at once; the faster CPU trace replaces it when ready (read per batch).
            threading.Thread(target=freeze_for_cpu, args=(loaded, sizes), name="aipd-cpu-freeze", daemon=True).start()
            self._metrics.inc("model_loads_total", {"version": loaded.version, "result": "ok"})
            self._log.info(
                "model ready",
                uri=uri,
                version=loaded.version,
                previous=active.version if active else None,
                device=str(self._device),
                seconds=round(time.perf_counter() - started, 2),
            )

    # ------------------------------------------------------------------------------------------------- requests
    async def predict(self, crop: np.ndarray) -> dict[str, Any]:
        """One uint8 crop in; joins the current batch. Returns the prediction or {"error", "detail"}."""
        return await self._predict_batch(crop)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _predict_batch(self, crops: list[np.ndarray]) -> list[dict[str, Any]]:
        active = self._active
        if active is None:
            return [{"error": "not_ready", "detail": self._problem}] * len(crops)
        try:
            self._warm_on_this_thread(active)
            started = time.perf_counter()
            probabilities = run_batch(active, crops)
        except Exception as err:  # noqa: BLE001 - one bad batch must not take the replica down
            self._log.error("inference failed", error=str(err), batch_size=len(crops))
            return [{"error": "inference_failed", "detail": f"the model failed on this batch: {err}"}] * len(crops)
        seconds = time.perf_counter() - started
        self._metrics.observe("prediction_batch_size", len(crops))
        self._metrics.observe("model_inference_seconds", seconds)
        info = describe(active)
        return [
            {"probability": float(p), "batch_size": len(crops), "forward_ms": seconds * 1000.0, **info}
            for p in probabilities
        ]

    def _warm_on_this_thread(self, active: ActiveModel) -> None:
        warm_once_on_this_thread(active, warmup_sizes(self._config.max_batch_size))

    def explain(self, crop: np.ndarray) -> dict[str, Any]:
        """Grad-CAM for one crop; a sync method, so Serve runs it in its thread pool beside the batches."""
        from serving.gradcam import ExplainUnsupportedError

        active = self._active
        if active is None:
            return {"error": "not_ready", "detail": self._problem}
        try:
            return explain_crop(active, crop)
        except ExplainUnsupportedError as err:
            return {"error": "explain_unsupported", "detail": str(err)}
        except Exception as err:  # noqa: BLE001
            self._log.error("explain failed", error=str(err))
            return {"error": "inference_failed", "detail": f"Grad-CAM failed: {err}"}

    def status(self) -> dict[str, Any]:
        active = self._active
        if active is None:
            return {"ready": False, "detail": self._problem, "model_uri": self._config.model_uri}
        return {"ready": True, "model_uri": active.uri, "device": str(active.device), **describe(active)}

    def __del__(self) -> None:
        self._stop.set()
        self._wake.set()
        metrics = getattr(self, "_metrics", None)
        if metrics is not None:
            metrics.close()
