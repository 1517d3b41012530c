"""The model runtime: load a model reference, warm it up, and turn batches of uint8 crops into probabilities.

Shared by the Serve detector and the catalog scan, so a file gets the same probability from both. No Ray Serve here.
On a GPU, batches are padded to powers of two: cuDNN builds its execution plans per input shape (seconds for each new
batch size), so a few padded sizes, all warmed before traffic, bound that cost to the start. Each padded size is then
captured as a CUDA graph (uint8 crops in, probabilities out, the one preprocessing of ``app.transforms`` inside):
EfficientNet-B0's eager forward is bound by kernel launches, and a replay launches them all at once.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from app.config import Precision, Settings
from app.model_ref import ModelRef, parse_model_ref
from serving.results import Explained, ModelFacts


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
    # The model's evaluation metrics (test_auroc, val_auroc, ...) from the registry or its checkpoint, for /health.
    evaluation: dict[str, float] = field(default_factory=dict)
    # When it started answering (UTC), set by whoever swaps it in: loading and warming up come before.
    answering_since: datetime | None = None
    # What run_batch calls on a CPU once ready: a frozen TorchScript trace, in bf16 when `bf16` (Grad-CAM keeps the
    # eager float32 model, which has gradients), and the dtype it takes.
    infer: Any = None
    infer_dtype: Any = None
    # On a GPU, whether to capture CUDA graphs at warm-up, and the captured ones by padded batch size.
    use_graphs: bool = True
    graphs: dict[int, GraphedForward] = field(default_factory=dict)
    # The source head's families (the model's source_families), in the order of score_batch's columns after the first
    source_families: tuple[str, ...] = ()


@dataclass
class GraphedForward:
    """One padded batch size as a CUDA graph: crops go into ``host`` (pinned), probabilities come out of ``out``."""

    graph: Any
    host: Any  # pinned uint8 (N, H, W, 3)
    device_in: Any  # uint8 (N, H, W, 3) on the GPU, the graph's input
    out: Any  # float32 (N, 1 + families) on the GPU, the graph's output (see score_batch)


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

    from app.registry import MISSING_CODES

    if ref.kind != "alias":
        raise ValueError(f"{ref.uri} is not an alias URI")
    try:
        return str(MlflowClient().get_model_version_by_alias(ref.name, ref.alias).version)
    except MlflowException as err:
        if err.error_code in MISSING_CODES:
            raise ModelNotFoundYet(
                f"no model under {ref.uri} yet; train and register one (`aipd train`) and the service picks it up"
            ) from err
        raise


def use_bf16(device: Any, precision: Precision) -> bool:
    """ "auto" means bf16 where the hardware computes it natively (a GPU, a CPU with AVX512-BF16 or AMX), float32
    where it would only be emulated. bf16 moves a probability by well under 1e-3 and gives the same answer at any
    batch size, so the scan and the service still agree (benchmarks/RESULTS.md)."""
    return precision == "bf16" or (precision == "auto" and (device.type == "cuda" or cpu_has_native_bf16()))


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16, AMX); oneDNN only emulates bf16 on the others."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: assume not
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def load_active(
    settings: Settings,
    uri: str,
    device: Any,
    warmup_sizes: tuple[int, ...] = (1,),
    precision: Precision = "auto",
    freeze: bool = True,
    warm: bool = True,
    cuda_graphs: bool = True,
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
        evaluation=evaluation_metrics(parse_model_ref(source), resolved.version, loaded.metrics),
        use_graphs=cuda_graphs,
        source_families=tuple(loaded.model_cfg.source_families),
    )
    if freeze:
        freeze_for_cpu(active, warmup_sizes)
    if warm and active.infer is None:  # a frozen trace comes warmed up
        warm_up(active, warmup_sizes)
    return active


def evaluation_metrics(ref: ModelRef, version: str, checkpoint_metrics: dict[str, Any]) -> dict[str, float]:
    """The checkpoint's own numbers (its config.json), overlaid for a registered version by the registry's.

    Read once per load; a registry that cannot be read leaves the checkpoint's numbers, since a model that loaded
    must serve whether or not its report can be shown.
    """
    import math

    metrics = {
        key: float(value)
        for key, value in checkpoint_metrics.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    }
    if not ref.in_registry or ref.name is None:
        return metrics
    from app.registry import version_metrics

    try:
        metrics.update(version_metrics(ref.name, version))
    except Exception as err:  # noqa: BLE001 - any registry failure only hides the numbers
        from app.logging import get_logger

        get_logger("serving.runtime").warning("cannot read the model's metrics", uri=ref.uri, error=str(err))
    return metrics


def warm_up(active: ActiveModel, sizes: tuple[int, ...], *, explain: bool = False) -> None:
    """Run the model once per batch size it will see; on a GPU, capture exactly these sizes as CUDA graphs, and
    decode once there (`app.pixels.warm_decoder`: a replica's first nvJPEG call costs hundreds of milliseconds).

    On a GPU, call it on the thread that runs the batches: PyTorch keeps cuDNN's execution plans per thread, so a
    warm-up elsewhere would leave the serving thread to build them again in the middle of the traffic. Each new size
    costs seconds of plan building, so callers ask for the sizes they will run (`warmup_sizes`). ``explain`` warms the
    eager model at batch size 1 too, for Grad-CAM.
    """
    on_gpu = active.device.type == "cuda"
    if on_gpu:
        from app.pixels import warm_decoder

        warm_decoder(active.device)
    if on_gpu and active.use_graphs:
        try:
            active.graphs = capture_graphs(active, sizes)
        except Exception as err:  # noqa: BLE001 - graphs are a speed-up; the eager model still answers
            from app.logging import get_logger

            get_logger("serving.runtime").warning("CUDA graph capture failed; serving eagerly", error=str(err))
            active.graphs = {}
    eager = set() if active.graphs else set(sizes)
    if explain and on_gpu:
        eager.add(1)
    blank = np.zeros((active.crop_size, active.crop_size, 3), np.uint8)
    for size in sorted(eager):
        _run_eager(active, np.stack([blank] * size), size)


def capture_graphs(active: ActiveModel, sizes: tuple[int, ...]) -> dict[int, GraphedForward]:
    """A CUDA graph per batch size, largest first so the smaller ones reuse its memory pool."""
    import torch

    from app.model import AllLogits
    from app.transforms import to_model_input

    side = active.crop_size
    model = AllLogits(active.model)
    graphs: dict[int, GraphedForward] = {}
    pool = None
    stream = torch.cuda.Stream(device=active.device)
    with torch.inference_mode():
        for size in sorted(set(sizes), reverse=True):
            device_in = torch.zeros((size, side, side, 3), dtype=torch.uint8, device=active.device)

            def forward(batch: torch.Tensor = device_in) -> torch.Tensor:
                x = to_model_input(batch, channels_last=True)
                # autocast's weight cache cannot live across graph replays
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=active.bf16, cache_enabled=False):
                    return probabilities_of(model(x).float())

            stream.wait_stream(torch.cuda.current_stream(active.device))
            with torch.cuda.stream(stream):  # graphs want their warm-up on a side stream
                for _ in range(3):
                    forward()
            torch.cuda.current_stream(active.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                out = forward()
            pool = graph.pool()
            host = torch.empty((size, side, side, 3), dtype=torch.uint8, pin_memory=True)
            graphs[size] = GraphedForward(graph=graph, host=host, device_in=device_in, out=out)
    torch.cuda.synchronize(active.device)
    return graphs


def warmup_sizes(max_batch_size: int, device_type: str) -> tuple[int, ...]:
    """The sizes a service warms: on a GPU every padded size up to the largest (a lone request runs at batch size 1,
    a full queue at the largest); on a CPU, where any size runs through the trace, the two ends."""
    return gpu_batch_buckets(max_batch_size) if device_type == "cuda" else (1, max_batch_size)


def gpu_batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a GPU runs: powers of two up to the one that holds ``max_batch_size``."""
    return tuple(1 << i for i in range(_next_power_of_two(max_batch_size).bit_length()))


def padded_batch_size(n: int, device_type: str, captured: Iterable[int] = ()) -> int:
    """On a GPU the smallest captured size that holds n, else the next power of two (see gpu_batch_buckets); on a
    CPU n itself: padding only costs."""
    if device_type != "cuda":
        return n
    return min((size for size in captured if size >= n), default=_next_power_of_two(n))


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def freeze_for_cpu(active: ActiveModel, warmup_sizes: tuple[int, ...] = (1,)) -> None:
    """On a CPU, swap a warmed-up frozen trace in as what `run_batch` calls (a bf16 copy of the model when `bf16`)."""
    if active.device.type != "cpu":
        return
    import copy

    import torch

    from app.model import AllLogits

    dtype = torch.bfloat16 if active.bf16 else torch.float32
    model = copy.deepcopy(active.model).to(dtype) if active.bf16 else active.model
    frozen = frozen_trace(AllLogits(model), active.crop_size, dtype)
    with torch.inference_mode():
        for size in sorted(set(warmup_sizes)):
            side = active.crop_size
            example = torch.zeros(size, 3, side, side, dtype=dtype).contiguous(memory_format=torch.channels_last)
            for _ in range(2):  # TorchScript's profiling executor optimises the graph on its first calls per shape
                frozen(example)
    active.infer, active.infer_dtype = frozen, dtype


def frozen_trace(model: Any, crop_size: int, dtype: Any = None) -> Any:
    """A frozen TorchScript trace: batch norm folded into the convolutions and oneDNN's fused kernels, same outputs.

    Faster on a CPU (benchmarks/RESULTS.md); any batch size runs through it.
    """
    import warnings

    import torch

    example = torch.zeros(1, 3, crop_size, crop_size, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace warnings about Python control flow; the detector has none per input
        return torch.jit.freeze(torch.jit.trace(model, example))


def fit_crop(crop: Any, crop_size: int) -> Any:
    """A crop made for another crop size (a model switch in flight) is re-cropped, not refused. Crops decoded on the
    model's device (torch tensors, app/pixels.py) stay there when they fit."""
    if tuple(crop.shape) == (crop_size, crop_size, 3) and str(crop.dtype) in ("uint8", "torch.uint8"):
        return crop
    from PIL import Image

    from app.transforms import eval_preprocess

    pixels = crop if isinstance(crop, np.ndarray) else crop.cpu().numpy()
    return eval_preprocess(Image.fromarray(np.asarray(pixels, dtype=np.uint8)), crop_size)


def probabilities_of(logits: Any) -> Any:
    """AllLogits' float32 output (N, 1 + families) as probabilities: the verdict's sigmoid in the first column, the
    source head's softmax in the others."""
    import torch

    verdict = torch.sigmoid(logits[:, :1])
    if logits.shape[1] == 1:
        return verdict
    return torch.cat([verdict, torch.softmax(logits[:, 1:], dim=1)], dim=1)


def run_batch(active: ActiveModel, crops: list[np.ndarray]) -> np.ndarray:
    """Probabilities of ai_generated for uint8 crops (see score_batch)."""
    return score_batch(active, crops)[:, 0]


def source_scores(active: ActiveModel, row: np.ndarray) -> dict[str, float] | None:
    """One row of score_batch as the answer's `source_scores`; None for a model without the source head."""
    if not active.source_families:
        return None
    return {family: round(float(p), 6) for family, p in zip(active.source_families, row[1:], strict=True)}


def score_batch(active: ActiveModel, crops: list[Any]) -> np.ndarray:
    """(N, 1 + families) float32 for uint8 crops (arrays, or tensors decoded on the model's device): the probability
    of ai_generated, then each source family's probability; a graph replay on a GPU, else channels_last in inference
    mode."""
    crops = [fit_crop(crop, active.crop_size) for crop in crops]
    n = len(crops)
    padded = padded_batch_size(n, active.device.type, active.graphs)
    graphed = active.graphs.get(padded)
    on_device = not all(isinstance(crop, np.ndarray) for crop in crops)
    if graphed is not None:
        import torch

        with torch.inference_mode():  # the graph's buffers were made in inference mode
            if on_device:
                from app.pixels import stack_on

                graphed.device_in[:n].copy_(stack_on(crops, active.device))
            else:
                np.stack(crops, out=graphed.host.numpy()[:n])  # rows past n keep old pixels; their outputs are dropped
                graphed.device_in.copy_(graphed.host, non_blocking=True)
            graphed.graph.replay()
            return graphed.out[:n].cpu().numpy()
    if on_device:
        import torch

        from app.pixels import stack_on

        batch = stack_on(crops, active.device)
        if padded > n:
            batch = torch.cat([batch, batch.new_zeros((padded - n, *batch.shape[1:]))])
        return _run_eager(active, batch, n)
    batch = np.stack(crops)
    if padded > n:
        batch = np.concatenate([batch, np.zeros((padded - n, *batch.shape[1:]), batch.dtype)])
    return _run_eager(active, batch, n)


def _run_eager(active: ActiveModel, batch: Any, n: int) -> np.ndarray:
    import torch

    from app.model import AllLogits
    from app.transforms import to_model_input

    x = to_model_input(batch, device=active.device, channels_last=True)
    with torch.inference_mode():
        if active.infer is not None:
            logits = active.infer(x.to(active.infer_dtype))
        else:
            with torch.autocast(device_type=active.device.type, dtype=torch.bfloat16, enabled=active.bf16):
                logits = AllLogits(active.model)(x)
        return probabilities_of(logits.float()).cpu().numpy()[:n]


def explain_crop(active: ActiveModel, crop: np.ndarray) -> Explained:
    from app.transforms import to_model_input
    from serving.gradcam import grad_cam, heatmap_png

    crop = np.array(fit_crop(crop, active.crop_size))  # arrays from Ray's object store are read-only views
    x = to_model_input(crop[None], device=active.device)
    probability, cam = grad_cam(active.model, x)
    sources = source_scores(active, score_batch(active, [crop])[0]) if active.source_families else None
    return Explained(
        probability=probability, heatmap_png=heatmap_png(crop, cam), model=model_facts(active), source_scores=sources
    )


def model_facts(active: ActiveModel) -> ModelFacts:
    return ModelFacts(model_version=active.version, threshold=active.threshold, crop_size=active.crop_size)
