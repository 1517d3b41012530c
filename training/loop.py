"""The function every Ray Train worker runs: stream its data shard, train with DDP, validate, checkpoint.

Rank 0 alone talks to MLflow (one run per training, created by the driver and handed in by id) and writes the
checkpoint; every rank calls ``ray.train.report`` the same number of times, as Ray Train requires.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

TRAIN_STATE_FILE = "train_state.pt"


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
    seed: int = 0
    log_format: str = "console"
    mlflow_tracking_uri: str | None = None
    mlflow_run_id: str | None = None
    extra_metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up then cosine decay to zero: stable start for AdamW, a small rate to finish on."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    from app.logging import configure_logging, get_logger
    from app.model import ModelConfig, PreprocessSettings, build_model, save_checkpoint
    from app.transforms import to_model_input
    from training.metrics import auroc, threshold_for_fpr

    cfg = LoopConfig(**config)
    configure_logging(cfg.log_format)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    log = get_logger("aipd.train", rank=rank)
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    if not on_gpu:
        # Ray pins OMP_NUM_THREADS to the worker's logical CPUs (1 by default); on a CPU-only machine the workers
        # share the real cores instead, or a laptop trains on one thread.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))

    model_cfg = ModelConfig(**cfg.model)
    # channels_last pays on the CPU too: EfficientNet-B0 at 112 px trains at 67-77 img/s instead of 47-51 on 2 cores.
    model = build_model(model_cfg).to(memory_format=torch.channels_last)
    if on_gpu:
        torch.backends.cudnn.benchmark = True
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.steps_per_epoch * cfg.epochs
    warmup_steps = int(cfg.warmup_epochs * cfg.steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps)
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()

    start_epoch, best_auroc = 0, -1.0
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with resumed.as_directory() as ckpt_dir:
            state = torch.load(Path(ckpt_dir) / TRAIN_STATE_FILE, map_location=device, weights_only=False)
        _unwrap(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best_auroc = state["epoch"] + 1, state["best_auroc"]
        log.info("resumed_from_checkpoint", epoch=state["epoch"], best_auroc=best_auroc)

    mlflow_client = _mlflow_client(cfg) if rank == 0 else None
    nodes = _gather_nodes(world)
    if mlflow_client is not None:
        mlflow_client.set_tag(cfg.mlflow_run_id, "train_nodes", str(len(nodes)))
        mlflow_client.set_tag(cfg.mlflow_run_id, "train_workers", str(world))
    if mlflow_client is not None and resumed is not None:
        _log_epoch(mlflow_client, cfg.mlflow_run_id, {"resumed_from_epoch": start_epoch - 1}, start_epoch)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if on_gpu else _NoAutocast()

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        started = time.perf_counter()
        seen, first_batch_s, first_batch_n = 0, None, 0
        loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
        for batch in train_shard.iter_torch_batches(
            batch_size=cfg.batch_size, drop_last=True, prefetch_batches=4,
            dtypes={"image": torch.uint8, "label": torch.float32},
        ):
            if first_batch_s is None:
                first_batch_s = time.perf_counter() - started
                first_batch_n = len(batch["label"])
            x = to_model_input(batch["image"], device=device, channels_last=True)
            y = batch["label"].to(device, non_blocking=True)
            with autocast:
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            seen += len(y)
            loss_sum += loss.detach() * len(y)
        if on_gpu:
            torch.cuda.synchronize()
        train_seconds = time.perf_counter() - started
        loss_sum = float(loss_sum.item())

        labels, scores, val_loss = _validate(model, val_shard, cfg, device, autocast, loss_fn)
        steady_s = train_seconds - (first_batch_s or 0.0)
        steady_rate = (seen - first_batch_n) / steady_s if steady_s > 0 else 0.0
        labels, scores, seen_all, loss_all = _gather(labels, scores, seen, loss_sum, world)
        val_auroc = auroc(labels, scores)
        threshold = threshold_for_fpr(labels, scores, cfg.target_fpr)
        flagged = scores >= threshold
        metrics = {
            "epoch": epoch,
            "train_loss": loss_all / max(1, seen_all),
            "train_images": seen_all,
            "train_images_per_s": seen_all / max(train_seconds, 1e-9),
            "train_images_per_s_steady": steady_rate * world,  # after the first batch: the pipeline's sustained rate
            "time_to_first_batch_s": first_batch_s or 0.0,
            "val_loss": float(np.mean(val_loss)) if len(val_loss) else float("nan"),
            "val_accuracy": float((flagged == (labels == 1)).mean()) if len(labels) else float("nan"),
            "val_auroc": val_auroc if not math.isnan(val_auroc) else 0.0,
            "val_threshold": threshold,
            "lr": scheduler.get_last_lr()[0],
        }
        best_auroc = max(best_auroc, metrics["val_auroc"])
        if rank == 0:
            log.info("epoch_done", **{k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()})
            if mlflow_client is not None:
                _log_epoch(mlflow_client, cfg.mlflow_run_id, metrics, epoch)
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                save_checkpoint(
                    tmp, _unwrap(model), model_cfg, PreprocessSettings(crop_size=cfg.crop_size),
                    threshold=threshold, metrics={k: metrics[k] for k in ("val_auroc", "val_loss", "epoch")},
                )
                torch.save(
                    {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "best_auroc": best_auroc},
                    Path(tmp) / TRAIN_STATE_FILE,
                )
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch_{epoch:03d}")


class _NoAutocast:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def _validate(model, shard, cfg: LoopConfig, device, autocast, loss_fn) -> tuple[np.ndarray, np.ndarray, list[float]]:
    from app.transforms import to_model_input

    model.eval()
    labels, scores, losses = [], [], []
    for batch in shard.iter_torch_batches(batch_size=cfg.batch_size, dtypes={"image": torch.uint8, "label": torch.float32}):
        x = to_model_input(batch["image"], device=device, channels_last=True)
        y = batch["label"].to(device)
        with autocast:
            logits = _unwrap(model)(x)
        losses.append(loss_fn(logits.float(), y).item())
        scores.append(torch.sigmoid(logits.double()).cpu().numpy())
        labels.append(y.cpu().numpy())
    if not labels:
        return np.zeros(0), np.zeros(0), losses
    return np.concatenate(labels), np.concatenate(scores), losses


def _gather(labels: np.ndarray, scores: np.ndarray, seen: int, loss_sum: float, world: int):
    """Every rank gets every validation score: AUROC and the threshold need the whole split, not a shard."""
    if world == 1:
        return labels, scores, seen, loss_sum
    import torch.distributed as dist

    parts: list[Any] = [None] * world
    dist.all_gather_object(parts, (labels, scores, seen, loss_sum))
    return (
        np.concatenate([p[0] for p in parts]),
        np.concatenate([p[1] for p in parts]),
        sum(p[2] for p in parts),
        sum(p[3] for p in parts),
    )


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
    values = [Metric(k, float(v), now, epoch) for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float))]
    client.log_batch(run_id, metrics=values)
