"""The detector deployment: one model per replica, fed in batches, swapped without downtime when `champion` moves.

Batching: `@serve.batch` collects the crops that arrive while the previous forward pass runs. The forward pass runs
on the replica's user event loop on purpose: while it runs, new requests wait at the replica's door, and the next
batch takes all of them at once. (Handing the forward to a thread would let Serve cut the next batch after only
`batch_wait_timeout_s`, so batches would stay small exactly when the load is high.) Serve runs user code on its own
loop thread, so health checks and metrics keep flowing meanwhile. `max_ongoing_requests` must be at least
`max_batch_size` or a batch can never fill; the app builder sets it far higher (serving.config.detector_options).

Model updates: a keeper thread per replica reconciles the loaded model with the wanted one - the `model_uri` of the
`user_config` and, for an alias URI (`models:/NAME@ALIAS`), the version the alias points at now, polled every
`champion_poll_s`. A new version is loaded and warmed up beside the old one, then swapped in with one assignment;
batches in flight finish on the model they started with. No request fails and no replica restarts; each answer
names the version that made it.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field
from ray import serve

from app.config import Settings
from serving.config import parse_alias

# A lone request waits this long for company; above a second that is a misconfiguration, not a trade-off.
MAX_BATCH_WAIT_S = 1.0

# bf16 autocast: always on GPU; on CPU only when asked ("bf16"), since there it pays only on chips with bf16 matrix
# units (Intel AMX, AVX512-BF16) and only in batches, and the threshold was chosen on float32 scores.
Precision = Literal["auto", "fp32", "bf16"]


class DetectorConfig(BaseModel):
    """The detector's `user_config`: all of it can change live (`serve deploy` with a new value, no restart)."""

    model_uri: str | None = Field(None, description="models:/NAME@ALIAS, models:/NAME/VERSION or a checkpoint dir")
    max_batch_size: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=MAX_BATCH_WAIT_S)
    champion_poll_s: float = Field(10.0, ge=0, description="how often an alias URI is re-resolved; 0 turns it off")
    torch_threads: int | None = Field(None, ge=1, description="CPU threads for inference; None: the cores available")
    precision: Precision = Field("auto", description="auto: bf16 autocast on GPU, float32 on CPU")


@dataclass
class ActiveModel:
    """A loaded, warmed-up model and what the API reports about it."""

    model: Any
    uri: str
    version: str
    crop_size: int
    threshold: float
    device: Any
    bf16: bool
    # What run_batch calls: the model itself, or on a CPU in float32 a frozen TorchScript trace of it (Grad-CAM keeps
    # the eager model, which has gradients).
    infer: Any = None
    # Threads that ran this model's GPU warm-up (see warm_up).
    warmed_threads: set[int] = field(default_factory=set)


class ModelNotFoundYet(RuntimeError):
    """The alias (or registered model) does not exist yet: serve 503 and keep polling rather than fail."""


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pick_device(use_gpu: bool | None) -> Any:
    import torch

    if use_gpu is False:
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if use_gpu:
        raise RuntimeError("serve.use_gpu is true but this replica sees no CUDA device")
    return torch.device("cpu")


def alias_version(uri: str) -> str:
    """The version an alias URI points at now; ModelNotFoundYet when the model or alias does not exist yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    parsed = parse_alias(uri)
    if parsed is None:
        raise ValueError(f"{uri} is not an alias URI")
    name, alias = parsed
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ModelNotFoundYet(
                f"no model under {uri} yet; train and register one (`aipd train`) and the service picks it up"
            ) from err
        raise


def use_bf16(device: Any, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def load_active(
    settings: Settings, uri: str, device: Any, warmup_sizes: tuple[int, ...] = (1,), precision: str = "auto",
    freeze: bool = True, warm: bool = True,
) -> ActiveModel:
    """Resolve, load and warm up a model; alias URIs are pinned to the version they point at right now.

    freeze=False leaves the CPU trace to the caller (`freeze_for_cpu`), e.g. on a background thread: a replica
    started under load must become ready fast, and tracing takes seconds there. warm=False leaves the warm-up to the
    caller (`warm_up`), which must run it on the thread that will run the batches.
    """
    import torch

    from app.model import load_checkpoint
    from app.registry import resolve_model

    source = uri
    parsed = parse_alias(uri)
    if parsed is not None:
        source = f"models:/{parsed[0]}/{alias_version(uri)}"
    resolved = resolve_model(settings, source)
    loaded = load_checkpoint(resolved.checkpoint_dir, device=str(device))
    model = loaded.model.eval().to(memory_format=torch.channels_last)
    active = ActiveModel(
        model=model,
        uri=uri,
        version=resolved.version,
        crop_size=int(loaded.preprocess.crop_size),
        threshold=float(loaded.threshold),
        device=device,
        bf16=use_bf16(device, precision),
    )
    if freeze:
        freeze_for_cpu(active, warmup_sizes)
    if warm and active.infer is None:  # a frozen trace comes warmed up
        warm_up(active, warmup_sizes)
    return active


def warm_up(active: ActiveModel, warmup_sizes: tuple[int, ...]) -> None:
    """Run the eager model once per batch size it will see; on a GPU, every padded size up to the largest.

    On a GPU, call it on the thread that runs the batches: PyTorch keeps cuDNN's execution plans per thread, and a
    warm-up on the loader thread left the serving thread to build them again, 2-3 s per batch size on an H100, in
    the middle of the traffic. The replica does it in its `async` reconfigure, on that thread, before it takes
    traffic (about 15 s for sizes 1-64 on an H100); a later model of the same architecture and crop size finds the
    plans built, and its warm-up before its first batch takes milliseconds.
    """
    sizes = gpu_batch_buckets(max(warmup_sizes)) if active.device.type == "cuda" else warmup_sizes
    for size in sorted(set(sizes)):
        run_batch(active, [np.zeros((active.crop_size, active.crop_size, 3), np.uint8)] * size)


def warmup_sizes(config: DetectorConfig) -> tuple[int, ...]:
    """The batch sizes a replica warms up for its configuration (on a GPU, every padded size up to the largest)."""
    return (1, min(config.max_batch_size, 64))


def gpu_batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a GPU replica runs: powers of two up to the one that holds ``max_batch_size``.

    cuDNN builds its execution plans per input shape, and on an H100 (torch 2.11, cuDNN 9.19) the first forward of
    EfficientNet-B0 at each new batch size took 2.1-3.0 s against 9-14 ms after. Batches of any size from 1 to 64 made
    the batched service answer 3-16 req/s at 8-128 concurrent clients, slower than one forward per request. Padding to
    these few sizes, all warmed up before the replica takes traffic, bounds that cost to the replica's start.
    """
    return tuple(1 << i for i in range(_next_power_of_two(max_batch_size).bit_length()))


def padded_batch_size(n: int, device_type: str) -> int:
    """On a GPU the smallest bucket that holds n (see gpu_batch_buckets); on a CPU n itself, where padding only costs."""
    return _next_power_of_two(n) if device_type == "cuda" else n


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def freeze_for_cpu(active: ActiveModel, warmup_sizes: tuple[int, ...] = (1,)) -> None:
    """On a CPU in float32, swap a warmed-up frozen trace in as what `run_batch` calls; elsewhere do nothing."""
    if active.device.type != "cpu" or active.bf16:
        return
    frozen = frozen_trace(active.model, active.crop_size)
    import torch

    with torch.inference_mode():
        for size in sorted(set(warmup_sizes)):
            example = torch.zeros(size, 3, active.crop_size, active.crop_size).contiguous(memory_format=torch.channels_last)
            for _ in range(2):  # TorchScript's profiling executor optimises the graph on its first calls per shape
                frozen(example)
    active.infer = frozen


def frozen_trace(model: Any, crop_size: int) -> Any:
    """A frozen TorchScript trace: batch norm folded into the convolutions and oneDNN's fused kernels.

    On the 2-core machine EfficientNet-B0 at 224 px, batch 1, runs in 13-21 ms frozen against 22-31 ms eager (110 ms
    against 166-208 ms at batch 8), with the same outputs; tracing takes about 2 s. Any batch size runs through it.
    """
    import warnings

    import torch

    example = torch.zeros(1, 3, crop_size, crop_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace warnings about Python control flow; the detector has none per input
        return torch.jit.freeze(torch.jit.trace(model, example))


def fit_crop(crop: np.ndarray, crop_size: int) -> np.ndarray:
    """A crop made for another crop size (a model switch in flight) is re-cropped, not refused."""
    if crop.shape == (crop_size, crop_size, 3) and crop.dtype == np.uint8:
        return crop
    from PIL import Image

    from app.transforms import eval_preprocess

    return eval_preprocess(Image.fromarray(np.asarray(crop, dtype=np.uint8)), crop_size)


def run_batch(active: ActiveModel, crops: list[np.ndarray]) -> np.ndarray:
    """Probabilities of ai_generated for uint8 crops: channels_last, inference mode, bf16 autocast as configured."""
    import torch

    from app.transforms import to_model_input

    batch = np.stack([fit_crop(crop, active.crop_size) for crop in crops])
    n = len(batch)
    padded = padded_batch_size(n, active.device.type)
    if padded > n:
        batch = np.concatenate([batch, np.zeros((padded - n, *batch.shape[1:]), batch.dtype)])
    x = to_model_input(batch, device=active.device, channels_last=True)
    with torch.inference_mode(), torch.autocast(device_type=active.device.type, dtype=torch.bfloat16, enabled=active.bf16):
        logits = (active.infer or active.model)(x)
    return torch.sigmoid(logits.float()).cpu().numpy()[:n]


def explain_crop(active: ActiveModel, crop: np.ndarray) -> dict[str, Any]:
    from app.transforms import to_model_input
    from serving.gradcam import grad_cam, heatmap_png

    crop = np.array(fit_crop(crop, active.crop_size))  # arrays from Ray's object store are read-only views
    x = to_model_input(crop[None], device=active.device)
    probability, cam = grad_cam(active.model, x)
    return {"probability": probability, "heatmap_png": heatmap_png(crop, cam), **describe(active)}


def describe(active: ActiveModel) -> dict[str, Any]:
    return {"model_version": active.version, "threshold": active.threshold, "crop_size": active.crop_size}


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
                max_ongoing_requests=max_ongoing, max_batch_size=config.max_batch_size,
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
                if parse_alias(uri) is not None and not self._mlflow_ready:
                    from app.registry import setup_mlflow

                    setup_mlflow(self._settings)  # the registry the alias lives in: this replica's settings
                    self._mlflow_ready = True
                following = parse_alias(uri) is not None and (active is None or config.champion_poll_s > 0)
                target = alias_version(uri) if following else None
                same_precision = active is not None and active.bf16 == use_bf16(self._device, config.precision)
                if active is not None and active.uri == uri and target in (None, active.version) and same_precision:
                    return
                if (uri, target) == self._failed:
                    return  # this exact model failed to load already; wait for the alias or the config to move
                started = time.perf_counter()
                sizes = warmup_sizes(config)
                loaded = load_active(
                    self._settings, uri, self._device, warmup_sizes=sizes, precision=config.precision, freeze=False,
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
                if first and parse_alias(uri) is None:
                    raise  # a wrong path or a corrupt checkpoint fails the deploy with its message
                self._failed = (uri, target)
                if active is None:
                    self._problem = f"cannot load {uri}: {err}"
                self._log.error("model load failed; keeping the current model", uri=uri, error=str(err))
                return
            self._active = loaded
            self._problem = ""
            # The eager model serves at once; the faster CPU trace replaces it when ready (run_batch reads it per batch).
            threading.Thread(
                target=freeze_for_cpu, args=(loaded, sizes), name="aipd-cpu-freeze", daemon=True
            ).start()
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
        """GPU only: warm every padded batch size on the calling thread, once per model (see warm_up)."""
        if active.device.type == "cuda" and threading.get_ident() not in active.warmed_threads:
            warm_up(active, warmup_sizes(self._config))
            active.warmed_threads.add(threading.get_ident())

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
