"""The function every Ray Train worker runs: stream its data shard, train with DDP, validate, checkpoint.

Rank 0 alone talks to MLflow (one run per training, created by the driver and handed in by id) and writes the
checkpoint; every rank calls ``ray.train.report`` the same number of times, as Ray Train requires.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from app.scoring import SELECTION_METRIC

TRAIN_STATE_FILE = "train_state.pt"


HOLD_TIMEOUT_S = 900.0


@dataclass
class LoopConfig:
    """Everything a worker needs; plain values only so it crosses process boundaries as a dict."""

    model: dict[str, Any]
    crop_size: int
    batch_size: int
    epochs: int
    lr: float
    weight_decay: float
    warmup_epochs: float
    steps_per_epoch: int
    target_fpr: float = 0.01
    source_loss_weight: float = 0.0  # 0: no source head to train
    seed: int = 0
    log_format: str = "console"
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    extra_metrics: dict[str, Any] = field(default_factory=dict)
    # `DecodeOptions.to_plain()` of each split when the workers decode on their device (train.decode_on), else None
    train_pixels: dict[str, Any] | None = None
    val_pixels: dict[str, Any] | None = None
    # start the next epoch's training data before validating, so its pipeline restart overlaps validation
    overlap_epochs: bool = False
    # after this epoch (1-based) every worker waits until `hold_until` exists (at most HOLD_TIMEOUT_S): the demo
    # fits and serves the early model on cores the next epochs would otherwise take
    hold_after_epoch: int | None = None
    hold_until: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def epoch_checkpoint_name(epoch: int) -> str:
    """The folder Ray Train stores an epoch's checkpoint in, under the run's folder in its storage path."""
    return f"epoch_{epoch:03d}"


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up then cosine decay to zero: stable start for AdamW, a small rate to finish on."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class _Worker:
    """What one worker holds for the whole run; the per-epoch steps below take it."""

    cfg: LoopConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module
    model_cfg: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: torch.nn.Module
    autocast: Any
    log: Any
    mlflow: Any = None  # rank 0's MlflowClient when the run is tracked


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: set up, resume if Ray hands back a checkpoint, then run the epochs."""
    import ray.train

    worker = _set_up(LoopConfig(**config))
    start_epoch, best_auroc, last_metrics = _resume(worker)
    if last_metrics is not None and start_epoch >= worker.cfg.epochs:
        # Restarted after its last checkpoint (a search resumed after Ctrl-C): report the last epoch again, or the
        # run would end with no result and Tune would refuse the trial for a missing metric.
        ray.train.report(last_metrics)
        return
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    upcoming = None
    for epoch in range(start_epoch, worker.cfg.epochs):
        metrics = _train_epoch(worker, upcoming or _Started(_batches(worker, train_shard, train=True)))
        last = epoch == worker.cfg.epochs - 1
        if worker.cfg.overlap_epochs and not last:
            upcoming = _Started(_batches(worker, train_shard, train=True), early=True)
        else:
            upcoming = None
        labels, logits, val_loss = _gather_val(worker, *_validate(worker, val_shard))
        metrics = _epoch_metrics(worker, epoch, metrics, labels, logits, val_loss)
        best_auroc = max(best_auroc, metrics[SELECTION_METRIC])
        _report(worker, epoch, metrics, best_auroc, (labels, logits))
        if worker.rank == 0:  # after the report, which stores the checkpoint: the driver's watcher reads the epoch
            worker.log.info("epoch_done", **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
            if worker.mlflow is not None:
                _log_epoch(worker.mlflow, worker.cfg.mlflow_run_id, metrics, epoch)
        if worker.cfg.hold_until and epoch + 1 == worker.cfg.hold_after_epoch and not last:
            _hold(worker, Path(worker.cfg.hold_until))


def _hold(worker: _Worker, until: Path) -> None:
    """Wait for the file the driver writes once it no longer needs the cores (or for HOLD_TIMEOUT_S, so a driver that
    died cannot stall the run)."""
    deadline = time.monotonic() + HOLD_TIMEOUT_S
    while not until.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    worker.log.info("hold_released", waited_for=str(until), released=until.exists())


def _set_up(cfg: LoopConfig) -> _Worker:
    import ray.train
    import ray.train.torch

    from app.logging import configure_logging, get_logger
    from app.model import ModelConfig, build_model

    configure_logging(cfg.log_format)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # Ray pins OMP_NUM_THREADS to the worker's logical CPUs (1 by default); on a CPU-only machine the workers
        # share the real cores instead, or a laptop trains on one thread.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))
    model_cfg = ModelConfig(**cfg.model)
    model = build_model(model_cfg).to(memory_format=torch.channels_last)  # faster on the CPU too
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * cfg.steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))
    worker = _Worker(
        cfg=cfg,
        rank=rank,
        world=world,
        device=device,
        model=model,
        model_cfg=model_cfg,
        optimizer=optimizer,
        scheduler=scheduler,
        loss_fn=torch.nn.BCEWithLogitsLoss(),
        autocast=torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else _NoAutocast(),
        log=get_logger("aipd.train", rank=rank),
        mlflow=_mlflow_client(cfg) if rank == 0 else None,
    )
    nodes = _gather_nodes(world)
    if worker.mlflow is not None:
        worker.mlflow.set_tag(cfg.mlflow_run_id, "train_nodes", str(len(nodes)))
        worker.mlflow.set_tag(cfg.mlflow_run_id, "train_workers", str(world))
    return worker


def _resume(worker: _Worker) -> tuple[int, float, dict[str, Any] | None]:
    """(first epoch to run, best val AUROC so far, the last epoch's metrics): from Ray's checkpoint after a worker
    failure or a resumed search, else (0, -1, None)."""
    import ray.train

    resumed = ray.train.get_checkpoint()
    if resumed is None:
        return 0, -1.0, None
    with resumed.as_directory() as ckpt_dir:
        state = torch.load(Path(ckpt_dir) / TRAIN_STATE_FILE, map_location=worker.device, weights_only=False)
    _unwrap(worker.model).load_state_dict(state["model"])
    worker.optimizer.load_state_dict(state["optimizer"])
    worker.scheduler.load_state_dict(state["scheduler"])
    worker.log.info("resumed_from_checkpoint", epoch=state["epoch"], best_auroc=state["best_auroc"])
    if worker.mlflow is not None:
        _log_epoch(worker.mlflow, worker.cfg.mlflow_run_id, {"resumed_from_epoch": state["epoch"]}, state["epoch"] + 1)
    return state["epoch"] + 1, state["best_auroc"], state.get("metrics")


class _Started:
    """An epoch's batches, optionally started ahead (``early``): a thread pulls the first batch now, so the data
    pipeline restarts while the caller does something else (validation), and the epoch begins with a batch ready."""

    def __init__(self, batches: Iterator[dict[str, Any]], early: bool = False) -> None:
        self._batches = batches
        self._first: list[dict[str, Any]] = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._pull, name="next-epoch", daemon=True) if early else None
        if self._thread is not None:
            self._thread.start()

    def _pull(self) -> None:
        try:
            self._first.append(next(self._batches))
        except StopIteration:
            pass
        except BaseException as err:  # noqa: BLE001 - raised where the epoch consumes its batches
            self._error = err

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self._thread is not None:
            self._thread.join()
            if self._error is not None:
                raise self._error
            yield from self._first
        yield from self._batches


def _batches(worker: _Worker, shard: Any, *, train: bool) -> Iterator[dict[str, Any]]:
    """A split's batches as {"image": uint8 (N, H, W, 3) tensor, "label", "source"}, whoever decoded them: Ray Data's
    tasks (tensors as they arrive) or this worker on its device (`app.data.pixels_on_device`)."""
    cfg = worker.cfg
    plain = cfg.train_pixels if train else cfg.val_pixels
    if plain is None:
        dtypes = {"image": torch.uint8, "label": torch.float32}
        if train:
            dtypes["source"] = torch.int64
        yield from shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=train, prefetch_batches=4 if train else 1, dtypes=dtypes
        )
        return
    from app.data import DecodeOptions, pixels_on_device

    options = DecodeOptions.from_plain(plain)
    for batch in shard.iter_batches(
        batch_size=cfg.batch_size, drop_last=train, prefetch_batches=4 if train else 1, batch_format="numpy"
    ):
        pixels, labels, sources = pixels_on_device(batch, options, worker.device)
        if len(labels):
            yield {"image": pixels, "label": torch.from_numpy(labels), "source": torch.from_numpy(sources)}


def _train_epoch(worker: _Worker, batches: Iterable[dict[str, Any]]) -> dict[str, float]:
    """One pass over this worker's shard; the loss is summed on the device, so no step waits for the host."""
    from app.transforms import to_model_input

    model, cfg = worker.model, worker.cfg
    model.train()
    started = time.perf_counter()
    seen, first_batch_s, first_batch_n = 0, None, 0
    loss_sum = torch.zeros((), device=worker.device)
    sources = cfg.source_loss_weight > 0
    for batch in batches:
        if first_batch_s is None:
            first_batch_s = time.perf_counter() - started
            first_batch_n = len(batch["label"])
        x = to_model_input(batch["image"], device=worker.device, channels_last=True)
        y = batch["label"].to(worker.device, non_blocking=True)
        with worker.autocast:
            if sources:
                logits, source_logits = model(x, with_sources=True)
            else:
                logits = model(x)
        loss = worker.loss_fn(logits.float(), y)
        if sources:
            # photos whose family the head does not know (-1) add nothing; a batch of only those adds zero
            target = batch["source"].to(worker.device, non_blocking=True)
            known = (target >= 0).float()
            per_photo = F.cross_entropy(source_logits.float(), target.clamp(min=0), reduction="none")
            loss = loss + cfg.source_loss_weight * (per_photo * known).sum() / known.sum().clamp(min=1.0)
        worker.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        worker.optimizer.step()
        worker.scheduler.step()
        seen += len(y)
        loss_sum += loss.detach() * len(y)
    if worker.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    steady_s = seconds - (first_batch_s or 0.0)
    return {
        "seen": seen,
        "loss_sum": float(loss_sum.item()),
        "seconds": seconds,
        "first_batch_s": first_batch_s or 0.0,
        "steady_rate": (seen - first_batch_n) / steady_s if steady_s > 0 else 0.0,
    }


def _epoch_metrics(
    worker: _Worker,
    epoch: int,
    trained: dict[str, float],
    labels: np.ndarray,
    logits: np.ndarray,
    val_loss: list[float],
) -> dict[str, Any]:
    """What every rank reports for the epoch, over every worker's share of the data (the validation split is
    gathered already)."""
    from app.operating_point import sigmoid, threshold_for_fpr
    from app.scoring import auroc

    seen_all, loss_all = _gather_sums(trained["seen"], trained["loss_sum"], worker.world)
    scores = sigmoid(logits)
    val_auroc = auroc(labels, scores)
    threshold = threshold_for_fpr(scores[labels == 0], worker.cfg.target_fpr)
    flagged = scores >= threshold
    return {
        "epoch": epoch,
        "train_loss": loss_all / max(1, seen_all),
        "train_images": seen_all,
        "train_images_per_s": seen_all / max(trained["seconds"], 1e-9),
        "train_images_per_s_steady": trained["steady_rate"] * worker.world,  # after the first batch
        "time_to_first_batch_s": trained["first_batch_s"],
        "val_loss": float(np.mean(val_loss)) if len(val_loss) else float("nan"),
        "val_accuracy": float((flagged == (labels == 1)).mean()) if len(labels) else float("nan"),
        SELECTION_METRIC: val_auroc if not math.isnan(val_auroc) else 0.0,
        "val_threshold": threshold,
        "lr": worker.scheduler.get_last_lr()[0],
    }


def _report(
    worker: _Worker, epoch: int, metrics: dict[str, Any], best_auroc: float, val: tuple[np.ndarray, np.ndarray]
) -> None:
    """Every rank reports; rank 0 alone attaches the checkpoint (model files, this epoch's validation scores for the
    operating point, and the state a resume needs)."""
    import ray.train

    from app.model import PreprocessSettings, save_checkpoint, save_val_scores

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if worker.rank == 0:
            inner = _unwrap(worker.model)
            save_checkpoint(
                tmp,
                inner,
                worker.model_cfg,
                PreprocessSettings(crop_size=worker.cfg.crop_size),
                threshold=metrics["val_threshold"],
                metrics={k: metrics[k] for k in (SELECTION_METRIC, "val_loss", "epoch")},
            )
            save_val_scores(tmp, *val)
            torch.save(
                {
                    "model": inner.state_dict(),
                    "optimizer": worker.optimizer.state_dict(),
                    "scheduler": worker.scheduler.state_dict(),
                    "epoch": epoch,
                    "best_auroc": best_auroc,
                    "metrics": metrics,
                },
                Path(tmp) / TRAIN_STATE_FILE,
            )
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=epoch_checkpoint_name(epoch))


class _NoAutocast:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def _validate(worker: _Worker, shard: Any) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """(labels, raw logits, per-batch losses) of this worker's shard of the validation split."""
    from app.transforms import to_model_input

    worker.model.eval()
    labels, outputs, losses = [], [], []
    for batch in _batches(worker, shard, train=False):
        x = to_model_input(batch["image"], device=worker.device, channels_last=True)
        y = batch["label"].to(worker.device)
        with worker.autocast:
            logits = _unwrap(worker.model)(x)
        losses.append(worker.loss_fn(logits.float(), y).item())
        # float64: float32 sigmoid rounds nearby logits into ties, which blunts AUROC and the threshold
        outputs.append(logits.double().cpu().numpy())
        labels.append(y.cpu().numpy())
    if not labels:
        return np.zeros(0), np.zeros(0), losses
    return np.concatenate(labels), np.concatenate(outputs), losses


def _gather_val(
    worker: _Worker, labels: np.ndarray, logits: np.ndarray, losses: list[float]
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Every rank gets every validation score: AUROC and the threshold need the whole split, not a shard."""
    if worker.world == 1:
        return labels, logits, losses
    import torch.distributed as dist

    parts: list[Any] = [None] * worker.world
    dist.all_gather_object(parts, (labels, logits, losses))
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        [loss for p in parts for loss in p[2]],
    )


def _gather_sums(seen: int, loss_sum: float, world: int) -> tuple[int, float]:
    if world == 1:
        return seen, loss_sum
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (seen, loss_sum))
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _gather_nodes(world: int) -> set[str]:
    """The distinct Ray nodes the workers run on, so a multi-node run can be seen to spread."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    if world == 1:
        return {node}
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, node)
    return set(parts)


def _mlflow_client(cfg: LoopConfig):
    if not (cfg.mlflow_tracking_uri and cfg.mlflow_run_id):
        return None
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=cfg.mlflow_tracking_uri)


def _log_epoch(client, run_id: str | None, metrics: dict[str, Any], epoch: int) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [
        Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float))
    ]
    client.log_batch(run_id, metrics=values)
