"""The model runtime: load a model reference, warm it up, and turn batches of uint8 crops into probabilities.

Shared by the Serve detector and the catalog scan, so a file gets the same probability from both. No Ray Serve here.
On a GPU, batches are padded to powers of two: cuDNN builds its execution plans per input shape (seconds for each new
batch size), so a few padded sizes, all warmed before traffic, bound that cost to the start.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from app.config import Settings
from app.model_ref import ModelRef, parse_model_ref

# bf16 autocast: always on GPU; on CPU only when asked ("bf16"), since there it pays only on chips with bf16 matrix
# units (Intel AMX, AVX512-BF16) and only in batches, and the threshold was chosen on float32 scores.
Precision = Literal["auto", "fp32", "bf16"]


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
        raise RuntimeError("a GPU was asked for but this process sees no CUDA device")
    return torch.device("cpu")


def alias_version(ref: ModelRef) -> str:
    """The version an alias points at now; ModelNotFoundYet when the model or alias does not exist yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if ref.kind != "alias":
        raise ValueError(f"{ref.uri} is not an alias URI")
    try:
        return str(MlflowClient().get_model_version_by_alias(ref.name, ref.alias).version)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ModelNotFoundYet(
                f"no model under {ref.uri} yet; train and register one (`aipd train`) and the service picks it up"
            ) from err
        raise


def use_bf16(device: Any, precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def load_active(
    settings: Settings,
    uri: str,
    device: Any,
    warmup_sizes: tuple[int, ...] = (1,),
    precision: str = "auto",
    freeze: bool = True,
    warm: bool = True,
) -> ActiveModel:
    """Resolve, load and warm up a model; alias URIs are pinned to the version they point at right now.

    freeze=False leaves the CPU trace to the caller (`freeze_for_cpu`), e.g. on a background thread: a replica
    started under load must become ready fast. warm=False leaves the warm-up to the caller (`warm_up`), which must
    run it on the thread that will run the batches.
    """
    import torch

    from app.model import load_checkpoint
    from app.registry import resolve_model

    ref = parse_model_ref(uri)
    source = ref.pinned(alias_version(ref)).uri if ref.kind == "alias" else uri
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
    """Run the model once per batch size it will see; on a GPU, every padded size up to the largest.

    On a GPU, call it on the thread that runs the batches: PyTorch keeps cuDNN's execution plans per thread, so a
    warm-up elsewhere would leave the serving thread to build them again in the middle of the traffic.
    """
    sizes = gpu_batch_buckets(max(warmup_sizes)) if active.device.type == "cuda" else warmup_sizes
    for size in sorted(set(sizes)):
        run_batch(active, [np.zeros((active.crop_size, active.crop_size, 3), np.uint8)] * size)


def warm_once_on_this_thread(active: ActiveModel, warmup_sizes: tuple[int, ...]) -> None:
    """GPU only: warm every padded batch size on the calling thread, once per model and thread (see warm_up)."""
    if active.device.type == "cuda" and threading.get_ident() not in active.warmed_threads:
        warm_up(active, warmup_sizes)
        active.warmed_threads.add(threading.get_ident())


def warmup_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a model is warmed for (on a GPU, every padded size up to the largest)."""
    return (1, min(max_batch_size, 64))


def gpu_batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a GPU runs: powers of two up to the one that holds ``max_batch_size``."""
    return tuple(1 << i for i in range(_next_power_of_two(max_batch_size).bit_length()))


def padded_batch_size(n: int, device_type: str) -> int:
    """On a GPU the smallest bucket that holds n (see gpu_batch_buckets); on a CPU n itself: padding only costs."""
    return _next_power_of_two(n) if device_type == "cuda" else n


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def freeze_for_cpu(active: ActiveModel, warmup_sizes: tuple[int, ...] = (1,)) -> None:
    """On a CPU in float32, swap a warmed-up frozen trace in as what `run_batch` calls; elsewhere do nothing."""
    if active.device.type != "cpu" or active.bf16:
        return
    import torch

    frozen = frozen_trace(active.model, active.crop_size)
    with torch.inference_mode():
        for size in sorted(set(warmup_sizes)):
            example = torch.zeros(size, 3, active.crop_size, active.crop_size).contiguous(
                memory_format=torch.channels_last
            )
            for _ in range(2):  # TorchScript's profiling executor optimises the graph on its first calls per shape
                frozen(example)
    active.infer = frozen


def frozen_trace(model: Any, crop_size: int) -> Any:
    """A frozen TorchScript trace: batch norm folded into the convolutions and oneDNN's fused kernels, same outputs.

    Faster on a CPU (benchmarks/RESULTS.md); any batch size runs through it.
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
    device_type = active.device.type
    with torch.inference_mode(), torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=active.bf16):
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
