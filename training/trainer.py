"""The driver side of training: build the Ray Data pipelines and the TorchTrainer, run it, then hand the best
checkpoint to registration (training/registration.py).

``build_trainer`` is shared with tuning (each Tune trial builds and fits one); ``run_training`` is what ``aipd train``
calls.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.config import Settings
from app.data import DatasetIndex, DecodeOptions, index_dataset, resolve_data_path, source_targets, to_ray_dataset
from app.logging import get_logger
from app.scoring import SELECTION_METRIC, SELECTION_MODE
from training.loop import LoopConfig, epoch_checkpoint_name, train_loop_per_worker
from training.progress import EpochWatcher, OnEpoch
from training.registration import register_after_training
from training.tracking import start_run

log = get_logger("aipd.train")


def decode_on_workers(settings: Settings) -> bool:
    """`train.decode_on`: "auto" is Ray Data's tasks on every device, the faster of the two on a GPU node
    (benchmarks/RESULTS.md, "The GPU pixel path"); the workers decode only where asked to."""
    return settings.train.decode_on == "workers"


def decode_options(
    settings: Settings,
    *,
    train: bool,
    crop_size: int,
    augment_prob: float | None = None,
    on_workers: bool = False,
) -> DecodeOptions:
    """How a split is read: augmented for training (``augment_prob``, from a search, replaces every degradation's
    probability), plain for validation; by Ray Data's tasks, or (``on_workers``) read there and decoded by the
    training workers."""
    from app.degradations import DegradationConfig
    from app.transforms import AugmentConfig

    aug = settings.train.augment
    probs = {"blur_prob": aug.blur_prob, "downscale_prob": aug.downscale_prob, "jpeg_prob": aug.jpeg_prob}
    if augment_prob is not None:
        probs = dict.fromkeys(probs, augment_prob)
    degradations = DegradationConfig(
        blur_sigma=(0.2, aug.blur_sigma_max),
        downscale_factor=(aug.downscale_min, 0.9),
        upscale_back_prob=aug.upscale_back_prob,
        jpeg_quality=(aug.jpeg_quality_min, 95),
        **probs,
    )
    return DecodeOptions(
        crop_size=crop_size,
        train=train,
        limits=settings.images,
        augment=AugmentConfig(degradations=degradations) if train else None,
        log_format=settings.log_format,
        seed=settings.train.seed if train else None,
        source_clean_only=settings.train.source_clean_only,
        on_workers=on_workers,
    )


def build_trainer(
    settings: Settings,
    index: DatasetIndex,
    *,
    use_gpu: bool,
    name: str,
    mlflow_run_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    callbacks: list[Any] | None = None,
    hold: tuple[int, Path] | None = None,
):
    """A TorchTrainer over the index's train and val splits; ``overrides`` are hyperparameters (tuning); ``hold``
    (epoch, file): the workers wait after that epoch until the file exists (``LoopConfig.hold_until``)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    t = settings.train
    hp = {
        "lr": t.lr,
        "weight_decay": t.weight_decay,
        "batch_size": t.batch_size,
        "crop_size": t.crop_size,
        "dropout": settings.model.dropout,
        "augment_prob": None,
        "epochs": t.epochs,
    }
    hp.update({k: v for k, v in (overrides or {}).items() if v is not None})
    train_records, val_records = index.split("train"), index.split("val")
    workers = t.num_workers
    steps_per_epoch = max(1, len(train_records) // (hp["batch_size"] * workers))
    model_cfg = settings.model.model_dump()
    model_cfg["dropout"] = hp["dropout"]
    families = index.source_families() if t.source_loss_weight > 0 else []
    model_cfg["source_families"] = families
    train_records = train_records.assign(source=source_targets(train_records, families))
    loop = LoopConfig(
        model=model_cfg,
        crop_size=hp["crop_size"],
        batch_size=hp["batch_size"],
        epochs=hp["epochs"],
        lr=hp["lr"],
        weight_decay=hp["weight_decay"],
        warmup_epochs=t.warmup_epochs,
        steps_per_epoch=steps_per_epoch,
        target_fpr=t.target_fpr,
        source_loss_weight=t.source_loss_weight if families else 0.0,
        seed=t.seed,
        log_format=settings.log_format,
        mlflow_tracking_uri=settings.tracking_uri if mlflow_run_id else None,
        mlflow_run_id=mlflow_run_id,
        hold_after_epoch=hold[0] if hold else None,
        hold_until=str(hold[1]) if hold else None,
    )
    on_workers = decode_on_workers(settings)
    train_options = decode_options(
        settings, train=True, crop_size=hp["crop_size"], augment_prob=hp["augment_prob"], on_workers=on_workers
    )
    val_options = decode_options(settings, train=False, crop_size=hp["crop_size"], on_workers=on_workers)
    if on_workers:
        loop = dataclasses.replace(loop, train_pixels=train_options.to_plain(), val_pixels=val_options.to_plain())
    # The next epoch's data starts during validation where that costs the cores little: on GPU nodes, and where
    # the tasks only read (the workers decode).
    loop = dataclasses.replace(loop, overlap_epochs=use_gpu or on_workers)
    # paths stay behind where the workers only need pixels and labels (a worker that decodes seeds its augmentation
    # from the batch's paths, as the tasks do)
    kept_behind = (["variant"], ["variant"]) if on_workers else (["path", "variant"], ["path", "variant", "source"])
    datasets = {
        "train": to_ray_dataset(train_records, train_options).drop_columns(kept_behind[0]),
        "val": to_ray_dataset(val_records, val_options).drop_columns(kept_behind[1]),
    }
    resources = {"CPU": t.cpus_per_worker}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop.to_dict(),
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=t.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=str(settings.ray_storage),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=SELECTION_METRIC, checkpoint_score_order=SELECTION_MODE
            ),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=callbacks,
        ),
        datasets=datasets,
        dataset_config=_ordered_train_data(),
    )


def _ordered_train_data() -> Any:
    """Train's data in the order its seeded shuffle made (Ray Data otherwise hands blocks over as they finish),
    so one worker sees the same sequence in every rerun."""
    import ray.train

    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(execution_options={"train": options})


def best_checkpoint_dir(result: Any, out_dir: Path) -> Path:
    """Copy the best checkpoint's model files (not the optimizer state) out of Ray's storage."""
    from app.model import copy_checkpoint

    best = (
        result.get_best_checkpoint(metric=SELECTION_METRIC, mode=SELECTION_MODE)
        if result.best_checkpoints
        else result.checkpoint
    )
    if best is None:
        raise RuntimeError("training reported no checkpoint")
    with best.as_directory() as src:
        return copy_checkpoint(src, out_dir)


@dataclass
class TrainOutcome:
    run_id: str
    version: str
    champion_moved: bool
    champion_message: str
    checkpoint_dir: Path
    val_auroc: float
    report: Any
    wall_s: float
    epochs_run: int


def run_training(
    settings: Settings, on_epoch: OnEpoch | None = None, hold: tuple[int, Path] | None = None
) -> TrainOutcome:
    """``aipd train``: fit, evaluate on the test split, register, and move ``champion`` only if it wins.

    ``on_epoch`` hears of every finished epoch while Ray trains (a progress bar; the demo serves an early one);
    ``hold`` pauses the workers after an epoch until a file exists (the demo, while it fits its early model).
    """
    import mlflow

    from app.ray_runtime import init_ray, sized_for_cluster
    from app.registry import registry_unreachable, setup_mlflow

    started = time.perf_counter()
    data_path = resolve_data_path(settings)
    index = index_dataset(data_path)
    index.require_splits("train", "val", "test")
    init_ray(settings)
    settings = sized_for_cluster(settings)
    use_gpu = bool(settings.train.use_gpu)
    experiment_id = setup_mlflow(settings)
    client = mlflow.MlflowClient()
    name = f"train-{time.strftime('%Y%m%d-%H%M%S')}"
    run_id = start_run(client, experiment_id, name, settings, data_path, use_gpu, index.counts())
    log.info("training_started", run_id=run_id, data=data_path, use_gpu=use_gpu, workers=settings.train.num_workers)

    ray_name = f"{name}-{run_id[:8]}"
    trainer = build_trainer(settings, index, use_gpu=use_gpu, name=ray_name, mlflow_run_id=run_id, hold=hold)
    watcher = None
    if on_epoch is not None:
        watcher = EpochWatcher(
            client,
            run_id,
            settings.train.epochs,
            lambda epoch: settings.ray_storage / ray_name / epoch_checkpoint_name(epoch),
            on_epoch,
            unreachable=lambda: registry_unreachable(settings, timeout_s=2.0),
        )
        watcher.start()
    try:
        result = fit_keeping_sigint_handler(trainer)
        if result.error:
            raise RuntimeError(f"training failed: {result.error}")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    finally:
        if watcher is not None:
            watcher.stop()
    checkpoint_dir = best_checkpoint_dir(result, settings.checkpoint_dir(run_id))
    epochs_run = int(result.metrics["epoch"]) + 1 if result.metrics else 0

    registration = register_after_training(settings, checkpoint_dir, index, data_path, run_id)
    with mlflow.start_run(run_id=run_id):
        mlflow.log_metric("epochs_run", epochs_run)
    log.info("training_finished", run_id=run_id, version=registration.version, champion=registration.champion_moved)
    return TrainOutcome(
        run_id,
        registration.version,
        registration.champion_moved,
        registration.champion_message,
        checkpoint_dir,
        registration.val_auroc,
        registration.report,
        time.perf_counter() - started,
        epochs_run,
    )


def fit_keeping_sigint_handler(trainer: Any) -> Any:
    """``trainer.fit()``, then the caller's Ctrl-C handler back in place.

    Ray Train installs its own SIGINT handler for the run and leaves it installed afterwards, so a later Ctrl-C
    would only log "aborting the training run" - `aipd demo`, which keeps serving after training, could not be stopped.
    """
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()
    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    finally:
        signal.signal(signal.SIGINT, previous)
